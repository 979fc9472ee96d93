"""Autograd of the ``deepep_ops::`` ops (``torch.library.register_autograd``).

DeepEP moves rows; its backward moves gradients the opposite way along the same
routing, so every backward is the other op with the forward's handle:

- ``dispatch`` / ``dispatch_exact``: ``recv_x[row] = x[t]`` for each (token,
  destination rank) pair (decode) or (token, local lane) pair (prefill), so
  ``grad_x[t] = Σ_rows grad_recv_x[row]``, which is ``combine`` of the
  received-row gradients. ``recv_topk_weights`` carries ``topk_weights[t, k]``;
  its gradient comes back through DeepEP combine's ``topk_weights=``
  (``deepep_ops::combine_with_weights``): lane k takes the gradient of the
  rank that owns its expert. In decode mode the lanes of *other* ranks' experts
  are unspecified outputs (:class:`~deepep_ops.handle.DispatchResult`), so the
  gradient flowing into them is dropped, as are padding rows' gradients.
  ``x_scales`` and fp8 ``x`` get no gradient (``None``): quantized dispatch is
  not differentiable (fp8 rows cannot carry a bf16 gradient), and
  :meth:`deepep_ops.DeepEPPrepareFinalize.prepare` refuses
  ``use_fp8_dispatch=True`` on inputs that require grad rather than return none.
- ``combine``: ``out[t] = Σ_rows x[row]`` over the rows of token t, so
  ``grad_x[row] = grad_out[t]``: ``cached_dispatch`` of the output gradient
  (zero on decode padding rows ≥ psum[-1] and on prefill alignment padding).
- ``cached_dispatch``: as dispatch, ``grad_x = combine(grad_recv_x)``.

Gradient strides are undefined (torch 2.15's ``register_autograd`` says so: a
transpose or an expand in the loss hands a backward a non-contiguous gradient),
and every backward reaches a layout-sensitive kernel (DeepEP's combine asserts a
contiguous ``x``, its dispatch reads rows), so each makes its incoming gradients
contiguous before the op (``tests/test_training.py::test_non_contiguous_gradients``).

Saved state is graph values only: the handle's tensors and ints and the opaque
buffer (a graph input under ``torch.compile``). ``combine_into`` mutates its
``out`` and has no autograd (training uses ``combine``); ``combine_with_weights``
exists for the backward and has none either (no double backward).
"""

from __future__ import annotations

from typing import Optional

import torch

from deepep_ops._torch_compat import register_autograd_kernel
from deepep_ops.schemas import ASYNC_OPS
from deepep_ops.buffer import unwrap_ep_buffer
from deepep_ops.handle import (
    HANDLE_STATIC_FIELDS,
    DispatchArgs,
    DispatchHandle,
    dispatch_handle,
    dispatch_output_index,
    handle_args,
    recv_rows,
)

_NUM_HANDLE_FIELDS = len(DispatchHandle._fields)


def _save_handle(ctx, buffer, handle: DispatchHandle) -> None:
    # Tensors through save_for_backward (the hybrid-only ones when present); the
    # static ints (E, M, A, mode, X) as ctx values.
    hybrid = handle.hybrid_tensors if handle.hybrid else ()
    ctx.save_for_backward(handle.topk_idx, *handle.tensors, *hybrid)
    ctx.buffer = buffer
    ctx.handle_statics = handle[HANDLE_STATIC_FIELDS]


def _saved_handle(ctx) -> DispatchHandle:
    saved = ctx.saved_tensors
    n = HANDLE_STATIC_FIELDS.start  # topk_idx and the five tensors
    return DispatchHandle(*saved[:n], *ctx.handle_statics, *saved[n:])


