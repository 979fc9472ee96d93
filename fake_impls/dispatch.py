"""Fake kernels of ``deepep_ops::dispatch`` and ``deepep_ops::dispatch_exact``.

Shapes, dtypes and strides are those real DeepEP v2 returns (docs/deepep_contract.md §2, §3,
§8); every output is contiguous (row-major scales: ``use_tma_aligned_col_major_sf``
is not exposed). The handle tensors and the order of the outputs come from the
codec in :mod:`deepep_ops.handle`; in hybrid mode (§9) their shapes follow the
buffer's EP domain (S, U) and the backend's channel count C, all static.
"""

from __future__ import annotations

import torch

from deepep_ops.agreement import agree_dispatch
from deepep_ops.buffer import unwrap_ep_buffer
from deepep_ops.handle import DispatchArgs, HandleDims, empty_handle_tensors, empty_hybrid_tensors, pack_dispatch
from deepep_ops.layout import (
    decode_num_expanded_tokens,
    decode_num_recv_tokens,
    num_local_experts,
)
from fake_impls._eager_meta import reject_eager_meta


def _recv_scales(x, x_scales, rows):
    if x_scales is None:
        return None
    return x_scales.new_empty((rows, x_scales.shape[1]))


def reject_meta_dispatch(op: str, args: DispatchArgs, buffer) -> None:
    # Meta tensors are host-side: the CPU default of check mode applies (the peers,
    # with CPU tensors, exchange on every call; agree-once mode would raise here alone).
    reject_eager_meta(op, args.x, args.topk_idx, args.topk_weights, agree=lambda error: agree_dispatch(
        f"deepep_ops.{op}", unwrap_ep_buffer(buffer), args, error, device=torch.device("cpu")))


def _dims(buf, args: DispatchArgs, num_recv_tokens) -> HandleDims:
    """The handle's sizes: the buffer's domain (S, U) and, in hybrid mode, the
    backend's C for this call (static: no new symbol)."""
    T, K = args.topk_idx.shape
    num_ranks = buf.num_ranks
    return HandleDims(
        num_ranks, num_local_experts(args.num_experts, num_ranks), num_recv_tokens, T, K,
        args.num_max_tokens_per_rank, buf.num_scaleout_ranks, buf.num_scaleup_ranks, buf.num_channels(args),
    )


def dispatch_fake(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment=1):
    """Decode mode: R·M rows, a pure function of the SymInt M."""
    args = DispatchArgs(x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank, expert_alignment, True)
    reject_meta_dispatch("dispatch", args, buffer)
    buf = unwrap_ep_buffer(buffer)
    num_ranks = buf.num_ranks
    rows = decode_num_recv_tokens(num_ranks, num_max_tokens_per_rank)
    T, K = topk_idx.shape
    dims = _dims(buf, args, rows)
    return pack_dispatch(
        True,
        x.new_empty((rows, x.shape[1])),
        _recv_scales(x, x_scales, rows),
        topk_idx.new_empty((rows, K)),
        topk_weights.new_empty((rows, K)),
        empty_handle_tensors(x, dims, decode=True),
        expert_alignment,
        hybrid_tensors=empty_hybrid_tensors(x, dims),
    )


def dispatch_exact_fake(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment=1):
    """Prefill mode: N received tokens and X expanded rows are unbacked SymInts,
    returned first (see ``schemas.DISPATCH_EXACT``) and then used as tensor sizes.

    Bounds: 0 <= N <= R·M; each received token has a local expert, so N <= X;
    X is at most the worst case of decode mode.
    """
    args = DispatchArgs(x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank, expert_alignment, False)
    reject_meta_dispatch("dispatch_exact", args, buffer)
    buf = unwrap_ep_buffer(buffer)
    num_ranks = buf.num_ranks
    T, K = topk_idx.shape
    ctx = torch.library.get_ctx()
    num_recv = ctx.new_dynamic_size()
    num_expanded = ctx.new_dynamic_size()
    torch._check(num_recv <= decode_num_recv_tokens(num_ranks, num_max_tokens_per_rank))
    torch._check(num_recv <= num_expanded)
    torch._check(
        num_expanded
        <= decode_num_expanded_tokens(num_ranks, num_max_tokens_per_rank, K, num_experts, expert_alignment)
    )
    num_local = num_local_experts(num_experts, num_ranks)
    dims = _dims(buf, args, num_recv)
    return pack_dispatch(
        False,
        x.new_empty((num_expanded, x.shape[1])),
        _recv_scales(x, x_scales, num_expanded),
        None,
        topk_weights.new_empty((num_expanded,)),
        empty_handle_tensors(x, dims, decode=False),
        expert_alignment,
        num_recv_tokens_per_expert=x.new_empty((num_local,), dtype=torch.int32),
        hybrid_tensors=empty_hybrid_tensors(x, dims),
    )
