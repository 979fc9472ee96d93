"""Fake kernels of ``deepep_ops::dispatch`` and ``deepep_ops::dispatch_exact``.

Shapes, dtypes and strides are those real DeepEP v2 returns (spec §2, §3, §8);
every output is contiguous (row-major scales: ``use_tma_aligned_col_major_sf``
is not exposed).
"""

from __future__ import annotations

import torch

from deepep_ops.buffer import unwrap_ep_buffer
from deepep_ops.layout import (
    decode_num_expanded_tokens,
    decode_num_recv_tokens,
    no_scales,
    num_local_experts,
    recv_src_metadata_cols,
)


def _handle_outputs(x, topk_idx, num_ranks, num_local, num_rows, psum_expert_offset=0):
    """psum per rank [R], psum per expert [EL], unaligned counts [EL],
    recv_src_metadata [rows, K+2], dst_buffer_slot_idx [T, K]; all int32.

    ``psum_expert_offset=1`` (decode mode): DeepEP returns the per-expert psum as
    a view at storage offset 1 of an [EL+1] buffer (spec §3), and so does the reference.
    """
    T, K = topk_idx.shape
    i32 = torch.int32
    psum_expert = x.new_empty((num_local + psum_expert_offset,), dtype=i32)[psum_expert_offset:]
    return (
        x.new_empty((num_ranks,), dtype=i32),
        psum_expert,
        x.new_empty((num_local,), dtype=i32),
        x.new_empty((num_rows, recv_src_metadata_cols(K)), dtype=i32),
        x.new_empty((T, K), dtype=i32),
    )


def _recv_scales(x, x_scales, rows):
    if x_scales is None:
        return no_scales(x)
    return x_scales.new_empty((rows, x_scales.shape[1]))


@torch.library.register_fake("deepep_ops::dispatch")
def dispatch_fake(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment=1):
    """Decode mode: R·M rows, a pure function of the SymInt M."""
    num_ranks = unwrap_ep_buffer(buffer).num_ranks
    rows = decode_num_recv_tokens(num_ranks, num_max_tokens_per_rank)
    K = topk_idx.shape[1]
    return (
        x.new_empty((rows, x.shape[1])),
        _recv_scales(x, x_scales, rows),
        topk_idx.new_empty((rows, K)),
        topk_weights.new_empty((rows, K)),
    ) + _handle_outputs(x, topk_idx, num_ranks, num_local_experts(num_experts, num_ranks), rows, psum_expert_offset=1)


@torch.library.register_fake("deepep_ops::dispatch_exact")
def dispatch_exact_fake(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment=1):
    """Prefill mode: N received tokens and X expanded rows are unbacked SymInts,
    returned first (see ``schemas.DISPATCH_EXACT``) and then used as tensor sizes.

    Bounds: 0 <= N <= R·M; each received token has a local expert, so N <= X;
    X is at most the worst case of decode mode.
    """
    num_ranks = unwrap_ep_buffer(buffer).num_ranks
    K = topk_idx.shape[1]
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
    return (
        num_recv,
        num_expanded,
        x.new_empty((num_expanded, x.shape[1])),
        _recv_scales(x, x_scales, num_expanded),
        topk_weights.new_empty((num_expanded,)),
        x.new_empty((num_local,), dtype=torch.int32),
    ) + _handle_outputs(x, topk_idx, num_ranks, num_local, num_recv)
