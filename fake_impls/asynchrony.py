"""Fake kernels of the async ops: a start returns an empty ticket, its wait what
the synchronous op returns (prefill's wait binds the unbacked N and X)."""

from __future__ import annotations

import torch

from deepep_ops.handle import DispatchArgs, DispatchHandle
from deepep_ops.pending import ticket_like
from fake_impls.combine import combine_fake, reject_meta_combine
from fake_impls.dispatch import dispatch_exact_fake, dispatch_fake, reject_meta_dispatch


def _dispatch_start_fake(op: str, decode: bool):
    def start_fake(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank,
                   expert_alignment=1):
        args = DispatchArgs(x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank,
                            expert_alignment, decode)
        reject_meta_dispatch(op, args, buffer)
        return ticket_like(x)

    return start_fake


dispatch_start_fake = _dispatch_start_fake("dispatch_start", True)
dispatch_exact_start_fake = _dispatch_start_fake("dispatch_exact_start", False)


def combine_start_fake(x, buffer, *handle):
    reject_meta_combine("combine_start", x, buffer, DispatchHandle(*handle))
    return ticket_like(x)


def dispatch_wait_fake(ticket: torch.Tensor, overlap: list, *args):
    return dispatch_fake(*args)


def dispatch_exact_wait_fake(ticket: torch.Tensor, overlap: list, *args):
    return dispatch_exact_fake(*args)


def combine_wait_fake(ticket: torch.Tensor, overlap: list, *args):
    return combine_fake(*args)
