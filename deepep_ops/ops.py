"""Registration of the ``deepep_ops::`` ops and their real kernels.

Each kernel validates (spec §6, :mod:`deepep_ops.validation`), calls the
buffer's :class:`~deepep_ops.backends.Backend`, and packs plain tensors and
sizes into the op's outputs; the handle's layout comes from the codec in
:mod:`deepep_ops.handle`. The fake kernels live in :mod:`fake_impls`.
"""

from __future__ import annotations

from typing import Optional

import torch

from deepep_ops import schemas
from deepep_ops._torch_compat import without_dynamo
from deepep_ops.buffer import EPBuffer, unwrap_ep_buffer
from deepep_ops.handle import HANDLE_TENSORS, DispatchedHandle, DispatchHandle
from deepep_ops.layout import no_scales
from deepep_ops.validation import check_combine, check_combine_rows, check_dispatch

lib = torch.library.Library(schemas.NAMESPACE, "DEF")
lib.define(schemas.DISPATCH)
# Host sync + data-dependent sizes: CUDA-graph capture must leave it out.
lib.define(schemas.DISPATCH_EXACT, tags=(torch.Tag.cudagraph_unsafe,))
lib.define(schemas.COMBINE)
lib.define(schemas.COMBINE_INTO)
lib.define(schemas.TOKEN_BUCKET)


_RECV_SRC_METADATA = HANDLE_TENSORS.index("recv_src_metadata")


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
    scales_placeholder: bool = True,
    with_native: bool = False,
) -> tuple:
    """Validate, dispatch, pack the op's outputs (see ``schemas.DISPATCH*``).

    ``scales_placeholder=False`` (the eager fast path of :mod:`deepep_ops.api`,
    which drops the scales without ``x_scales``) returns None for missing scales
    instead of the op's empty placeholder tensor, an allocation saved;
    ``with_native=True`` returns ``(outputs, the backend's native handle)``.
    """
    buf = unwrap_ep_buffer(buffer)
    check_dispatch(
        op, x, x_scales, topk_idx, topk_weights,
        num_ranks=buf.num_ranks, capacity=buf.capacity, topk_idx_dtype=buf.topk_idx_dtype,
        num_experts=num_experts, num_max_tokens_per_rank=num_max_tokens_per_rank,
        expert_alignment=expert_alignment, exact=exact,
    )
    out = buf.backend.dispatch(
        x, x_scales, topk_idx, topk_weights,
        num_experts=num_experts, num_max_tokens_per_rank=num_max_tokens_per_rank,
        expert_alignment=expert_alignment, expand=exact,
    )
    recv_x_scales = out.recv_x_scales
    if recv_x_scales is None and scales_placeholder:
        recv_x_scales = no_scales(x)
    if exact:
        counts = torch.tensor(out.num_recv_tokens_per_expert, dtype=torch.int32, device=x.device)
        # N received tokens (rows of recv_src_metadata), X expanded rows.
        sizes = (out.handle_tensors[_RECV_SRC_METADATA].shape[0], out.recv_x.shape[0])
        flat = sizes + (out.recv_x, recv_x_scales, out.recv_topk_weights, counts) + out.handle_tensors
    else:
        flat = (out.recv_x, recv_x_scales, out.recv_topk_idx, out.recv_topk_weights) + out.handle_tensors
    return (flat, out.native_handle) if with_native else flat


def _kernel(op: str):
    """Register the decorated function as ``op``'s kernel for every device.

    Each kernel runs with Dynamo's frame hook off: when an op runs eagerly while
    the hook is live (code after a graph break inside a compiled function),
    Dynamo must not trace the kernel's own Python frames, which handle the real
    buffer behind the opaque EPBuffer and fail as a hard error when traced.
    ``torch.library.register_kernel`` does the same through
    ``torch._disable_dynamo``, which costs ~9 µs a call (bench_op_overhead.py);
    :func:`~deepep_ops._torch_compat.without_dynamo` costs ~0.3 µs.
    """

    def register(fn):
        lib.impl(op, without_dynamo(fn), "CompositeExplicitAutograd")
        return fn

    return register


@_kernel("dispatch")
def dispatch_impl(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment=1):
    return _dispatch(
        "deepep_ops.dispatch", x, x_scales, topk_idx, topk_weights, buffer,
        num_experts, num_max_tokens_per_rank, expert_alignment, exact=False,
    )


@_kernel("dispatch_exact")
def dispatch_exact_impl(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment=1):
    return _dispatch(
        "deepep_ops.dispatch_exact", x, x_scales, topk_idx, topk_weights, buffer,
        num_experts, num_max_tokens_per_rank, expert_alignment, exact=True,
    )


def run_combine(
    op: str, x: torch.Tensor, buffer: EPBuffer, handle: DispatchHandle, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Validate and call the backend's combine (into ``out`` when given).

    A :class:`~deepep_ops.handle.DispatchedHandle` (eager dispatch's own, unedited)
    has its tensors checked already: only ``x`` and ``out`` are checked against it.
    """
    buf = unwrap_ep_buffer(buffer)
    if type(handle) is DispatchedHandle:
        check_combine_rows(op, x, handle, num_ranks=buf.num_ranks, out=out)
    else:
        check_combine(op, x, handle, num_ranks=buf.num_ranks, out=out)
    return buf.backend.combine(x, handle, out=out)


@_kernel("combine")
def combine_impl(x, buffer, *handle):
    return run_combine("deepep_ops.combine", x, buffer, DispatchHandle(*handle))


@_kernel("combine_into")
def combine_into_impl(out, x, buffer, *handle):
    run_combine("deepep_ops.combine_into", x, buffer, DispatchHandle(*handle), out=out)


@_kernel("token_bucket")
def token_bucket_impl(tokens, buffer):
    return unwrap_ep_buffer(buffer).bucket(tokens.shape[0])


# ---------------------------------------------------------------------------
# Eager fast path: the kernels without the dispatcher.
#
# A Python kernel behind torch.ops costs ~5 µs of dispatcher work per call
# (argument boxing against the schema, the autograd fallback, unboxing eleven
# outputs; bench_op_overhead.py), as much as the rest of the op layer. When the
# dispatcher would do nothing but call the kernel (deepep_ops._torch_compat
# .dispatcher_is_a_no_op: not tracing, no modes, no autograd), the wrappers in
# deepep_ops.api call these instead. Same kernels, same checks, same outputs.
# ---------------------------------------------------------------------------


@without_dynamo
def eager_dispatch(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank,
                   expert_alignment) -> tuple:
    """(``deepep_ops::dispatch``'s outputs, recv_x_scales None without ``x_scales``;
    the backend's native handle)."""
    return _dispatch(
        "deepep_ops.dispatch", x, x_scales, topk_idx, topk_weights, buffer,
        num_experts, num_max_tokens_per_rank, expert_alignment, exact=False, scales_placeholder=False,
        with_native=True,
    )


@without_dynamo
def eager_dispatch_exact(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank,
                         expert_alignment) -> tuple:
    """As :func:`eager_dispatch` for ``deepep_ops::dispatch_exact``."""
    return _dispatch(
        "deepep_ops.dispatch_exact", x, x_scales, topk_idx, topk_weights, buffer,
        num_experts, num_max_tokens_per_rank, expert_alignment, exact=True, scales_placeholder=False,
        with_native=True,
    )


#: ``deepep_ops::combine`` / ``combine_into`` (with ``out``) as one call.
eager_combine = without_dynamo(run_combine)
