"""Torch-native pieces for running vLLM's modular MoE kernel on CPU with this adapter.

:class:`TorchGatedExperts` is a minimal ``FusedMoEExpertsModular``: a SiLU-gated
MLP per (row, top-k lane) in plain torch, unreduced ``[rows, K, H]`` outputs
(zeros for lanes whose expert is −1 or not local), so the finalize step does the
weight-and-reduce — exactly the contract of vLLM's Triton/DeepGEMM experts.
:func:`make_moe_config` builds the ``FusedMoEConfig`` it needs.
"""

from __future__ import annotations

from typing import Optional

import torch

from deepep_ops.vllm._compat import (
    FUSED_MOE_UNQUANTIZED_CONFIG,
    FusedMoEConfig,
    FusedMoEParallelConfig,
    FusedMoEQuantConfig,
    MoEActivation,
    RoutingMethodType,
    TopKWeightAndReduceDelegate,
    TopKWeightAndReduceNoOP,
    deepep_activation_format,
    mk,
)
from deepep_ops.prepare_finalize import FP8_BLOCK, dequantize_block_fp8


def make_moe_config(
    num_experts: int,
    num_topk: int,
    hidden: int,
    intermediate: int,
    *,
    ep_rank: int = 0,
    ep_size: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
) -> FusedMoEConfig:
    """A ``FusedMoEConfig`` for an EP layer of ``num_experts / ep_size`` local experts."""
    parallel = FusedMoEParallelConfig(
        tp_size=1, tp_rank=0, pcp_size=1, pcp_rank=0,
        dp_size=ep_size, dp_rank=ep_rank, ep_size=ep_size, ep_rank=ep_rank, sp_size=1,
        use_ep=ep_size > 1, all2all_backend="deepep_v2", enable_eplb=False,
    )
    return FusedMoEConfig(
        num_experts=num_experts,
        experts_per_token=num_topk,
        hidden_dim=hidden,
        intermediate_size=intermediate,
        num_local_experts=num_experts // ep_size,
        num_logical_experts=num_experts,
        activation=MoEActivation.SILU,
        device=device,
        routing_method=RoutingMethodType.TopK,
        moe_parallel_config=parallel,
        in_dtype=dtype,
    )


def block_fp8_quant_config() -> FusedMoEQuantConfig:
    """Block-fp8 activations (1×128 groups) with unquantized (bf16) weights given to the experts."""
    return FusedMoEQuantConfig.make(torch.float8_e4m3fn, block_shape=[FP8_BLOCK, FP8_BLOCK], weight_dtype=None)


