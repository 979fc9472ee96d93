"""vLLM integration of deepep-ops (needs ``vllm``; ``import deepep_ops`` does not).

- :class:`DeepEPV2PrepareAndFinalize`: drop-in for vLLM 0.32–0.34's DeepEP v2
  prepare/finalize, routed through ``torch.ops.deepep_ops``.
- :mod:`deepep_ops.vllm.passes`: ``CombineIntoPass``, a post-grad pass that
  rewrites ``out.copy_(deepep_ops.combine(...))`` into ``deepep_ops.combine_into(out, ...)``.
- :func:`splitting_ops`: adds ``deepep_ops::dispatch_exact`` to a ``CompilationConfig``'s
  splitting ops (or Inductor's partition ops).
- :mod:`deepep_ops.vllm.plugin`: the ``vllm.general_plugins`` entry point.

Importing this package also sets ``deepep_ops.vllm_combine_into_pass``, the name
by which a vLLM compilation config can ask for the combine-into pass.
"""

from __future__ import annotations

import deepep_ops  # noqa: F401  (registers the ops)

from deepep_ops.vllm.prepare_finalize import (
    DeepEPV2PrepareAndFinalize,
    ForwardContextTokens,
    dp_bucket,
    dp_num_tokens,
)
from deepep_ops.vllm.passes import combine_into_pass
from deepep_ops.vllm.splitting import NON_CAPTURABLE_OPS, splitting_ops

# vLLM resolves a pass named in a compilation config ("deepep_ops.vllm_combine_into_pass")
# as an attribute of the top-level package: importing deepep_ops.vllm makes the name
# resolvable, as the plugin does in every vLLM process.
deepep_ops.vllm_combine_into_pass = combine_into_pass

__all__ = [
    "DeepEPV2PrepareAndFinalize",
    "ForwardContextTokens",
    "NON_CAPTURABLE_OPS",
    "dp_bucket",
    "dp_num_tokens",
    "splitting_ops",
]
