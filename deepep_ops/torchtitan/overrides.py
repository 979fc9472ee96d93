"""torchtitan ``@override`` factories: swap deepep-ops in without editing torchtitan.

Activate with ``--override.imports`` (each factory by its ``module.function``):

- ``deepep_ops.torchtitan.overrides.token_dispatcher``: every expert-parallel
  token dispatcher config (``BaseEPTokenDispatcher.Config``: the all-to-all,
  TorchAO, DeepEP, HybridEP and MinimalAsyncEP ones) becomes
  :class:`~deepep_ops.torchtitan.DeepEPOpsTokenDispatcher`. Sizes the source
  config already has (the DeepEP/HybridEP/MinimalAsyncEP configs get
  ``num_max_tokens_per_rank`` and ``hidden_dim`` from torchtitan; TorchAO's and
  HybridEP's ``pad_multiple`` becomes ``expert_alignment``) are kept; kwargs
  override them, and a config without them (the all-to-all one) needs them::

      --override.imports 'deepep_ops.torchtitan.overrides.token_dispatcher={"num_max_tokens_per_rank": 16384, "hidden_dim": 2048}'

- ``deepep_ops.torchtitan.overrides.selective_ac``: ``SelectiveAC`` becomes
  :class:`~deepep_ops.torchtitan.DeepEPOpsSelectiveAC`, which also saves our
  ops' outputs (no second dispatch/combine in the backward).
"""

from __future__ import annotations

from typing import Optional

from deepep_ops.torchtitan._compat import BaseEPTokenDispatcher, SelectiveAC, derive, override
from deepep_ops.torchtitan.checkpointing import DeepEPOpsSelectiveAC
from deepep_ops.torchtitan.dispatcher import DeepEPOpsTokenDispatcher


@override(
    target=BaseEPTokenDispatcher.Config,
    description="deepep-ops token dispatcher (DeepEP v2 through torch.library ops that torch.compile traces)",
)
def token_dispatcher(
    cfg: BaseEPTokenDispatcher.Config,
    *,
    num_max_tokens_per_rank: Optional[int] = None,
    hidden_dim: Optional[int] = None,
    expert_alignment: Optional[int] = None,
    backend: str = "auto",
) -> DeepEPOpsTokenDispatcher.Config:
    """``cfg`` as a :class:`DeepEPOpsTokenDispatcher` config (kwargs: see its Config)."""
    capacity = num_max_tokens_per_rank if num_max_tokens_per_rank is not None else getattr(
        cfg, "num_max_tokens_per_rank", None)
    hidden = hidden_dim if hidden_dim is not None else getattr(cfg, "hidden_dim", None)
    missing = [name for name, value in (("num_max_tokens_per_rank", capacity), ("hidden_dim", hidden)) if value is None]
    if missing:
        raise ValueError(
            f"deepep_ops.torchtitan.overrides.token_dispatcher: {type(cfg).__qualname__} has no "
            f"{' or '.join(missing)}; pass {', '.join(missing)} as kwargs "
            "(num_max_tokens_per_rank: local_batch_size * seq_len // (cp * tp); hidden_dim: the model dim)"
        )
    if expert_alignment is None:
        expert_alignment = getattr(cfg, "pad_multiple", None) or 1
    return derive(
        cfg,
        DeepEPOpsTokenDispatcher.Config,
        num_max_tokens_per_rank=capacity,
        hidden_dim=hidden,
        expert_alignment=expert_alignment,
        backend=backend,
    )


@override(
    target=SelectiveAC.Config,
    exact=True,
    description="SelectiveAC that also saves the deepep_ops:: communication outputs",
)
def selective_ac(cfg: SelectiveAC.Config) -> DeepEPOpsSelectiveAC.Config:
    """``cfg`` as a :class:`DeepEPOpsSelectiveAC` config (every field kept)."""
    return derive(cfg, DeepEPOpsSelectiveAC.Config)
