"""Registration of the ``deepep_ops::`` ops and their real kernels.

Each kernel validates (spec §6, :mod:`deepep_ops.validation`), calls the
buffer's :class:`~deepep_ops.backends.Backend`, and packs plain tensors and
sizes into the op's outputs; the handle's layout comes from the codec in
:mod:`deepep_ops.handle`. The fake kernels live in :mod:`fake_impls`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from deepep_ops import reduce, schemas, validation
from deepep_ops._torch_compat import without_dynamo
from deepep_ops.agreement import (
    COMBINE_FIELDS,
    DISPATCH_FIELDS,
    combine_signature,
    combine_signature_prefix,
    dispatch_signature,
)
from deepep_ops.buffer import EPBuffer, unwrap_ep_buffer
from deepep_ops.handle import HANDLE_TENSORS, DispatchedHandle, DispatchHandle, DispatchResult, ExactDispatchResult
from deepep_ops.layout import decode_num_expanded_tokens, no_scales
from deepep_ops.validation import (
    check_cached_dispatch,
    check_combine,
    check_combine_rows,
    check_combine_with_weights,
    check_dispatch,
    check_not_bool,
    check_token_bucket,
    check_topk_idx_values,
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
lib.define(schemas.WEIGHT_AND_REDUCE)


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


class _KnownDispatch(NamedTuple):
    """What an eager dispatch remembers of a known call (:meth:`Agreement.remember_call`)."""

    #: x, topk_idx and topk_weights already have row-major strides (no views to make).
    row_major: bool
    #: ``DispatchedHandle.known``: (the buffer's Agreement, its handle's combine
    #: signature less the hidden size, :func:`combine_signature_prefix`).
    handle_known: tuple
    #: Decode: the handle's worst-case expanded rows X (fixed by R, M, K, E, A).
    num_expanded_tokens: Optional[int]
    #: Whether calls may need the host checks of topk_idx values
    #: (:func:`~deepep_ops.validation.value_checks_wanted`, the environment read
    #: once, here); each call still asks ``value_checks_enabled`` (capture state).
    value_checks: bool


def _call_key(exact: bool, x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank,
              expert_alignment) -> Optional[tuple]:
    """Every property of a dispatch's arguments that :func:`check_dispatch` reads
    except tensor values (the buffer's own properties are fixed): two calls with
    equal keys pass or fail its checks together. None for arguments that are
    not plain tensors and ints (the full checks name what is wrong)."""
    if type(num_experts) is not int or type(num_max_tokens_per_rank) is not int or type(expert_alignment) is not int:
        return None  # bools hash like ints; SymInts never reach the eager path
    try:
        return (
            exact, num_experts, num_max_tokens_per_rank, expert_alignment,
            x.dtype, x.device, x.shape, x.stride(),
            None if x_scales is None else (x_scales.dtype, x_scales.device, x_scales.shape),
            topk_idx.dtype, topk_idx.device, topk_idx.shape, topk_idx.stride(),
            topk_weights.dtype, topk_weights.device, topk_weights.shape, topk_weights.stride(),
        )
    except (AttributeError, RuntimeError, TypeError):  # not tensors, or no strides (sparse)
        return None


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
    eager: bool = False,
) -> tuple:
    """Validate and agree, dispatch, pack the op's outputs (see ``schemas.DISPATCH*``).

    ``eager=True`` (the eager fast path of :mod:`deepep_ops.api`) returns
    ``(outputs, the backend's native handle, the routing the handle keeps, the
    known-call entry or None)``: a repeat of a known call
    (:attr:`Agreement.known_calls`) skips validation's explainers and the
    agreement's signature; missing scales are None instead of the op's
    placeholder tensor. The handle keeps the caller's ``topk_idx`` and its
    version counter, which combine checks (:func:`check_routing_unchanged`): a
    caller mutating it in place after dispatch gets a clear error, not a
    combine that reduces with other routing. Inference tensors have no version
    counter: the handle keeps a copy of those. (DeepEP's own
    ``do_handle_copy=True`` cost ~33 µs a pair on the H200 host, bench_deepep.py's
    ``raw`` vs ``raw/no copy``; on this project's 2-core CPU box, for an [8, 8]
    int64 ``topk_idx``, ``_version`` reads in 54 ns and ``clone()`` takes 1.2 µs.)
    """
    buf = buffer if type(buffer) is EPBuffer else unwrap_ep_buffer(buffer)
    agreement = buf.agreement
    key = _call_key(exact, x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank,
                    expert_alignment) if eager else None
    known = None if key is None else agreement.known_calls.get(key)
    if known is None:
        if eager and key is None:
            check_not_bool(op, num_experts=num_experts, expert_alignment=expert_alignment)
        device = _device_of(x)
        _check_and_agree(
            op, buf, "dispatch", DISPATCH_FIELDS,
            dispatch_signature(x, x_scales, topk_idx, num_experts, num_max_tokens_per_rank, expert_alignment, exact),
            device, check_dispatch, x, x_scales, topk_idx, topk_weights,
            num_ranks=buf.num_ranks, capacity=buf.capacity, topk_idx_dtype=buf.topk_idx_dtype,
            num_experts=num_experts, num_max_tokens_per_rank=num_max_tokens_per_rank,
            expert_alignment=expert_alignment, exact=exact,
        )
        if key is not None and not agreement.check_mode(device):
            known = _KnownDispatch(
                _row_major(x) is x and _row_major(topk_idx) is topk_idx and _row_major(topk_weights) is topk_weights,
                (agreement, combine_signature_prefix(exact, num_max_tokens_per_rank, num_experts, topk_idx.shape[1],
                                                     expert_alignment)),
                None if exact else decode_num_expanded_tokens(
                    buf.num_ranks, num_max_tokens_per_rank, topk_idx.shape[1], num_experts, expert_alignment
                ),
                validation.value_checks_wanted(device, exact),
            )
            agreement.remember_call(key, known, device)
    elif known.value_checks and validation.value_checks_enabled(x.device, exact):
        # The known key vouches for metadata only (agree-once mode: a rejection stays local, as in the full checks).
        check_topk_idx_values(op, topk_idx, num_experts)
    if known is None or not known.row_major:
        x, topk_idx, topk_weights = _row_major(x), _row_major(topk_idx), _row_major(topk_weights)
    version = None
    if eager:
        if topk_idx.is_inference():
            topk_idx = topk_idx.clone()
        else:
            version = topk_idx._version
    out = buf.backend.dispatch(
        x, x_scales, topk_idx, topk_weights,
        num_experts=num_experts, num_max_tokens_per_rank=num_max_tokens_per_rank,
        expert_alignment=expert_alignment, expand=exact,
    )
    recv_x_scales = out.recv_x_scales
    if recv_x_scales is None and not eager:
        recv_x_scales = no_scales(x)
    if exact:
        counts = torch.tensor(out.num_recv_tokens_per_expert, dtype=torch.int32, device=x.device)
        # N received tokens (rows of recv_src_metadata), X expanded rows.
        sizes = (out.handle_tensors[_RECV_SRC_METADATA].shape[0], out.recv_x.shape[0])
        flat = sizes + (out.recv_x, recv_x_scales, out.recv_topk_weights, counts) + out.handle_tensors
    else:
        flat = (out.recv_x, recv_x_scales, out.recv_topk_idx, out.recv_topk_weights) + out.handle_tensors
    if not eager:
        return flat
    return flat, out.native_handle, topk_idx, version, known


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
    dispatched = type(handle) is DispatchedHandle
    if dispatched and not check_values:
        check, kwargs = check_combine_rows, {}
    else:
        check, kwargs = check_combine, {"check_values": check_values}
    _check_and_agree(
        op, buf, "combine", COMBINE_FIELDS, combine_signature(x, handle), device, check, x, handle,
        num_ranks=buf.num_ranks, out=out, **kwargs,
    )
    if dispatched and handle.known is not None and handle.known[0] is buf.agreement:
        buf.agreement.remember_call(("combine", handle.known[1], x.shape[1]), (), device)
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


# --- finalize's weight-and-reduce: no buffer, no collective (deepep_ops.reduce) -------------------
lib.impl("weight_and_reduce", without_dynamo(reduce.weight_and_reduce_any), "CompositeExplicitAutograd")
lib.impl("weight_and_reduce", without_dynamo(reduce.weight_and_reduce_cuda), "CUDA")


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


def _dispatched_handle(fields: tuple, native: object, version: Optional[int],
                       known: Optional[_KnownDispatch]) -> DispatchedHandle:
    """The eager dispatch's handle: ``fields`` in :class:`DispatchHandle` order,
    with what eager combine reads besides (see :class:`DispatchedHandle`)."""
    handle = DispatchedHandle(*fields)
    handle.native = native
    handle.topk_idx_version = version
    if known is not None:
        handle.known = known.handle_known
    return handle


@without_dynamo
def eager_dispatch(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank,
                   expert_alignment) -> DispatchResult:
    """:func:`deepep_ops.dispatch` without the dispatcher: its result, with a
    :class:`DispatchedHandle` (see :func:`_dispatch`'s ``eager``)."""
    flat, native, routing, version, known = _dispatch(
        "deepep_ops.dispatch", x, x_scales, topk_idx, topk_weights, buffer,
        num_experts, num_max_tokens_per_rank, expert_alignment, exact=False, eager=True,
    )
    recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, psum_rank, psum_expert, unaligned, src_meta, slots = flat
    if known is None:
        num_expanded_tokens = decode_num_expanded_tokens(
            psum_rank.shape[0], num_max_tokens_per_rank, routing.shape[1], num_experts, expert_alignment
        )
    else:
        num_expanded_tokens = known.num_expanded_tokens
    handle = _dispatched_handle(
        (routing, psum_rank, psum_expert, unaligned, src_meta, slots,
         num_experts, num_max_tokens_per_rank, expert_alignment, False, num_expanded_tokens),
        native, version, known,
    )
    return DispatchResult(recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, handle)


@without_dynamo
def eager_dispatch_exact(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank,
                         expert_alignment) -> ExactDispatchResult:
    """As :func:`eager_dispatch` for :func:`deepep_ops.dispatch_exact`."""
    flat, native, routing, version, known = _dispatch(
        "deepep_ops.dispatch_exact", x, x_scales, topk_idx, topk_weights, buffer,
        num_experts, num_max_tokens_per_rank, expert_alignment, exact=True, eager=True,
    )
    _num_recv_tokens, num_expanded_tokens, recv_x, recv_x_scales, recv_topk_weights, counts = flat[:6]
    handle = _dispatched_handle(
        (routing, *flat[6:], num_experts, num_max_tokens_per_rank, expert_alignment, True, num_expanded_tokens),
        native, version, known,
    )
    return ExactDispatchResult(recv_x, recv_x_scales, recv_topk_weights, counts, handle)


@without_dynamo
def eager_combine(
    op: str, x: torch.Tensor, buffer: EPBuffer, handle: DispatchHandle, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``deepep_ops::combine`` (``combine_into`` with ``out``) without the dispatcher.

    A :class:`DispatchedHandle` from an agree-once buffer, combined on the same
    buffer with a hidden size every rank already agreed on, needs only
    :func:`check_combine_rows`; anything else takes :func:`run_combine`.
    """
    if type(handle) is DispatchedHandle and handle.known is not None and x.dim() == 2:
        buf = buffer if type(buffer) is EPBuffer else unwrap_ep_buffer(buffer)
        agreement, prefix = handle.known
        if agreement is buf.agreement and ("combine", prefix, x.shape[1]) in agreement.known_calls:
            check_combine_rows(op, x, handle, num_ranks=buf.num_ranks, out=out)
            return buf.backend.combine(x, handle, out=out)
    return run_combine(op, x, buffer, handle, out)