class TorchGatedExperts(mk.FusedMoEExpertsModular):
    """SiLU-gated experts in plain torch (float32 compute, bf16 out).

    Weights are vLLM's layout: ``w1`` [EL, 2·I, H] (gate rows then up rows),
    ``w2`` [EL, H, I]. ``topk_ids`` are global ids; ``expert_map`` [E] maps them
    to local slots (−1: elsewhere). ``reduce=True`` weights and reduces itself
    ([rows, H] out) and reports ``TopKWeightAndReduceNoOP``.
    """

    def __init__(
        self,
        moe_config: FusedMoEConfig,
        quant_config: FusedMoEQuantConfig = FUSED_MOE_UNQUANTIZED_CONFIG,
        *,
        reduce: bool = False,
    ) -> None:
        super().__init__(moe_config, quant_config)
        self.reduce = reduce

    @staticmethod
    def activation_format() -> mk.FusedMoEActivationFormat:
        # Lanes at -1 contribute zeros, so padding rows (every lane -1) are
        # safe: the adapter's format (PaddedStandard on vLLM >= 0.34).
        return deepep_activation_format()

    @staticmethod
    def _supports_current_device() -> bool:
        return True

    @staticmethod
    def _supports_no_act_and_mul() -> bool:
        return False

    @staticmethod
    def _supports_quant_scheme(weight_key, activation_key) -> bool:
        return True

    @staticmethod
    def _supports_activation(activation: MoEActivation) -> bool:
        return activation == MoEActivation.SILU

    @staticmethod
    def _supports_parallel_config(moe_parallel_config: FusedMoEParallelConfig) -> bool:
        return True

    def workspace_shapes(self, M, N, K, topk, global_num_experts, local_num_experts, expert_tokens_meta, activation):
        out = (M, K) if self.reduce else (M, topk, K)
        return (0,), (0,), out

    def finalize_weight_and_reduce_impl(self) -> mk.TopKWeightAndReduce:
        return TopKWeightAndReduceNoOP() if self.reduce else TopKWeightAndReduceDelegate()

    def apply(
        self,
        output: torch.Tensor,
        hidden_states: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        activation: MoEActivation,
        global_num_experts: int,
        expert_map: Optional[torch.Tensor],
        a1q_scale: Optional[torch.Tensor],
        a2_scale: Optional[torch.Tensor],
        workspace13: torch.Tensor,
        workspace2: torch.Tensor,
        expert_tokens_meta: Optional[mk.ExpertTokensMetadata],
        apply_router_weight_on_input: bool,
    ) -> None:
        if hidden_states.dtype == torch.float8_e4m3fn:
            x = dequantize_block_fp8(hidden_states, a1q_scale, torch.float32)
        else:
            x = hidden_states.float()
        num_local = w1.shape[0]
        inter = w1.shape[1] // 2
        if expert_map is not None:
            local = torch.where(topk_ids >= 0, expert_map[topk_ids.clamp(min=0)], -1)
        else:
            local = topk_ids
        out = x.new_zeros(topk_ids.shape + (x.shape[1],))
        for j in range(num_local):
            w_gate = w1[j, :inter].float()
            w_up = w1[j, inter:].float()
            y = (torch.nn.functional.silu(x @ w_gate.t()) * (x @ w_up.t())) @ w2[j].float().t()
            out = out + (local == j).unsqueeze(-1) * y.unsqueeze(1)
        if self.reduce:
            w = topk_weights.float().unsqueeze(-1)
            out = out.sum(dim=1) if apply_router_weight_on_input else (out * w).sum(dim=1)
        output.copy_(out.to(output.dtype))


def gated_expert_weights(num_experts: int, hidden: int, intermediate: int, *, seed: int = 0):
    """Random bf16 weights in vLLM's layout: ``w1`` [E, 2·I, H] (gate rows, then up), ``w2`` [E, H, I].

    Scaled by 1/sqrt(fan-in) so activations stay O(1) through the SiLU-gated MLP.
    """
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(num_experts, 2 * intermediate, hidden, generator=g) / hidden**0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, intermediate, generator=g) / intermediate**0.5).bfloat16()
    return w1, w2


def expert_map_for(num_experts: int, rank: int, num_ranks: int, device="cpu") -> torch.Tensor:
    """vLLM's EP ``expert_map``: [E] int32, local slot of each global expert, −1 elsewhere."""
    num_local = num_experts // num_ranks
    m = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
    m[rank * num_local:(rank + 1) * num_local] = torch.arange(num_local, dtype=torch.int32, device=device)
    return m


def build_modular_kernel(buffer, num_experts: int, num_topk: int, hidden: int, intermediate: int, *,
                         decode: bool, quant_config: Optional[FusedMoEQuantConfig] = None,
                         reduce: bool = False, sp_size: int = 1, asynchronous: bool = True):
    """``(FusedMoEKernel, adapter)``: vLLM's modular kernel over this adapter and :class:`TorchGatedExperts`."""
    from deepep_ops.buffer import as_ep_buffer
    from deepep_ops.vllm.prepare_finalize import DeepEPV2PrepareAndFinalize

    buffer = as_ep_buffer(buffer)
    R, rank = buffer.num_ranks, buffer.rank
    adapter = DeepEPV2PrepareAndFinalize(
        buffer, num_dispatchers=R, dp_size=R, rank_expert_offset=rank * (num_experts // R),
        num_experts=num_experts, num_topk=num_topk, use_cudagraph=decode, sp_size=sp_size,
        asynchronous=asynchronous,
    )
    cfg = make_moe_config(num_experts, num_topk, hidden, intermediate, ep_rank=rank, ep_size=R)
    experts = TorchGatedExperts(cfg, quant_config or FUSED_MOE_UNQUANTIZED_CONFIG, reduce=reduce)
    return mk.FusedMoEKernel(adapter, experts), adapter
