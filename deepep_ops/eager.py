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
(a *known call*, :mod:`deepep_ops.known_calls`) is recognised by one C++ guard
over its tensors, which here answers at once what the dispatcher would do and
whether the metadata checks would pass; only a call it rejects pays for the
dispatcher's no-op test and the checks in Python. The handles of a known
dispatch carry their entry to combine, which learns the guard of the inputs
every rank agreed on for it.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from deepep_ops._torch_compat import dispatcher_is_a_no_op, metadata_guard, version_counter, without_dynamo
from deepep_ops.agreement import agree_combine
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
from deepep_ops.known_calls import EAGER, admit_dispatch, dispatch_key, dispatch_tensors, known_dispatch
from deepep_ops.validation import (
    check_combine,
    check_combine_rows,
    check_not_bool,
    combine_rows_ok,
    device_of,
    verdict,
)

#: ``tuple.__new__(cls, values)`` builds a NamedTuple in one C call; calling the
#: class runs its Python ``__new__``: eager dispatch builds three per call.
_new_tuple = tuple.__new__


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
    except AttributeError:  # not an EPOpsBuffer: the op's own TypeError names it
        return None
    if buffer.pending is not None:  # an async call in flight: the op kernel refuses the call with every rank
        return None
    args = _new_tuple(DispatchArgs, (
        x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank, expert_alignment, decode,
    ))
    op = "deepep_ops.dispatch" if decode else "deepep_ops.dispatch_exact"
    key = dispatch_key(EAGER, args)
    admitted = known_dispatch(op, store, key, args)
    if admitted is None:
        if not dispatcher_is_a_no_op(*dispatch_tensors(args)):
            return None
        if key is None:
            check_not_bool(op, num_experts=num_experts, expert_alignment=expert_alignment)
        admitted = admit_dispatch(op, buffer, args, key)
    args, known = admitted
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
    except AttributeError:  # not an EPOpsBuffer: the op's own TypeError names it
        return None
    if buffer.pending is not None:  # an async call in flight: the op kernel refuses the call with every rank
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
