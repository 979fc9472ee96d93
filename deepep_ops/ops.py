"""Registration of the ``deepep_ops::`` ops and their real implementations.

The real implementations validate (spec §6), call the backend through
:class:`deepep_ops.protocol.ElasticBufferBackend`, and flatten DeepEP's
``EPHandle`` into tensors; combine rebuilds the handle from them. The fake
kernels live in :mod:`fake_impls`.
"""

from __future__ import annotations

from typing import Optional

import torch

from deepep_ops import schemas
from deepep_ops.bucket import _token_bucket_impl
from deepep_ops.buffer import EPBuffer, unwrap_ep_buffer
from deepep_ops.layout import no_scales
from deepep_ops.validation import check_combine, check_dispatch

lib = torch.library.Library(schemas.NAMESPACE, "DEF")
lib.define(schemas.DISPATCH)
# Host sync + data-dependent sizes: CUDA-graph capture must leave it out.
lib.define(schemas.DISPATCH_EXACT, tags=(torch.Tag.cudagraph_unsafe,))
lib.define(schemas.COMBINE)
lib.define(schemas.COMBINE_INTO)
lib.define(schemas.TOKEN_BUCKET)


def _handle_tensors(handle) -> tuple:
    return tuple(getattr(handle, name) for name in schemas.HANDLE_TENSORS)


def _dispatch(
    op: str,
    x: torch.Tensor,
    x_scales: Optional[torch.Tensor],
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    buffer: EPBuffer,
    num_experts: int,
    num_max_tokens_per_rank: int,
    expert_alignment: int,
    exact: bool,
):
    buf = unwrap_ep_buffer(buffer)
    check_dispatch(
        op,
        x,
        x_scales,
        topk_idx,
        topk_weights,
        num_ranks=buf.num_ranks,
        capacity=buf.capacity,
        topk_idx_dtype=buf.topk_idx_dtype,
        num_experts=num_experts,
        num_max_tokens_per_rank=num_max_tokens_per_rank,
        expert_alignment=expert_alignment,
        exact=exact,
    )
    recv, recv_topk_idx, recv_topk_weights, handle, _event = buf.backend.dispatch(
        x if x_scales is None else (x, x_scales),
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        num_experts=num_experts,
        num_max_tokens_per_rank=num_max_tokens_per_rank,
        expert_alignment=expert_alignment,
        # The graph keeps topk_idx alive until combine, which takes it as an input.
        do_handle_copy=False,
        do_cpu_sync=exact,
        do_expand=exact,
        # Zeroed padding rows keep garbage (NaN/Inf) out of expert compute.
        do_zero_padding=exact,
    )
    recv_x, recv_x_scales = recv if isinstance(recv, tuple) else (recv, no_scales(x))
    if exact:
        counts = torch.tensor(handle.num_recv_tokens_per_expert_list, dtype=torch.int32, device=x.device)
        sizes = (handle.recv_src_metadata.shape[0], recv_x.shape[0])  # N received tokens, X expanded rows
        return sizes + (recv_x, recv_x_scales, recv_topk_weights, counts) + _handle_tensors(handle)
    return (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights) + _handle_tensors(handle)


# register_kernel (not library.impl) wraps each kernel in torch._disable_dynamo:
# when a deepep op runs eagerly while Dynamo's frame hook is live (code after a
# graph break inside a compiled function), Dynamo must not try to trace the
# kernel's own Python frame, which handles the real buffer behind the opaque
# EPBuffer and fails as a hard error when traced.
@torch.library.register_kernel("deepep_ops::dispatch", None, lib=lib)
def dispatch_impl(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment=1):
    return _dispatch(
        "deepep_ops.dispatch", x, x_scales, topk_idx, topk_weights, buffer,
        num_experts, num_max_tokens_per_rank, expert_alignment, exact=False,
    )


