"""The eager fast path: dispatch and combine without the dispatcher, and each
buffer's store of known calls.

A Python kernel behind ``torch.ops`` pays the dispatcher on every call
(argument boxing against the schema, the autograd fallback, unboxing eleven
outputs; ``benchmarks/bench_op_overhead.py``), as much as the rest of the op
layer. When the dispatcher would do nothing but call the kernel
(:func:`~deepep_ops._torch_compat.dispatcher_is_a_no_op`: not tracing, no
modes, no autograd), the entry points in :mod:`deepep_ops.api` call
:func:`dispatch` and :func:`combine` here instead: the same checks, the same
agreement, the same backend calls and the same results as the op kernels of
:mod:`deepep_ops.ops`, or None where the dispatcher must run.

A repeat of a call whose inputs passed the checks and every rank's agreement
(a *known call*, in agree-once mode) is recognised by one C++ guard over its
tensors (:func:`~deepep_ops._torch_compat.metadata_guard`: type, dtype,
device, sizes, strides, ``requires_grad`` and the dispatch keys under the
thread's modes), which answers at once what the dispatcher would do and
whether the metadata checks would pass; only a call it rejects pays for the
dispatcher's no-op test and the checks in Python. Each :class:`EPBuffer` keeps
its known calls in a :class:`KnownCalls` store, and the handles of a known
dispatch carry their entry to combine, which learns the guard of the inputs
every rank agreed on for it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch

from deepep_ops._torch_compat import dispatcher_is_a_no_op, metadata_guard, version_counter, without_dynamo
from deepep_ops.agreement import agree_combine, agree_dispatch
from deepep_ops.handle import (
    DispatchArgs,
    DispatchedHandle,
    DispatchHandle,
    DispatchResult,
    ExactDispatchResult,
    dispatch_result,
    num_expanded_tokens,
    prefill_counts,
)
from deepep_ops.validation import (
    check_combine,
    check_combine_rows,
    check_dispatch,
    check_not_bool,
    check_topk_idx_values,
    combine_rows_ok,
    device_of,
    row_major_args,
    value_checks_enabled,
    value_checks_wanted,
    verdict,
)

#: ``tuple.__new__(cls, values)`` builds a NamedTuple in one C call; calling the
#: class runs its Python ``__new__``: eager dispatch builds three per call.
_new_tuple = tuple.__new__


class KnownDispatch(NamedTuple):
    """What an eager dispatch remembers of a known call (:meth:`KnownCalls.remember`);
    its handles carry it to combine (``DispatchedHandle.known``)."""

    #: The store (of one buffer) that remembered the call.
    store: "KnownCalls"
    #: ``check(x, [x_scales,] topk_idx, topk_weights) -> bool``: a call it passes has
    #: every property :func:`~deepep_ops.validation.check_dispatch` reads except
    #: tensor values, and is plain eager.
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
    #: (:func:`combine` adds them), keyed by whether ``out`` was given: a combine
    #: that passes one checks only its rows and routing. Dim 0 of x is free:
    #: prefill's X varies per call.
    combine_guards: dict


class KnownCalls:
    """One :class:`EPBuffer`'s known eager calls (agree-once mode only: check mode
    exchanges on every call). Keyed on the mode, T and the int arguments
    (:func:`_call_key`), each with its guard; bounded, since a key holds T."""

    #: Bound on the keys (one per T, dtype, ... seen).
    MAX_CALLS = 4096

    def __init__(self) -> None:
        self._calls: dict = {}

    def get(self, key: tuple) -> Optional[KnownDispatch]:
        return self._calls.get(key)

    def remember(self, key: tuple, entry: KnownDispatch) -> None:
        if len(self._calls) >= self.MAX_CALLS:
            self._calls.clear()
        self._calls[key] = entry

    def __len__(self) -> int:
        return len(self._calls)

    def entries(self) -> list:
        """The remembered :class:`KnownDispatch` entries."""
        return list(self._calls.values())


def _call_key(decode: bool, x, x_scales, num_experts, num_max_tokens_per_rank, expert_alignment) -> Optional[tuple]:
    """Which known call a dispatch may repeat: the mode, T and the int arguments;
    the call's guard decides the rest. None for arguments that are not plain ints
    or an x without rows (the full checks name what is wrong)."""
    # Bools hash like ints, and the ops reject them; SymInts never reach the eager path.
    if type(num_experts) is not int or type(num_max_tokens_per_rank) is not int or type(expert_alignment) is not int:
        return None
    try:
        return (decode, x_scales is None, x.shape[0], num_experts, num_max_tokens_per_rank, expert_alignment)
    except (AttributeError, IndexError, TypeError):  # not a tensor, or 0-d
        return None


def _tensors(args: DispatchArgs) -> tuple:
    """The tensor arguments a guard and the dispatcher's no-op test look at."""
    if args.x_scales is None:
        return args.x, args.topk_idx, args.topk_weights
    return args.x, args.x_scales, args.topk_idx, args.topk_weights


def _admit(op: str, buf, args: DispatchArgs, key: Optional[tuple]) -> tuple:
    """Validate and agree on a call that is not a known one: ``(args with row-major
    strides, its new KnownDispatch or None)``; remembered in agree-once mode."""
    agree_dispatch(op, buf, args, verdict(check_dispatch, op, args, buf))
    known = None
    device = args.x.device
    if key is not None and not buf.agreement.check_mode(device):
        guard = metadata_guard(_tensors(args))
        if guard is not None:
            normal = row_major_args(args)
            known = KnownDispatch(
                buf.known_calls,
                guard,
                normal is args,
                num_expanded_tokens(args, buf.num_ranks) if args.decode else None,
                value_checks_wanted(device, args.decode),
                {},
            )
            buf.known_calls.remember(key, known)
            return normal, known
    return row_major_args(args), known


