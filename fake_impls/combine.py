"""Fake kernels of ``deepep_ops::combine`` ([T, H] bf16, T = the dispatched tokens) and
``deepep_ops::combine_into`` (writes ``out`` in place, returns nothing)."""

from __future__ import annotations

import torch


@torch.library.register_fake("deepep_ops::combine")
def combine_fake(x, topk_idx, psum_rank, psum_expert, num_unaligned, recv_src_metadata, dst_buffer_slot_idx,
                 buffer, num_experts, num_max_tokens_per_rank, expert_alignment, do_expand, num_expanded_tokens):
    return x.new_empty((topk_idx.shape[0], x.shape[1]), dtype=torch.bfloat16)


@torch.library.register_fake("deepep_ops::combine_into")
def combine_into_fake(out, x, topk_idx, psum_rank, psum_expert, num_unaligned, recv_src_metadata,
                      dst_buffer_slot_idx, buffer, num_experts, num_max_tokens_per_rank, expert_alignment,
                      do_expand, num_expanded_tokens):
    return None
