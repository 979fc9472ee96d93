"""vLLM integration of deepep-ops (needs ``vllm``; ``import deepep_ops`` does not).

- :class:`DeepEPV2PrepareAndFinalize`: drop-in for vLLM 0.32–0.34's DeepEP v2
  prepare/finalize, routed through ``torch.ops.deepep_ops``.
- :mod:`deepep_ops.vllm.passes`: ``CombineIntoPass``, a post-grad pass that
  rewrites ``out.copy_(deepep_ops.combine(...))`` into ``deepep_ops.combine_into(out, ...)``.
- :func:`splitting_ops`: adds ``deepep_ops::dispatch_exact`` to a ``CompilationConfig``'s
  splitting ops (or Inductor's partition ops).
- :mod:`deepep_ops.vllm.plugin`: the ``vllm.general_plugins`` entry point.
"""

from __future__ import annotations

import deepep_ops  # noqa: F401  (registers the ops)

from deepep_ops.vllm.prepare_finalize import (
    DeepEPV2PrepareAndFinalize,
    ForwardContextTokens,
    dp_bucket,
    dp_num_tokens,
)
from deepep_ops.vllm.splitting import NON_CAPTURABLE_OPS, splitting_ops

__all__ = [
    "DeepEPV2PrepareAndFinalize",
    "ForwardContextTokens",
    "NON_CAPTURABLE_OPS",
    "dp_bucket",
    "dp_num_tokens",
    "splitting_ops",
]
