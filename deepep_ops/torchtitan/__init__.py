"""torchtitan integration of deepep-ops (needs ``torchtitan``; ``import deepep_ops`` does not).

- :class:`DeepEPOpsTokenDispatcher`: torchtitan's expert-parallel token
  dispatcher interface over ``deepep_ops.dispatch_exact`` / ``deepep_ops.combine``;
  the MoE forward and backward compile with ``fullgraph=True``.
- :class:`DeepEPOpsSelectiveAC` / :func:`save_ops`: selective activation
  checkpointing that saves our ops' outputs instead of re-communicating.
- :mod:`deepep_ops.torchtitan.overrides`: the ``@override`` factories for
  ``--override.imports``.
"""

from __future__ import annotations

import deepep_ops  # noqa: F401  (registers the ops)

from deepep_ops.torchtitan.checkpointing import DeepEPOpsSelectiveAC, communication_ops, save_ops
from deepep_ops.torchtitan.dispatcher import DeepEPOpsDispatchMetadata, DeepEPOpsTokenDispatcher, shared_ep_buffer

__all__ = [
    "DeepEPOpsDispatchMetadata",
    "DeepEPOpsSelectiveAC",
    "DeepEPOpsTokenDispatcher",
    "communication_ops",
    "save_ops",
    "shared_ep_buffer",
]