def _received_rows_grad(recv: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """Zero the decode padding rows (≥ psum[-1]): DeepEP leaves them stale.
    Prefill padding rows are already zero (DeepEP's ``do_zero_padding``)."""
    if not handle.decode:
        return recv
    rows = recv.shape[0]
    real = torch.arange(rows, device=recv.device) < handle.psum_num_recv_tokens_per_scaleup_rank[-1]
    return torch.where(real.unsqueeze(1), recv, 0)


def _dispatch_backward(ctx, grad_recv_x: Optional[torch.Tensor], grad_recv_w: Optional[torch.Tensor]):
    handle = _saved_handle(ctx)
    rows = ctx.recv_rows
    if grad_recv_x is None:
        grad_recv_x = handle.topk_idx.new_zeros((rows, ctx.hidden), dtype=torch.bfloat16)
    if grad_recv_w is None:
        w_shape = (rows, handle.topk_idx.shape[1]) if handle.decode else (rows,)
        grad_recv_w = handle.topk_idx.new_zeros(w_shape, dtype=torch.float32)
    grad_x, grad_w = torch.ops.deepep_ops.combine_with_weights(
        grad_recv_x.to(torch.bfloat16).contiguous(), grad_recv_w.to(torch.float32).contiguous(),
        ctx.buffer, *handle_args(handle),
    )
    grad_x = grad_x.to(ctx.x_dtype) if ctx.x_differentiable else None
    return grad_x, grad_w


# ------------------------------------------------------------------------------ dispatch, dispatch_exact
def _dispatch_setup_context(decode: bool):
    """``setup_context`` of the dispatch op of this mode: the handle (through the
    codec, :func:`~deepep_ops.handle.dispatch_handle`) and where the gradients
    of ``recv_x`` and ``recv_topk_weights`` arrive."""

    def setup_context(ctx, inputs, output) -> None:
        x, x_scales, topk_idx, w, buffer, num_experts, m, a = inputs
        args = DispatchArgs(x, x_scales, topk_idx, w, num_experts, m, a, decode)
        buf = unwrap_ep_buffer(buffer)
        handle = dispatch_handle(args, output, buf.num_ranks, buf.hybrid)
        _save_handle(ctx, buffer, handle)
        ctx.recv_rows = recv_rows(handle)
        ctx.hidden = x.shape[1]
        ctx.x_dtype = x.dtype
        ctx.x_differentiable = x.dtype.is_floating_point and x.dtype.itemsize > 1  # not fp8
        ctx.grad_recv_x_index = dispatch_output_index(decode, "recv_x")
        ctx.grad_recv_w_index = dispatch_output_index(decode, "recv_topk_weights")

    return setup_context


def _dispatch_op_backward(ctx, *grads):
    grad_x, grad_w = _dispatch_backward(ctx, grads[ctx.grad_recv_x_index], grads[ctx.grad_recv_w_index])
    return grad_x, None, None, grad_w, None, None, None, None


# ------------------------------------------------------------------------------ combine
def _combine_setup_context(ctx, inputs, output) -> None:
    x, buffer, *handle = inputs
    _save_handle(ctx, buffer, DispatchHandle(*handle))
    ctx.x_dtype = x.dtype


def _combine_backward(ctx, grad_out):
    handle = _saved_handle(ctx)
    recv, _ = torch.ops.deepep_ops.cached_dispatch(
        grad_out.to(torch.bfloat16).contiguous(), None, ctx.buffer, *handle_args(handle)
    )
    return (_received_rows_grad(recv, handle).to(ctx.x_dtype), None) + (None,) * _NUM_HANDLE_FIELDS


# ------------------------------------------------------------------------------ cached_dispatch
def _cached_dispatch_setup_context(ctx, inputs, output) -> None:
    x, _x_scales, buffer, *handle = inputs
    _save_handle(ctx, buffer, DispatchHandle(*handle))
    ctx.x_dtype = x.dtype
    ctx.x_differentiable = x.dtype.is_floating_point and x.dtype.itemsize > 1


def _cached_dispatch_backward(ctx, grad_recv_x, _g_scales):
    grad_x = None
    if ctx.x_differentiable and grad_recv_x is not None:
        handle = _saved_handle(ctx)
        grad_x = torch.ops.deepep_ops.combine(
            grad_recv_x.to(torch.bfloat16).contiguous(), ctx.buffer, *handle_args(handle)
        ).to(ctx.x_dtype)
    return (grad_x, None, None) + (None,) * _NUM_HANDLE_FIELDS


def register(lib: torch.library.Library, kernels: dict) -> None:
    """Attach the backward formulas to the ops of ``lib`` (called once by ``import
    deepep_ops``); ``kernels``: op name -> its kernel, which the Autograd kernel
    calls directly where nothing records (inside compiled graphs, eager calls
    without grad: :func:`~deepep_ops._torch_compat.register_autograd_kernel`)."""
    for name, backward, setup in (
        ("dispatch", _dispatch_op_backward, _dispatch_setup_context(decode=True)),
        ("dispatch_exact", _dispatch_op_backward, _dispatch_setup_context(decode=False)),
        ("combine", _combine_backward, _combine_setup_context),
        ("cached_dispatch", _cached_dispatch_backward, _cached_dispatch_setup_context),
    ):
        register_autograd_kernel(lib, name, kernels[name], backward, setup)
    # The async ops have no gradient: where autograd would record, a clear error
    # instead of outputs that silently carry none.
    for name in ASYNC_OPS:
        register_autograd_kernel(
            lib, name, kernels[name], None, None,
            no_grad_error=(
                f"deepep_ops.{name}: the async ops have no gradient, and an input requires grad; "
                "use the synchronous ops (dispatch / dispatch_exact / combine) to train, or detach the inputs"
            ),
        )
