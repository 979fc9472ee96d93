"""Registration of the ``deepep_ops::`` ops and their kernels.

Each kernel admits its call (:mod:`deepep_ops.known_calls`: a repeat of a call
every rank agreed on passes one guard; anything else is validated,
docs/deepep_contract.md §6, :mod:`deepep_ops.validation`, and agreed with
every EP rank, :mod:`deepep_ops.agreement`), calls the buffer's
:class:`~deepep_ops.backends.Backend`, and packs plain tensors and sizes into
the op's outputs (the codec, :mod:`deepep_ops.handle`). These are the kernels
that compiled graphs and the dispatcher run; eager calls that need no
dispatcher take :mod:`deepep_ops.eager` instead. The fake kernels live in
:mod:`fake_impls`.
"""

from __future__ import annotations

from typing import Optional

import torch

from deepep_ops import reduce, schemas
from deepep_ops._torch_compat import register_ordered_effect, without_dynamo
from deepep_ops.buffer import EPOpsBuffer, unwrap_ep_buffer
from deepep_ops.handle import DispatchArgs, DispatchHandle, pack_dispatch
from deepep_ops.known_calls import KERNEL, admit_dispatch, admit_handle_call, dispatch_key, known_dispatch
from deepep_ops.pending import begin, outstanding_error, take, ticket_like
from deepep_ops.validation import (
    check_cached_dispatch,
    check_combine,
    check_combine_with_weights,
    check_token_bucket,
    verdict,
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
for _schema in (schemas.DISPATCH_START, schemas.DISPATCH_WAIT, schemas.COMBINE_START, schemas.COMBINE_WAIT):
    lib.define(_schema)
# Host sync (prefill's counts): CUDA-graph capture must leave them out, as dispatch_exact.
lib.define(schemas.DISPATCH_EXACT_START, tags=(torch.Tag.cudagraph_unsafe,))
lib.define(schemas.DISPATCH_EXACT_WAIT, tags=(torch.Tag.cudagraph_unsafe,))
# Ordered effects keep every rank's EP collectives in program order and the
# starts alive (a start's ticket alone would not). dispatch_exact_wait cannot
# have one: Inductor (torch 2.13 to 2.15) fails to lower an effectful op whose
# outputs bind unbacked sizes (compute_unbacked_bindings reads the with_effects
# node's value, which leads with the effect token). It reads its start's
# ticket, so it still follows the start, and the experts read its outputs.
for _name in schemas.ASYNC_OPS:
    if _name != "dispatch_exact_wait":
        register_ordered_effect(lib, _name)


#: op name -> its kernel (the function registered for every device): the
#: Autograd kernels of :mod:`deepep_ops.autograd` call it directly where nothing
#: records (:func:`~deepep_ops._torch_compat.register_autograd_kernel`).
KERNELS: dict = {}


def _kernel(op: str):
    """Register the decorated function as ``op``'s kernel for every device.

    Each kernel runs with Dynamo's frame hook off: when an op runs eagerly while
    the hook is live (code after a graph break inside a compiled function),
    Dynamo must not trace the kernel's own Python frames, which handle the real
    buffer behind the opaque EPOpsBuffer and fail as a hard error when traced.
    ``torch.library.register_kernel`` does the same through
    ``torch._disable_dynamo``, at several times the cost of
    :func:`~deepep_ops._torch_compat.without_dynamo`.
    """

    def register(fn):
        lib.impl(op, without_dynamo(fn), "CompositeExplicitAutograd")
        KERNELS[op] = fn
        return fn

    return register


def _admit_dispatch(op: str, buf: EPOpsBuffer, args: DispatchArgs) -> DispatchArgs:
    """A dispatch kernel's admission (a known call, or checks + agreement); refused,
    with every rank's agreement, while an async call is in flight on ``buf``."""
    key = dispatch_key(KERNEL, args)
    busy = None if buf.pending is None else outstanding_error(op, buf)
    admitted = None if busy is not None else known_dispatch(op, buf.known_calls, key, args)
    if admitted is None:
        admitted = admit_dispatch(op, buf, args, key, error=busy)
    return admitted[0]


def _dispatch_outputs(args: DispatchArgs, out) -> tuple:
    """The dispatch op's flat outputs from the backend's :class:`DispatchOutput`."""
    return pack_dispatch(
        args.decode,
        out.recv_x,
        out.recv_x_scales,
        out.recv_topk_idx,
        out.recv_topk_weights,
        out.handle_tensors,
        args.expert_alignment,
        hybrid_tensors=out.hybrid_tensors,
    )


def _dispatch(op: str, args: DispatchArgs, buffer: EPOpsBuffer) -> tuple:
    """The dispatch ops' kernel: admit the call, dispatch, pack the op's outputs."""
    buf = unwrap_ep_buffer(buffer)
    return _dispatch_outputs(args, buf.backend.dispatch(_admit_dispatch(op, buf, args)))


@_kernel("dispatch")
def dispatch_impl(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment=1):
    args = DispatchArgs(x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank, expert_alignment, True)
    return _dispatch("deepep_ops.dispatch", args, buffer)


@_kernel("dispatch_exact")
def dispatch_exact_impl(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment=1):
    args = DispatchArgs(x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank, expert_alignment, False)
    return _dispatch("deepep_ops.dispatch_exact", args, buffer)


def _combine(op: str, x: torch.Tensor, buffer: EPOpsBuffer, handle: DispatchHandle,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Admit the call (in check mode with the handle's values too), then the
    backend's combine (into ``out`` when given)."""
    buf = unwrap_ep_buffer(buffer)
    admit_handle_call(op, buf, x, handle, (out,), lambda check_values: verdict(
        check_combine, op, x, handle, buf, out, check_values))
    return buf.backend.combine(x, handle, out=out)


@_kernel("combine")
def combine_impl(x, buffer, *handle):
    return _combine("deepep_ops.combine", x, buffer, DispatchHandle(*handle))


@_kernel("combine_into")
def combine_into_impl(out, x, buffer, *handle):
    _combine("deepep_ops.combine_into", x, buffer, DispatchHandle(*handle), out=out)


@_kernel("token_bucket")
def token_bucket_impl(tokens, buffer):
    check_token_bucket(tokens)
    return unwrap_ep_buffer(buffer).bucket(tokens.shape[0])


# --- training: the ops the backward passes call (autograd: deepep_ops.autograd) -------------------
def _admit_backward(op: str, check, x: torch.Tensor, second, buffer: EPOpsBuffer, handle: tuple) -> tuple:
    """``(buffer, handle)`` once the call is admitted: a known call, or this rank's
    ``check(op, x, second, handle, buf)`` and every rank's agreement (both
    backward ops agree as a combine does)."""
    handle = DispatchHandle(*handle)
    buf = unwrap_ep_buffer(buffer)
    admit_handle_call(op, buf, x, handle, (second,), lambda _check_values: verdict(
        check, op, x, second, handle, buf))
    return buf, handle


@_kernel("cached_dispatch")
def cached_dispatch_impl(x, x_scales, buffer, *handle):
    buf, handle = _admit_backward("deepep_ops.cached_dispatch", check_cached_dispatch, x, x_scales, buffer, handle)
    recv_x, recv_x_scales = buf.backend.cached_dispatch(x, x_scales, handle)
    return recv_x, recv_x_scales


@_kernel("combine_with_weights")
def combine_with_weights_impl(x, topk_weights, buffer, *handle):
    buf, handle = _admit_backward(
        "deepep_ops.combine_with_weights", check_combine_with_weights, x, topk_weights, buffer, handle
    )
    return buf.backend.combine_with_weights(x, topk_weights, handle)


# --- asynchrony: start ops launch and return a ticket, wait ops return the results ----------------
# (deepep_ops.pending: at most one call in flight per buffer; the schemas: deepep_ops.schemas)
def _dispatch_start(op: str, wait_op: str, args: DispatchArgs, buffer: EPOpsBuffer) -> torch.Tensor:
    buf = unwrap_ep_buffer(buffer)
    started = buf.backend.dispatch_async(_admit_dispatch(op, buf, args))
    return begin(buf, op, wait_op, ticket_like(args.x), started)


def _dispatch_wait(wait_op: str, ticket: torch.Tensor, args: DispatchArgs, buffer: EPOpsBuffer) -> tuple:
    buf = unwrap_ep_buffer(buffer)
    return _dispatch_outputs(args, take(buf, wait_op, ticket).wait())


@_kernel("dispatch_start")
def dispatch_start_impl(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank,
                        expert_alignment=1):
    args = DispatchArgs(x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank, expert_alignment, True)
    return _dispatch_start("deepep_ops.dispatch_start", "deepep_ops.dispatch_wait", args, buffer)


@_kernel("dispatch_wait")
def dispatch_wait_impl(ticket, overlap, x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank,
                       expert_alignment=1):
    args = DispatchArgs(x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank, expert_alignment, True)
    return _dispatch_wait("deepep_ops.dispatch_wait", ticket, args, buffer)


@_kernel("dispatch_exact_start")
def dispatch_exact_start_impl(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank,
                              expert_alignment=1):
    args = DispatchArgs(x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank, expert_alignment, False)
    return _dispatch_start("deepep_ops.dispatch_exact_start", "deepep_ops.dispatch_exact_wait", args, buffer)


@_kernel("dispatch_exact_wait")
def dispatch_exact_wait_impl(ticket, overlap, x, x_scales, topk_idx, topk_weights, buffer, num_experts,
                             num_max_tokens_per_rank, expert_alignment=1):
    args = DispatchArgs(x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank, expert_alignment, False)
    return _dispatch_wait("deepep_ops.dispatch_exact_wait", ticket, args, buffer)


@_kernel("combine_start")
def combine_start_impl(x, buffer, *handle):
    op = "deepep_ops.combine_start"
    handle = DispatchHandle(*handle)
    buf = unwrap_ep_buffer(buffer)
    admit_handle_call(op, buf, x, handle, (), lambda check_values: verdict(
        check_combine, op, x, handle, buf, None, check_values))
    return begin(buf, op, "deepep_ops.combine_wait", ticket_like(x), buf.backend.combine_async(x, handle))


@_kernel("combine_wait")
def combine_wait_impl(ticket, overlap, x, buffer, *handle):
    return take(unwrap_ep_buffer(buffer), "deepep_ops.combine_wait", ticket).wait()


# --- finalize's weight-and-reduce: no buffer, no collective (deepep_ops.reduce) -------------------
lib.impl("weight_and_reduce", without_dynamo(reduce.weight_and_reduce_any), "CompositeExplicitAutograd")
lib.impl("weight_and_reduce", without_dynamo(reduce.weight_and_reduce_cuda), "CUDA")