@without_dynamo
def dispatch(
    decode: bool, x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment
) -> Optional[Union[DispatchResult, ExactDispatchResult]]:
    """:func:`deepep_ops.dispatch` (``decode``) or :func:`deepep_ops.dispatch_exact`
    without the dispatcher: the op kernel's checks and outputs, with a
    :class:`~deepep_ops.handle.DispatchedHandle` and missing scales as None; None
    where the dispatcher must run.

    The handle keeps the caller's ``topk_idx`` and its version counter, which
    combine checks (:func:`~deepep_ops.validation.check_routing_unchanged`): a
    caller mutating it in place after dispatch gets a clear error, not a combine
    that reduces with other routing. Inference tensors have no version counter:
    the handle keeps a copy of those. (DeepEP's own ``do_handle_copy=True``
    copies it on the device on every call instead.)
    """
    try:
        store = buffer.known_calls
    except AttributeError:  # not an EPBuffer: the op's own TypeError names it
        return None
    args = _new_tuple(DispatchArgs, (
        x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank, expert_alignment, decode,
    ))
    key = _call_key(decode, x, x_scales, num_experts, num_max_tokens_per_rank, expert_alignment)
    known = None if key is None else store.get(key)
    if known is not None and (
        known.guard(x, topk_idx, topk_weights) if x_scales is None else known.guard(x, x_scales, topk_idx, topk_weights)
    ):
        # The guard vouches for metadata only (agree-once mode: a rejection stays local,
        # as in the full checks).
        if known.value_checks and value_checks_enabled(x.device, decode):
            check_topk_idx_values(_op_name(decode), topk_idx, num_experts)
        if not known.row_major:
            args = row_major_args(args)
    else:
        if not dispatcher_is_a_no_op(*_tensors(args)):
            return None
        op = _op_name(decode)
        if key is None:
            check_not_bool(op, num_experts=num_experts, expert_alignment=expert_alignment)
        args, known = _admit(op, buffer, args, key)
    version = version_counter(args.topk_idx)
    if version is None:  # an inference tensor
        args = args._replace(topk_idx=args.topk_idx.clone())
    out = buffer.backend.dispatch(args)
    if decode:
        x_rows = num_expanded_tokens(args, buffer.num_ranks) if known is None else known.num_expanded_tokens
        counts = None
    else:
        x_rows = num_expanded_tokens(args, buffer.num_ranks, out.recv_x.shape[0])
        counts = prefill_counts(out.handle_tensors, expert_alignment)
    handle = _new_tuple(DispatchedHandle, (
        args.topk_idx, *out.handle_tensors, num_experts, num_max_tokens_per_rank, expert_alignment, decode, x_rows,
        *out.hybrid_tensors,
    ))
    handle.native, handle.topk_idx_version, handle.known = out.native_handle, version, known
    return dispatch_result(
        decode, out.recv_x, out.recv_x_scales, out.recv_topk_idx, out.recv_topk_weights, counts, handle
    )


def _op_name(decode: bool) -> str:
    return "deepep_ops.dispatch" if decode else "deepep_ops.dispatch_exact"


@without_dynamo
def combine(
    op: str, x: torch.Tensor, buffer, handle: DispatchHandle, out: Optional[torch.Tensor] = None
) -> Optional[torch.Tensor]:
    """``deepep_ops::combine`` (``combine_into`` with ``out``) without the dispatcher;
    None where the dispatcher must run.

    Inputs that pass a combine guard of a :class:`~deepep_ops.handle.DispatchedHandle`'s
    known call (inputs every rank agreed on for it) need only their rows and the
    routing checked (:func:`~deepep_ops.validation.combine_rows_ok`); anything
    else gets the full checks and agreement of the op kernel. A handle from an
    eager dispatch has its tensors checked already: outside check mode only
    ``x`` and ``out`` are checked against it.
    """
    try:
        store = buffer.known_calls
    except AttributeError:  # not an EPBuffer: the op's own TypeError names it
        return None
    dispatched = type(handle) is DispatchedHandle
    known = handle.known if dispatched else None
    if known is not None and known.store is not store:
        known = None  # a handle of another buffer: nothing it learned applies here
    if known is not None:
        guard = known.combine_guards.get(out is None)
        if guard is not None and (guard(x) if out is None else guard(x, out)) and combine_rows_ok(x, handle):
            return buffer.backend.combine(x, handle, out=out)
    if dispatched:  # its tensors came from the fast path: plain, no grad
        tensors = (x,) if out is None else (x, out)
    else:
        # topk_idx and recv_src_metadata stand for the handle's tensors (all
        # come from one dispatch: all plain or all not).
        tensors = (x, handle.topk_idx, handle.recv_src_metadata) if out is None else (
            x, out, handle.topk_idx, handle.recv_src_metadata)
    if not dispatcher_is_a_no_op(*tensors):
        return None
    check_values = buffer.agreement.check_mode(device_of(x))
    if dispatched and not check_values:
        error = verdict(check_combine_rows, op, x, handle, buffer, out)
    else:
        error = verdict(check_combine, op, x, handle, buffer, out, check_values)
    agree_combine(op, buffer, x, handle, error)
    if known is not None and not check_values:
        known.combine_guards[out is None] = metadata_guard((x,) if out is None else (x, out), dynamic_rows=(0,))
    return buffer.backend.combine(x, handle, out=out)
