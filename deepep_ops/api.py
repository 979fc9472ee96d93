"""Python entry points over the ``deepep_ops::`` ops; traceable by Dynamo.

They call the ops (or, eagerly, :mod:`deepep_ops.eager`), turn the ops' flat
outputs into :class:`DispatchResult` / :class:`ExactDispatchResult` through the
codec (:mod:`deepep_ops.handle`) and take the handle back as one value.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from deepep_ops import eager, ops  # noqa: F401  (ops: defines torch.ops.deepep_ops)
from deepep_ops._torch_compat import eager_mode_is_plain
from deepep_ops.buffer import EPOpsBuffer
from deepep_ops.handle import (
    DispatchArgs,
    DispatchHandle,
    DispatchResult,
    ExactDispatchResult,
    handle_args,
    unpack_dispatch,
)
from deepep_ops.layout import IntLike
from deepep_ops.validation import check_not_bool


def _eager_prologue(op: str, topk_idx: torch.Tensor, num_experts: object, expert_alignment: object) -> torch.Tensor:
    """The dispatcher path's prologue. Eager: reject bools (the ``int`` schema would
    turn ``True`` into 1) and return a copy of ``topk_idx`` for the handle, so that
    combine sees what was dispatched even if the caller reuses or mutates
    ``topk_idx`` afterwards (the fast path keeps the caller's tensor and checks
    its version counter at combine instead). Compiled graphs keep the caller's tensor: what the compiler sees
    stays as it was (a mutation inside a compiled region between dispatch and
    combine is then the caller's to avoid)."""
    if torch.compiler.is_compiling():
        return topk_idx
    check_not_bool(op, num_experts=num_experts, expert_alignment=expert_alignment)
    return topk_idx.clone() if isinstance(topk_idx, torch.Tensor) else topk_idx


#: Whether these wrappers may try the ops' kernels without the dispatcher
#: (:mod:`deepep_ops.eager`, which still asks the dispatcher's no-op test of
#: the tensors whenever a call is not a known one): not tracing, no
#: torch-function mode, no profiler. Tests turn the fast path off by replacing it.
_eager_mode_is_plain = eager_mode_is_plain


def _dispatch(
    decode: bool, x, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment, x_scales
) -> Union[DispatchResult, ExactDispatchResult]:
    """:func:`dispatch` (``decode``) or :func:`dispatch_exact`."""
    if _eager_mode_is_plain():
        result = eager.dispatch(
            decode, x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment
        )
        if result is not None:
            return result
    if decode:
        op, name = torch.ops.deepep_ops.dispatch, "deepep_ops.dispatch"
    else:
        op, name = torch.ops.deepep_ops.dispatch_exact, "deepep_ops.dispatch_exact"
    topk_idx = _eager_prologue(name, topk_idx, num_experts, expert_alignment)
    outputs = op(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment)
    args = DispatchArgs(x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank, expert_alignment, decode)
    num_ranks, num_scaleout_ranks = buffer.rank_layout()
    return unpack_dispatch(args, outputs, num_ranks, num_scaleout_ranks > 1)


def dispatch(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    buffer: EPOpsBuffer,
    *,
    num_experts: int,
    num_max_tokens_per_rank: IntLike,
    expert_alignment: int = 1,
    x_scales: Optional[torch.Tensor] = None,
) -> DispatchResult:
    """Decode-mode dispatch (no expand, no CPU sync, CUDA-graph safe).

    Args:
        x: [T, H] bf16, or float8_e4m3fn with ``x_scales``.
        topk_idx: [T, K] int64 global expert ids, −1 for an empty slot.
        topk_weights: [T, K] float32.
        buffer: the :class:`EPOpsBuffer`.
        num_experts: E, a multiple of the EP group size.
        num_max_tokens_per_rank: M, the same on every rank, T <= M <= capacity
            (see :func:`deepep_ops.pow2_bucket`).
        expert_alignment: A.
        x_scales: [T, P] float32 (or int32 packed) scales of fp8 ``x``.
    """
    return _dispatch(
        True, x, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment, x_scales
    )


def dispatch_exact(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    buffer: EPOpsBuffer,
    *,
    num_experts: int,
    num_max_tokens_per_rank: IntLike,
    expert_alignment: int = 1,
    x_scales: Optional[torch.Tensor] = None,
) -> ExactDispatchResult:
    """Prefill-mode dispatch (expand + CPU sync): exact, data-dependent sizes.

    Same arguments as :func:`dispatch`; ``num_max_tokens_per_rank`` is usually
    the buffer capacity. Not CUDA-graph capturable.
    """
    return _dispatch(
        False, x, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment, x_scales
    )


def combine(x: torch.Tensor, handle: DispatchHandle, buffer: EPOpsBuffer) -> torch.Tensor:
    """Send expert outputs back and reduce them per token (docs/deepep_contract.md §4, unweighted).

    Args:
        x: bf16 expert outputs with the rows of ``recv_x``: [R·M, H] after
            :func:`dispatch` (each row already weighted and reduced over this
            rank's experts), [X, H] after :func:`dispatch_exact` (one row per
            (token, expert); rows of one token are summed here).
        handle: the dispatch's handle.

    Returns:
        [T, H] bf16.
    """
    if _eager_mode_is_plain():
        result = eager.combine("deepep_ops.combine", x, buffer, handle)
        if result is not None:
            return result
    return torch.ops.deepep_ops.combine(x, buffer, *handle_args(handle))


def combine_into(out: torch.Tensor, x: torch.Tensor, handle: DispatchHandle, buffer: EPOpsBuffer) -> None:
    """:func:`combine` writing its [T, H] bf16 result into ``out``."""
    if _eager_mode_is_plain() and eager.combine("deepep_ops.combine_into", x, buffer, handle, out) is not None:
        return
    torch.ops.deepep_ops.combine_into(out, x, buffer, *handle_args(handle))


def cached_dispatch(
    x: torch.Tensor, handle: DispatchHandle, buffer: EPOpsBuffer, *, x_scales: Optional[torch.Tensor] = None
) -> tuple:
    """Dispatch ``x`` along ``handle``'s routing (DeepEP's ``dispatch(x, handle=...)``).

    Args:
        x: [T, H] bf16 (or float8_e4m3fn with ``x_scales`` [T, P]), T the handle's tokens.
        handle: from :func:`dispatch` or :func:`dispatch_exact`; its mode is kept.

    Returns:
        ``(recv_x, recv_x_scales or None)``: [R·M, H] rows in decode mode (rows ≥
        ``psum_num_recv_tokens_per_scaleup_rank[-1]`` unspecified), [X, H] in
        prefill mode (padding rows zero); the rows of the original dispatch.
    """
    recv_x, recv_x_scales = torch.ops.deepep_ops.cached_dispatch(x, x_scales, buffer, *handle_args(handle))
    return recv_x, recv_x_scales


# ---------------------------------------------------------------------------
# Asynchrony: start the communication, compute something independent, wait.
# ---------------------------------------------------------------------------


class PendingDispatch(NamedTuple):
    """A started dispatch (:func:`dispatch_start` / :func:`dispatch_exact_start`):
    hand it to :func:`dispatch_wait` once. ``ticket`` is the start op's output;
    ``args`` and ``buffer`` are its arguments."""

    ticket: torch.Tensor
    args: DispatchArgs
    buffer: EPOpsBuffer


class PendingCombine(NamedTuple):
    """A started combine (:func:`combine_start`): hand it to :func:`combine_wait` once."""

    ticket: torch.Tensor
    x: torch.Tensor
    handle: DispatchHandle
    buffer: EPOpsBuffer


def _dispatch_start(
    decode: bool, x, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment, x_scales
) -> PendingDispatch:
    if decode:
        op, name = torch.ops.deepep_ops.dispatch_start, "deepep_ops.dispatch_start"
    else:
        op, name = torch.ops.deepep_ops.dispatch_exact_start, "deepep_ops.dispatch_exact_start"
    topk_idx = _eager_prologue(name, topk_idx, num_experts, expert_alignment)
    ticket = op(x, x_scales, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment)
    args = DispatchArgs(x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank, expert_alignment, decode)
    return PendingDispatch(ticket, args, buffer)


def dispatch_start(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    buffer: EPOpsBuffer,
    *,
    num_experts: int,
    num_max_tokens_per_rank: IntLike,
    expert_alignment: int = 1,
    x_scales: Optional[torch.Tensor] = None,
) -> PendingDispatch:
    """Start a decode-mode :func:`dispatch` (same arguments); :func:`dispatch_wait`
    returns its :class:`DispatchResult`. In between the tokens are in flight
    (real DeepEP: on its communication stream; the reference buffer: gloo's or
    NCCL's asynchronous all-to-all), so independent work (a shared expert)
    overlaps them. At most one async call per buffer is in flight; no
    gradient (inputs that require grad are refused)."""
    return _dispatch_start(
        True, x, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment, x_scales
    )


def dispatch_exact_start(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    buffer: EPOpsBuffer,
    *,
    num_experts: int,
    num_max_tokens_per_rank: IntLike,
    expert_alignment: int = 1,
    x_scales: Optional[torch.Tensor] = None,
) -> PendingDispatch:
    """Start a prefill-mode :func:`dispatch_exact` (same arguments); :func:`dispatch_wait`
    returns its :class:`ExactDispatchResult`, whose data-dependent sizes come from the wait."""
    return _dispatch_start(
        False, x, topk_idx, topk_weights, buffer, num_experts, num_max_tokens_per_rank, expert_alignment, x_scales
    )


def dispatch_wait(
    pending: PendingDispatch, overlap: Sequence[torch.Tensor] = ()
) -> Union[DispatchResult, ExactDispatchResult]:
    """Wait for a started dispatch: its :class:`DispatchResult` (decode) or
    :class:`ExactDispatchResult` (prefill). A second wait, or a wait for another
    start's ticket, is a ``ValueError``.

    ``overlap``: the results of the work done between start and wait (a shared
    expert's output). The wait does not read them, but under ``torch.compile``
    they must exist before it, so that work stays between the start and the wait
    (Inductor would otherwise be free to schedule it after)."""
    ticket, args, buffer = pending
    op = torch.ops.deepep_ops.dispatch_wait if args.decode else torch.ops.deepep_ops.dispatch_exact_wait
    outputs = op(ticket, list(overlap), args.x, args.x_scales, args.topk_idx, args.topk_weights, buffer,
                 args.num_experts, args.num_max_tokens_per_rank, args.expert_alignment)
    num_ranks, num_scaleout_ranks = buffer.rank_layout()
    return unpack_dispatch(args, outputs, num_ranks, num_scaleout_ranks > 1)


def combine_start(x: torch.Tensor, handle: DispatchHandle, buffer: EPOpsBuffer) -> PendingCombine:
    """Start a :func:`combine` (same arguments); :func:`combine_wait` returns its [T, H] bf16."""
    ticket = torch.ops.deepep_ops.combine_start(x, buffer, *handle_args(handle))
    return PendingCombine(ticket, x, handle, buffer)


def combine_wait(pending: PendingCombine, overlap: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """Wait for a started combine: [T, H] bf16. ``overlap``: as :func:`dispatch_wait`'s."""
    ticket, x, handle, buffer = pending
    return torch.ops.deepep_ops.combine_wait(ticket, list(overlap), x, buffer, *handle_args(handle))
