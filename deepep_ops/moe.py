"""A small expert-parallel MoE layer over :class:`DeepEPPrepareFinalize`.

Torch-native throughout (router, gated-MLP experts, weighting), so the whole
layer compiles with ``fullgraph=True``. Used by the demo, the benchmarks and
the compile tests; :func:`dense_moe` is the single-process answer it must give.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from deepep_ops.layout import IntLike
from deepep_ops.prepare_finalize import DeepEPPrepareFinalize, dequantize_block_fp8



class MoEWeights(NamedTuple):
    """All experts' weights, float32: router [H, E], gate/up [E, H, I], down [E, I, H]."""

    router: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor


def make_moe_weights(num_experts: int, hidden: int, intermediate: int, seed: int = 0) -> MoEWeights:
    """Deterministic weights, identical on every rank for the same arguments."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, fan_in: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / fan_in**0.5

    return MoEWeights(
        rand(hidden, num_experts, fan_in=hidden),
        rand(num_experts, hidden, intermediate, fan_in=hidden),
        rand(num_experts, hidden, intermediate, fan_in=hidden),
        rand(num_experts, intermediate, hidden, fan_in=intermediate),
    )


def route(x: torch.Tensor, router: torch.Tensor, num_topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing: ([T, K] float32 renormalized weights, [T, K] int64 ids)."""
    probs = torch.softmax(x.float() @ router, dim=-1)
    weights, ids = torch.topk(probs, num_topk, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def expert_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """SiLU-gated MLP in float32: [n, H] → [n, H]."""
    return (torch.nn.functional.silu(x @ w_gate) * (x @ w_up)) @ w_down


class SharedWeights(NamedTuple):
    """A shared expert's weights (DeepSeek / Qwen-MoE style), float32: gate/up [H, Is], down [Is, H]."""

    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor


def make_shared_weights(hidden: int, intermediate: int, seed: int = 1) -> SharedWeights:
    """Deterministic shared-expert weights, identical on every rank for the same arguments."""
    g = torch.Generator().manual_seed(seed)
    return SharedWeights(
        torch.randn(hidden, intermediate, generator=g) / hidden**0.5,
        torch.randn(hidden, intermediate, generator=g) / hidden**0.5,
        torch.randn(intermediate, hidden, generator=g) / intermediate**0.5,
    )


def dense_moe(
    x: torch.Tensor, weights: MoEWeights, num_topk: int, shared: Optional[SharedWeights] = None
) -> torch.Tensor:
    """The whole MoE on one process in float32: Σ_k w[t,k]·expert_{id[t,k]}(x[t])
    (+ the shared expert's output on x[t]), as bf16."""
    topk_w, topk_ids = route(x, weights.router, num_topk)
    xf = x.float()
    out = torch.zeros_like(xf) if shared is None else expert_mlp(xf, *shared)
    for e in range(weights.router.shape[1]):
        w_e = torch.where(topk_ids == e, topk_w, 0.0).sum(dim=1, keepdim=True)
        out += w_e * expert_mlp(xf, weights.w_gate[e], weights.w_up[e], weights.w_down[e])
    return out.to(torch.bfloat16)


class LocalExperts(torch.nn.Module):
    """This rank's experts, applied to every received row (static shapes, no sorting).

    Output is [rows, k, H] bf16 with zeros where ``topk_ids`` is not one of ours.
    """

    def __init__(self, weights: MoEWeights, first_expert: int, num_local: int) -> None:
        super().__init__()
        sl = slice(first_expert, first_expert + num_local)
        self.w_gate = torch.nn.Parameter(weights.w_gate[sl].clone(), requires_grad=False)
        self.w_up = torch.nn.Parameter(weights.w_up[sl].clone(), requires_grad=False)
        self.w_down = torch.nn.Parameter(weights.w_down[sl].clone(), requires_grad=False)
        self.num_local = num_local

    def forward(
        self,
        x: torch.Tensor,
        x_scale: Optional[torch.Tensor],
        topk_ids: torch.Tensor,
        rank_expert_offset: torch.Tensor,
    ) -> torch.Tensor:
        xf = x.float() if x_scale is None else dequantize_block_fp8(x, x_scale, torch.float32)
        rows, hidden = xf.shape
        num_local, inter = self.num_local, self.w_gate.shape[2]
        # Every local expert's gate and up projections in one [rows, H] @ [H, EL*I]
        # product each, then per expert one [rows, I] @ [I, H] written into the
        # lanes routed to it (one where per expert), instead of EL whole MLPs
        # masked into [rows, k, H] with a multiply and an add each (1.4x faster
        # on CPU at 2048 rows). Inductor must take a data-dependent (prefill) row
        # count here, forward and backward, torch 2.13-2.15: one bmm over the
        # experts failed (its lowering guards on the row count), and so did a
        # stack + index_select gather under torch 2.15's checkpointed backward
        # (generated code read an unbacked size before binding it).
        gate = xf @ self.w_gate.permute(1, 0, 2).reshape(hidden, num_local * inter)
        up = xf @ self.w_up.permute(1, 0, 2).reshape(hidden, num_local * inter)
        act = (torch.nn.functional.silu(gate) * up).view(rows, num_local, inter)
        local_ids = topk_ids - rank_expert_offset
        out = xf.new_zeros(topk_ids.shape + (hidden,))
        for j in range(num_local):
            y = act[:, j] @ self.w_down[j]
            out = torch.where((local_ids == j).unsqueeze(-1), y.unsqueeze(1), out)
        return out.to(torch.bfloat16)


class SharedExpert(torch.nn.Module):
    """A shared expert as a module (frozen copies of ``weights``): [T, H] → [T, H] float32.

    Named parameters, not a ParameterList: torch 2.11's Dynamo cannot unpack
    ``*parameter_list`` (an internal NotImplementedError under fullgraph=True)."""

    def __init__(self, weights: SharedWeights) -> None:
        super().__init__()
        for name, w in zip(SharedWeights._fields, weights):
            self.register_parameter(name, torch.nn.Parameter(w.clone(), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return expert_mlp(x.float(), self.w_gate, self.w_up, self.w_down)


class MoELayer(torch.nn.Module):
    """router → prepare (dispatch) → local experts → finalize (combine), plus an
    optional shared expert on the layer's own tokens.

    With ``shared`` and ``overlap=True`` the shared expert runs while the tokens
    are in flight (:meth:`DeepEPPrepareFinalize.prepare_start`, the shared expert,
    :meth:`~DeepEPPrepareFinalize.prepare_wait`): no gradient (the async ops have
    none). Otherwise it runs after the combine.
    """

    def __init__(
        self,
        weights: MoEWeights,
        prepare_finalize: DeepEPPrepareFinalize,
        shared: Optional[SharedWeights] = None,
        overlap: bool = False,
    ) -> None:
        super().__init__()
        pf = prepare_finalize
        self.pf = pf
        self.register_buffer("router", weights.router.clone())
        self.experts = LocalExperts(weights, pf.buffer.rank * pf.num_local_experts, pf.num_local_experts)
        if overlap and shared is None:
            raise ValueError("MoELayer: overlap=True needs a shared expert (shared=...) to overlap")
        self.overlap = overlap
        self.shared = None if shared is None else SharedExpert(shared)

    def _shared_expert(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H] bf16 → [T, H] float32."""
        return self.shared(x)

    def forward(self, x: torch.Tensor, num_max_tokens_per_rank: Optional[IntLike] = None) -> torch.Tensor:
        """x [T, H] bf16 → [T, H] bf16. ``num_max_tokens_per_rank``: see ``prepare``."""
        topk_weights, topk_ids = route(x, self.router, self.pf.num_topk)
        if self.overlap:
            pending = self.pf.prepare_start(x, topk_weights, topk_ids, num_max_tokens_per_rank=num_max_tokens_per_rank)
            shared = self._shared_expert(x)
            p = self.pf.prepare_wait(pending, overlap=[shared])
        else:
            p = self.pf.prepare(x, topk_weights, topk_ids, num_max_tokens_per_rank=num_max_tokens_per_rank)
        y = self.experts(p.expert_x, p.expert_x_scale, p.topk_ids, self.pf.rank_expert_offset)
        out = torch.empty_like(x)
        self.pf.finalize(out, y, p.topk_weights, p.topk_ids, p.handle)
        if self.shared is None:
            return out
        if not self.overlap:
            shared = self._shared_expert(x)
        return (out.float() + shared).to(torch.bfloat16)
