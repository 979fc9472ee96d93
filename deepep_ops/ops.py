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
from deepep_ops.agreement import COMBINE_FIELDS, DISPATCH_FIELDS, combine_signature, dispatch_signature
from deepep_ops.buffer import EPBuffer, unwrap_ep_buffer
from deepep_ops.handle import HANDLE_TENSORS, DispatchedHandle, DispatchHandle
from deepep_ops.layout import no_scales
from deepep_ops.validation import (
    check_cached_dispatch,
    check_combine,
    check_combine_rows,
    check_combine_with_weights,
    check_dispatch,
    check_token_bucket,
)

lib = torch.library.Library(schemas.NAMESPACE, "DEF")
lib.define(schemas.DISPATCH)
# Host sync + data-dependent sizes: CUDA-graph capture must leave it out.
lib.define(schemas.DISPATCH_EXACT, tags=(torch.Tag.cudagraph_unsafe,))
lib.define(schemas.COMBINE)
lib.define(schemas.COMBINE_INTO)
lib.define(schemas.TOKEN_BUCKET)
lib.define(schemas.CACHED_DISPATCH)
lib.define(schemas.COMBINE_WITH_WEIGHTS)


_RECV_SRC_METADATA = HANDLE_TENSORS.index("recv_src_metadata")


def _device_of(x: object) -> torch.device:
    """x's device (CPU for a non-tensor: its validation error reports it)."""
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D, ``is_contiguous()``) as a view with row-major strides.

    ``is_contiguous()`` ignores the strides of size-1 and empty dims: K=1 weights
    from ``torch.topk(...).values * c`` with T=0 have strides (1, 0), which byte
    views (and DeepEP's pointer arithmetic) reject. Same elements, no copy.
    """
    rows, cols = t.shape
    if t.stride(1) == 1 and (t.stride(0) == cols or rows <= 1):
        return t
    return t.as_strided((rows, cols), (cols, 1))


def _check_and_agree(op: str, buf: EPBuffer, kind: str, fields: tuple, signature: tuple,
                     device: torch.device, check, *args, **kwargs) -> None:
    """Run this rank's ``check(op, *args, **kwargs)``, then agree with every rank
    (:mod:`deepep_ops.agreement`): all raise together, before the payload collective."""
    error = None
    try:
        check(op, *args, **kwargs)
    except (ValueError, TypeError) as e:
        error = e
    buf.agreement.agree(op, kind, fields, signature, error, device)


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
    """Validate and agree, dispatch, pack the op's outputs (see ``schemas.DISPATCH*``).

    ``scales_placeholder=False`` (the eager fast path of :mod:`deepep_ops.api`,
    which drops the scales without ``x_scales``) returns None for missing scales
    instead of the op's empty placeholder tensor, an allocation saved;
    ``with_native=True`` returns ``(outputs, the backend's native handle)``.
    """
    buf = unwrap_ep_buffer(buffer)
    _check_and_agree(
        op, buf, "dispatch", DISPATCH_FIELDS,
        dispatch_signature(x, x_scales, topk_idx, num_experts, num_max_tokens_per_rank, expert_alignment, exact),
        _device_of(x), check_dispatch, x, x_scales, topk_idx, topk_weights,
        num_ranks=buf.num_ranks, capacity=buf.capacity, topk_idx_dtype=buf.topk_idx_dtype,
        num_experts=num_experts, num_max_tokens_per_rank=num_max_tokens_per_rank,
        expert_alignment=expert_alignment, exact=exact,
    )
    x, topk_idx, topk_weights = _row_major(x), _row_major(topk_idx), _row_major(topk_weights)
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
    """Validate and agree, then call the backend's combine (into ``out`` when given).

    A :class:`~deepep_ops.handle.DispatchedHandle` (eager dispatch's own, unedited)
    has its tensors checked already: outside check mode only ``x`` and ``out``
    are checked against it.
    """
    buf = unwrap_ep_buffer(buffer)
    device = _device_of(x)
    check_values = buf.agreement.check_mode(device)
    if type(handle) is DispatchedHandle and not check_values:
        check, kwargs = check_combine_rows, {}
    else:
        check, kwargs = check_combine, {"check_values": check_values}
    _check_and_agree(
        op, buf, "combine", COMBINE_FIELDS, combine_signature(x, handle), device, check, x, handle,
        num_ranks=buf.num_ranks, out=out, **kwargs,
    )
    return buf.backend.combine(x, handle, out=out)


@_kernel("combine")
def combine_impl(x, buffer, *handle):
    return run_combine("deepep_ops.combine", x, buffer, DispatchHandle(*handle))


@_kernel("combine_into")
def combine_into_impl(out, x, buffer, *handle):
    run_combine("deepep_ops.combine_into", x, buffer, DispatchHandle(*handle), out=out)


@_kernel("token_bucket")
def token_bucket_impl(tokens, buffer):
    check_token_bucket(tokens)
    return unwrap_ep_buffer(buffer).bucket(tokens.shape[0])


# --- training (issue 14): the ops the backward passes call (autograd: deepep_ops.autograd) -------
@_kernel("cached_dispatch")
def cached_dispatch_impl(x, x_scales, buffer, *handle):
    handle = DispatchHandle(*handle)
    buf = unwrap_ep_buffer(buffer)
    op = "deepep_ops.cached_dispatch"
    _check_and_agree(
        op, buf, "cached_dispatch", COMBINE_FIELDS, combine_signature(x, handle), _device_of(x),
        check_cached_dispatch, x, x_scales, handle, num_ranks=buf.num_ranks,
    )
    recv_x, recv_x_scales = buf.backend.cached_dispatch(x, x_scales, handle)
    return recv_x, no_scales(x) if recv_x_scales is None else recv_x_scales


@_kernel("combine_with_weights")
def combine_with_weights_impl(x, topk_weights, buffer, *handle):
    handle = DispatchHandle(*handle)
    buf = unwrap_ep_buffer(buffer)
    op = "deepep_ops.combine_with_weights"
    _check_and_agree(
        op, buf, "combine", COMBINE_FIELDS, combine_signature(x, handle), _device_of(x),
        check_combine_with_weights, x, topk_weights, handle, num_ranks=buf.num_ranks,
    )
    return buf.backend.combine_with_weights(x, topk_weights, handle)


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
