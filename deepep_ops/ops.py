"""Registration of the ``deepep_ops::`` ops and their real kernels.

Each kernel validates (spec §6, :mod:`deepep_ops.validation`), calls the
buffer's :class:`~deepep_ops.backends.Backend`, and packs plain tensors and
sizes into the op's outputs; the handle's layout comes from the codec in
:mod:`deepep_ops.handle`. The fake kernels live in :mod:`fake_impls`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from deepep_ops import reduce, schemas, validation
from deepep_ops._torch_compat import dispatcher_is_a_no_op, metadata_guard, without_dynamo
from deepep_ops.agreement import (
    COMBINE_FIELDS,
    DISPATCH_FIELDS,
    Agreement,
    combine_signature,
    dispatch_signature,
)
from deepep_ops.buffer import EPBuffer, unwrap_ep_buffer
from deepep_ops.handle import HANDLE_TENSORS, DispatchedHandle, DispatchHandle, DispatchResult, ExactDispatchResult
from deepep_ops.layout import align, decode_num_expanded_tokens, no_scales
from deepep_ops.validation import (
    check_cached_dispatch,
    check_combine,
    check_combine_rows,
    combine_rows_ok,
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
_UNALIGNED_PER_EXPERT = HANDLE_TENSORS.index("num_unaligned_recv_tokens_per_expert")


def _aligned_counts(handle_tensors: tuple, expert_alignment: int) -> torch.Tensor:
    """Prefill's aligned rows per local expert, [EL] int32 on the tokens' device:
    ``align(c_e, A)`` of the handle's unaligned counts c_e, on the device (what
    the backend's host list holds, spec §3). Not ``torch.tensor(host list,
    device=cuda)``: a copy from pageable memory synchronises the stream, so the
    host would wait for the dispatch's payload kernels before it could queue
    anything after them."""
    unaligned = handle_tensors[_UNALIGNED_PER_EXPERT]
    if expert_alignment == 1:
        return unaligned.clone()
    return align(unaligned, expert_alignment)


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
    """What an eager dispatch remembers of a known call (:meth:`Agreement.remember_call`);
    its handles carry it to combine (``DispatchedHandle.known``)."""

    #: The agreement (of the buffer) that remembered the call.
    agreement: Agreement
    #: ``check(x, [x_scales,] topk_idx, topk_weights) -> bool``
    #: (:func:`~deepep_ops._torch_compat.metadata_guard`): a call it passes has every
    #: property :func:`check_dispatch` reads except tensor values, and is plain eager.
    guard: Callable[..., bool]
    #: x, topk_idx and topk_weights already have row-major strides (no views to make).
    row_major: bool
    #: Decode: the handle's worst-case expanded rows X (fixed by R, M, K, E, A).
    num_expanded_tokens: Optional[int]
    #: Whether calls may need the host checks of topk_idx values
    #: (:func:`~deepep_ops.validation.value_checks_wanted`, the environment read
    #: once, here); each call still asks ``value_checks_enabled`` (capture state).
    value_checks: bool
    #: Guards of the combine inputs every rank agreed on for this call's handles
    #: (:func:`run_combine` adds them), keyed by whether ``out`` was given: a
    #: combine that passes one checks only its rows and routing
    #: (:func:`eager_combine`). Dim 0 of x is free: prefill's X varies per call.
    combine_guards: dict


def _call_key(exact: bool, x, x_scales, topk_idx, num_experts, num_max_tokens_per_rank,
              expert_alignment) -> Optional[tuple]:
    """Which known call (:attr:`Agreement.known_calls`) a dispatch may repeat: the
    mode, T and the int arguments; the call's guard decides the rest. None for
    arguments that are not plain ints or an x without rows (the full checks
    name what is wrong)."""
    # Bools hash like ints, and the ops reject them; SymInts never reach the eager path.
    if type(num_experts) is not int or type(num_max_tokens_per_rank) is not int or type(expert_alignment) is not int:
        return None
    try:
        return (exact, x_scales is None, x.shape[0], num_experts, num_max_tokens_per_rank, expert_alignment)
    except (AttributeError, IndexError, TypeError):  # not a tensor, or 0-d
        return None


def _admit(
    op: str,
    buf: EPBuffer,
    x: torch.Tensor,
    x_scales: Optional[torch.Tensor],
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    num_max_tokens_per_rank: int,
    expert_alignment: int,
    exact: bool,
    key: Optional[tuple] = None,
) -> tuple:
    """Validate and agree: ``(x, topk_idx, topk_weights, known)`` with row-major
    strides, ``known`` the call's new :class:`_KnownDispatch` or None.

    ``key`` (the eager fast path, :func:`_eager_admit`, for a call it did not
    recognise): the call's :func:`_call_key`; a call that passes is remembered
    under it with its guard (agree-once mode). Graph kernels pass none and check
    and agree on every call.
    """
    device = _device_of(x)
    _check_and_agree(
        op, buf, "dispatch", DISPATCH_FIELDS,
        dispatch_signature(x, x_scales, topk_idx, num_experts, num_max_tokens_per_rank, expert_alignment, exact),
        device, check_dispatch, x, x_scales, topk_idx, topk_weights,
        num_ranks=buf.num_ranks, capacity=buf.capacity, topk_idx_dtype=buf.topk_idx_dtype,
        num_experts=num_experts, num_max_tokens_per_rank=num_max_tokens_per_rank,
        expert_alignment=expert_alignment, exact=exact,
    )
    known = None
    if key is not None and not buf.agreement.check_mode(device):
        guard = metadata_guard((x, topk_idx, topk_weights) if x_scales is None else (x, x_scales, topk_idx, topk_weights))
        if guard is not None:
            known = _KnownDispatch(
                buf.agreement,
                guard,
                _row_major(x) is x and _row_major(topk_idx) is topk_idx and _row_major(topk_weights) is topk_weights,
                None if exact else decode_num_expanded_tokens(
                    buf.num_ranks, num_max_tokens_per_rank, topk_idx.shape[1], num_experts, expert_alignment
                ),
                validation.value_checks_wanted(device, exact),
                {},
            )
            buf.agreement.remember_call(key, known, device)
    return _row_major(x), _row_major(topk_idx), _row_major(topk_weights), known


def _eager_admit(
    op: str,
    buf: EPBuffer,
    x: torch.Tensor,
    x_scales: Optional[torch.Tensor],
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    num_max_tokens_per_rank: int,
    expert_alignment: int,
    exact: bool,
) -> Optional[tuple]:
    """:func:`_admit` for the eager fast path, or None where the dispatcher must run.

    A repeat of a known call (:attr:`Agreement.known_calls`, agree-once mode;
    its guard passes) is plain eager and has the metadata of a call every rank
    agreed on: it skips validation's explainers and the agreement's signature,
    keeping only the value checks the guard cannot vouch for. Otherwise, if
    the dispatcher would do anything (:func:`dispatcher_is_a_no_op`), None; else
    the full checks, and the call is remembered.
    """
    key = _call_key(exact, x, x_scales, topk_idx, num_experts, num_max_tokens_per_rank, expert_alignment)
    known = None if key is None else buf.agreement.known_calls.get(key)
    if known is not None and (
        known.guard(x, topk_idx, topk_weights) if x_scales is None else known.guard(x, x_scales, topk_idx, topk_weights)
    ):
        if known.value_checks and validation.value_checks_enabled(x.device, exact):
            # The guard vouches for metadata only (agree-once mode: a rejection stays local, as in the full checks).
            check_topk_idx_values(op, topk_idx, num_experts)
        if known.row_major:
            return x, topk_idx, topk_weights, known
        return _row_major(x), _row_major(topk_idx), _row_major(topk_weights), known
    if not (dispatcher_is_a_no_op(x, topk_idx, topk_weights) if x_scales is None
            else dispatcher_is_a_no_op(x, x_scales, topk_idx, topk_weights)):
        return None
    if key is None:
        check_not_bool(op, num_experts=num_experts, expert_alignment=expert_alignment)
    return _admit(op, buf, x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank,
                  expert_alignment, exact, key)


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
) -> tuple:
    """The dispatch ops' kernel: validate and agree, dispatch, pack the op's outputs
    (see ``schemas.DISPATCH*``)."""
    buf = unwrap_ep_buffer(buffer)
    x, topk_idx, topk_weights, _ = _admit(
        op, buf, x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank, expert_alignment, exact
    )
    out = buf.backend.dispatch(
        x, x_scales, topk_idx, topk_weights,
        num_experts=num_experts, num_max_tokens_per_rank=num_max_tokens_per_rank,
        expert_alignment=expert_alignment, expand=exact,
    )
    recv_x_scales = no_scales(x) if out.recv_x_scales is None else out.recv_x_scales
    if exact:
        counts = _aligned_counts(out.handle_tensors, expert_alignment)
        # N received tokens (rows of recv_src_metadata), X expanded rows.
        sizes = (out.handle_tensors[_RECV_SRC_METADATA].shape[0], out.recv_x.shape[0])
        return sizes + (out.recv_x, recv_x_scales, out.recv_topk_weights, counts) + out.handle_tensors
    return (out.recv_x, recv_x_scales, out.recv_topk_idx, out.recv_topk_weights) + out.handle_tensors


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
    known = handle.known if dispatched else None
    if known is not None and known.agreement is buf.agreement and not check_values:
        known.combine_guards[out is None] = metadata_guard((x,) if out is None else (x, out), dynamic_rows=(0,))
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
#
# A repeat of a call whose inputs passed the checks (a known call) is recognised
# by one C++ guard over its tensors (deepep_ops._torch_compat.metadata_guard:
# type, dtype, device, sizes, strides, requires_grad and the dispatch keys under
# the thread's modes), which answers both questions at once, what the
# dispatcher would do and whether the metadata checks would pass; only a call
# it rejects pays for the dispatcher's no-op test and the checks in Python.
# ---------------------------------------------------------------------------


#: ``tuple.__new__(cls, values)`` builds a NamedTuple in one C call; calling the class
#: runs its Python ``__new__`` (~0.1-0.15 µs more per result on the 2-core box).
_new_tuple = tuple.__new__


@without_dynamo
def eager_dispatch(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank,
                   expert_alignment) -> Optional[DispatchResult]:
    """:func:`deepep_ops.dispatch` without the dispatcher: the op kernel's checks and
    outputs, with a :class:`DispatchedHandle` and missing scales as None; None
    where the dispatcher must run (:func:`_eager_admit`).

    The handle keeps the caller's ``topk_idx`` and its version counter, which
    combine checks (:func:`check_routing_unchanged`): a caller mutating it in
    place after dispatch gets a clear error, not a combine that reduces with
    other routing. Inference tensors have no version counter: the handle keeps
    a copy of those. (DeepEP's own ``do_handle_copy=True`` cost ~33 µs a pair on
    the H200 host, bench_deepep.py's ``raw`` vs ``raw/no copy``; on this
    project's 2-core CPU box, for an [8, 8] int64 ``topk_idx``, ``_version``
    reads in 54 ns and ``clone()`` takes 1.2 µs.)
    """
    buf = buffer if type(buffer) is EPBuffer else unwrap_ep_buffer(buffer)
    admitted = _eager_admit(
        "deepep_ops.dispatch", buf, x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank,
        expert_alignment, False,
    )
    if admitted is None:
        return None
    x, topk_idx, topk_weights, known = admitted
    try:
        version = topk_idx._version
    except RuntimeError:  # an inference tensor
        topk_idx, version = topk_idx.clone(), None
    out = buf.backend.dispatch(
        x, x_scales, topk_idx, topk_weights,
        num_experts=num_experts, num_max_tokens_per_rank=num_max_tokens_per_rank,
        expert_alignment=expert_alignment, expand=False,
    )
    if known is None:
        num_expanded_tokens = decode_num_expanded_tokens(
            buf.num_ranks, num_max_tokens_per_rank, topk_idx.shape[1], num_experts, expert_alignment
        )
    else:
        num_expanded_tokens = known.num_expanded_tokens
    handle = _new_tuple(DispatchedHandle, (
        topk_idx, *out.handle_tensors, num_experts, num_max_tokens_per_rank, expert_alignment, False,
        num_expanded_tokens,
    ))
    handle.native, handle.topk_idx_version, handle.known = out.native_handle, version, known
    return _new_tuple(DispatchResult, (out.recv_x, out.recv_x_scales, out.recv_topk_idx, out.recv_topk_weights, handle))


@without_dynamo
def eager_dispatch_exact(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank,
                         expert_alignment) -> Optional[ExactDispatchResult]:
    """As :func:`eager_dispatch` for :func:`deepep_ops.dispatch_exact`."""
    buf = buffer if type(buffer) is EPBuffer else unwrap_ep_buffer(buffer)
    admitted = _eager_admit(
        "deepep_ops.dispatch_exact", buf, x, x_scales, topk_idx, topk_weights, num_experts,
        num_max_tokens_per_rank, expert_alignment, True,
    )
    if admitted is None:
        return None
    x, topk_idx, topk_weights, known = admitted
    try:
        version = topk_idx._version
    except RuntimeError:  # an inference tensor
        topk_idx, version = topk_idx.clone(), None
    out = buf.backend.dispatch(
        x, x_scales, topk_idx, topk_weights,
        num_experts=num_experts, num_max_tokens_per_rank=num_max_tokens_per_rank,
        expert_alignment=expert_alignment, expand=True,
    )
    counts = _aligned_counts(out.handle_tensors, expert_alignment)
    handle = DispatchedHandle(
        topk_idx, *out.handle_tensors, num_experts, num_max_tokens_per_rank, expert_alignment, True,
        out.recv_x.shape[0],
    )
    handle.native, handle.topk_idx_version, handle.known = out.native_handle, version, known
    return ExactDispatchResult(out.recv_x, out.recv_x_scales, out.recv_topk_weights, counts, handle)


@without_dynamo
def eager_combine(
    op: str, x: torch.Tensor, buffer: EPBuffer, handle: DispatchHandle, out: Optional[torch.Tensor] = None
) -> Optional[torch.Tensor]:
    """``deepep_ops::combine`` (``combine_into`` with ``out``) without the dispatcher;
    None where the dispatcher must run.

    Inputs that pass a combine guard of a :class:`DispatchedHandle`'s known call
    (inputs every rank agreed on for it, :func:`run_combine`) need only their
    rows and the routing checked (:func:`~deepep_ops.validation.combine_rows_ok`);
    anything else takes :func:`run_combine`.
    """
    buf = buffer if type(buffer) is EPBuffer else unwrap_ep_buffer(buffer)
    if type(handle) is DispatchedHandle:
        known = handle.known
        if known is not None and known.agreement is buf.agreement:
            guard = known.combine_guards.get(out is None)
            if guard is not None and (guard(x) if out is None else guard(x, out)) and combine_rows_ok(x, handle):
                return buf.backend.combine(x, handle, out=out)
        # Its tensors came from the fast path: plain, no grad.
        tensors = (x,) if out is None else (x, out)
    else:
        # topk_idx and recv_src_metadata stand for the handle's tensors (all
        # come from one dispatch: all plain or all not).
        tensors = (x, handle.topk_idx, handle.recv_src_metadata) if out is None else (
            x, out, handle.topk_idx, handle.recv_src_metadata)
    if not dispatcher_is_a_no_op(*tensors):
        return None
    return run_combine(op, x, buf, handle, out)