@torch.library.register_kernel("deepep_ops::dispatch_exact", None, lib=lib)
def dispatch_exact_impl(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment=1):
    return _dispatch(
        "deepep_ops.dispatch_exact", x, x_scales, topk_idx, topk_weights, buffer,
        num_experts, num_max_tokens_per_rank, expert_alignment, exact=True,
    )


def run_combine(
    op: str,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    psum_rank: torch.Tensor,
    psum_expert: torch.Tensor,
    num_unaligned: torch.Tensor,
    recv_src_metadata: torch.Tensor,
    dst_buffer_slot_idx: torch.Tensor,
    buffer: EPBuffer,
    num_experts: int,
    num_max_tokens_per_rank: int,
    expert_alignment: int,
    do_expand: bool,
    num_expanded_tokens: int,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Validate, rebuild the backend's ``EPHandle`` and call ``backend.combine``.

    With ``out`` the result lands there: written directly by backends that can
    (``combine_writes_out``), copied once otherwise.
    """
    buf = unwrap_ep_buffer(buffer)
    check_combine(
        op, x, topk_idx, psum_rank, psum_expert, num_unaligned, recv_src_metadata, dst_buffer_slot_idx,
        num_ranks=buf.num_ranks, num_experts=num_experts, num_max_tokens_per_rank=num_max_tokens_per_rank,
        do_expand=do_expand, num_expanded_tokens=num_expanded_tokens, out=out,
    )
    handle = buf.handle_class(
        do_expand,
        num_experts,
        expert_alignment,
        num_max_tokens_per_rank,
        # Dispatch ran with num_sms=0, i.e. this (cached) value; combine must match it.
        buf.backend.get_theoretical_num_sms(num_experts, topk_idx.shape[1]),
        topk_idx,
        recv_src_metadata.shape[0],
        num_expanded_tokens,
        [],  # the host-side per-expert list is only read by cached dispatch, not combine
        psum_rank,
        psum_expert,
        num_unaligned,
        recv_src_metadata,
        dst_buffer_slot_idx,
        None,  # token_metadata_at_forward: hybrid mode only
        None,  # channel_linked_list: hybrid mode only
    )
    if out is not None and getattr(buf.backend, "combine_writes_out", False):
        buf.backend.combine(x, handle=handle, out=out)
        return out
    combined_x, _combined_weights, _event = buf.backend.combine(x, handle=handle)
    if out is not None:
        # deep_ep's combine allocates its result; one copy, inside the op.
        out.copy_(combined_x)
        return out
    return combined_x


@torch.library.register_kernel("deepep_ops::combine", None, lib=lib)
def combine_impl(x, topk_idx, psum_rank, psum_expert, num_unaligned, recv_src_metadata, dst_buffer_slot_idx,
                 buffer, num_experts, num_max_tokens_per_rank, expert_alignment, do_expand, num_expanded_tokens):
    return run_combine(
        "deepep_ops.combine", x, topk_idx, psum_rank, psum_expert, num_unaligned, recv_src_metadata,
        dst_buffer_slot_idx, buffer, num_experts, num_max_tokens_per_rank, expert_alignment, do_expand,
        num_expanded_tokens,
    )


@torch.library.register_kernel("deepep_ops::combine_into", None, lib=lib)
def combine_into_impl(out, x, topk_idx, psum_rank, psum_expert, num_unaligned, recv_src_metadata,
                      dst_buffer_slot_idx, buffer, num_experts, num_max_tokens_per_rank, expert_alignment,
                      do_expand, num_expanded_tokens):
    run_combine(
        "deepep_ops.combine_into", x, topk_idx, psum_rank, psum_expert, num_unaligned, recv_src_metadata,
        dst_buffer_slot_idx, buffer, num_experts, num_max_tokens_per_rank, expert_alignment, do_expand,
        num_expanded_tokens, out=out,
    )


@torch.library.register_kernel("deepep_ops::token_bucket", None, lib=lib)
def token_bucket_impl(tokens, capacity):
    return _token_bucket_impl(tokens.shape[0], capacity)
