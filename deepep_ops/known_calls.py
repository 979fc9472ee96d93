"""Known calls: repeats of a dispatch or combine whose metadata every rank agreed on.

A call is admitted before it reaches the backend in one of two ways:

- in full: this rank's checks (:mod:`deepep_ops.validation`) and every rank's
  agreement (:mod:`deepep_ops.agreement`), the slow part of the op layer;
- as a *known call*: in agree-once mode, a call whose tensors pass the guard of
  an earlier call that was admitted in full. One C++ guard
  (:func:`~deepep_ops._torch_compat.metadata_guard`: type, dtype, device,
  sizes, strides, ``requires_grad`` and the dispatch keys under the thread's
  modes) vouches for everything the checks read except tensor values, which
  are still checked where the policy asks for it.

Both the eager fast path (:mod:`deepep_ops.eager`) and the op kernels that
compiled graphs and the dispatcher run (:mod:`deepep_ops.ops`) admit calls
here, each under keys of their own (their threads' dispatch state differs).
Each :class:`EPOpsBuffer` keeps its known calls in one :class:`KnownCalls` store.
Check mode never remembers: it exchanges on every call.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from deepep_ops._torch_compat import metadata_guard
from deepep_ops.agreement import agree_combine, agree_dispatch
from deepep_ops.handle import HANDLE_TENSOR_FIELDS, DispatchArgs, DispatchHandle, num_expanded_tokens
from deepep_ops.pending import outstanding_error
from deepep_ops import validation
from deepep_ops.validation import (
    check_dispatch,
    check_topk_idx_values,
    device_of,
    row_major_args,
    value_checks_wanted,
    verdict,
)

#: Which caller a key belongs to: the eager fast path calls with the thread's own
#: dispatch state, an op kernel below the dispatcher's autograd layer.
EAGER, KERNEL = "eager", "kernel"


class KnownDispatch(NamedTuple):
    """What a dispatch remembers of a known call; eager handles carry it to combine
    (``DispatchedHandle.known``)."""

    #: The store (of one buffer) that remembered the call.
    store: "KnownCalls"
    #: ``check(x, [x_scales,] topk_idx, topk_weights) -> bool``: a call it passes has
    #: every property :func:`~deepep_ops.validation.check_dispatch` reads except
    #: tensor values.
    guard: Callable[..., bool]
    #: x, topk_idx and topk_weights already have row-major strides (no views to make).
    row_major: bool
    #: Decode: the handle's worst-case expanded rows X (fixed by R, M, K, E, A).
    num_expanded_tokens: Optional[int]
    #: Whether calls may need the host checks of topk_idx values
    #: (:func:`~deepep_ops.validation.value_checks_wanted`, the environment read
    #: once, here); each call still asks ``value_checks_enabled`` (capture state).
    value_checks: bool
    #: Eager path: guards of the combine inputs every rank agreed on for this call's
    #: handles (:func:`deepep_ops.eager.combine` adds them), keyed by whether ``out``
    #: was given. Dim 0 of x is free: prefill's X varies per call.
    combine_guards: dict


class KnownCalls:
    """One :class:`EPOpsBuffer`'s known calls (agree-once mode only). Bounded: a key
    holds T (and a prefill combine key its data-dependent row counts)."""

    #: Bound on the keys (one per T, dtype, ... seen).
    MAX_CALLS = 4096

    def __init__(self) -> None:
        self._calls: dict = {}

    def get(self, key: tuple):
        return self._calls.get(key)

    def remember(self, key: tuple, entry) -> None:
        if len(self._calls) >= self.MAX_CALLS:
            self._calls.clear()
        self._calls[key] = entry

    def __len__(self) -> int:
        return len(self._calls)

    def entries(self) -> list:
        """The remembered entries."""
        return list(self._calls.values())


# --------------------------------------------------------------------------- dispatch
def dispatch_key(path: str, args: DispatchArgs) -> Optional[tuple]:
    """Which known dispatch a call may repeat: the caller, the mode, T and the int
    arguments; the call's guard decides the rest. None for arguments that are not
    plain ints or an x without rows (the full checks name what is wrong)."""
    # Bools hash like ints, and the ops reject them. SymInts never reach a kernel.
    if (type(args.num_experts) is not int or type(args.num_max_tokens_per_rank) is not int
            or type(args.expert_alignment) is not int):
        return None
    try:
        return (path, args.decode, args.x_scales is None, args.x.shape[0], args.num_experts,
                args.num_max_tokens_per_rank, args.expert_alignment)
    except (AttributeError, IndexError, TypeError):  # not a tensor, or 0-d
        return None


def dispatch_tensors(args: DispatchArgs) -> tuple:
    """The tensor arguments a guard and the dispatcher's no-op test look at."""
    if args.x_scales is None:
        return args.x, args.topk_idx, args.topk_weights
    return args.x, args.x_scales, args.topk_idx, args.topk_weights


def known_dispatch(op: str, store: KnownCalls, key: Optional[tuple], args: DispatchArgs) -> Optional[tuple]:
    """``(args with row-major strides, its KnownDispatch)`` for a repeat of a known
    call (the value checks the policy asks for included: a rejection stays local,
    as in agree-once mode's full checks), or None."""
    known = None if key is None else store.get(key)
    if known is None:
        return None
    x, x_scales, topk_idx, topk_weights = args.x, args.x_scales, args.topk_idx, args.topk_weights
    if not (known.guard(x, topk_idx, topk_weights) if x_scales is None
            else known.guard(x, x_scales, topk_idx, topk_weights)):
        return None
    # Through the module: benchmarks switch the value checks off there (bench_prefill.py).
    if known.value_checks and validation.value_checks_enabled(x.device, args.decode):
        check_topk_idx_values(op, topk_idx, args.num_experts)
    return (args if known.row_major else row_major_args(args)), known


def admit_dispatch(op: str, buf, args: DispatchArgs, key: Optional[tuple],
                   error: Optional[Exception] = None) -> tuple:
    """Validate and agree in full: ``(args with row-major strides, the new
    KnownDispatch or None)``; in agree-once mode the call is remembered under
    ``key``. Tensors that need grad are remembered only for kernel keys (below
    autograd; the eager path must leave those to the dispatcher). ``error``: a
    verdict the caller already has (an async call in flight), agreed instead of
    the checks'."""
    agree_dispatch(op, buf, args, error or verdict(check_dispatch, op, args, buf))
    normal = row_major_args(args)
    device = args.x.device
    if key is None or buf.agreement.check_mode(device):
        return normal, None
    guard = metadata_guard(dispatch_tensors(args), allow_grad=key[0] == KERNEL)
    if guard is None:
        return normal, None
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


# --------------------------------------------------------------------------- handle ops (kernels)
def _handle_call_key(op: str, handle: DispatchHandle, x, extra: tuple) -> Optional[tuple]:
    try:
        return (KERNEL, op, handle.decode, handle.num_experts, handle.num_max_tokens_per_rank,
                handle.expert_alignment, handle.num_expanded_tokens, handle.topk_idx.shape[0],
                handle.recv_src_metadata.shape[0], x.shape[0], tuple(t is None for t in extra), handle.hybrid)
    except (AttributeError, IndexError, TypeError):
        return None


def _handle_call_tensors(x, handle: DispatchHandle, extra: tuple) -> tuple:
    """What a handle call's guard looks at: x, the given ``extra`` tensors and every
    handle tensor (the hybrid-only ones where the handle has them)."""
    hybrid = handle.hybrid_tensors if handle.hybrid else ()
    return (x, *(t for t in extra if t is not None), handle.topk_idx, *handle[HANDLE_TENSOR_FIELDS], *hybrid)


def admit_handle_call(op: str, buf, x: torch.Tensor, handle: DispatchHandle, extra: tuple,
                      full_check: Callable[[bool], Optional[Exception]]) -> None:
    """An op kernel's admission of a call that takes a handle (combine, combine_into,
    and the backward's cached dispatch and weighted combine; all agree as a
    combine does). A repeat of a call every rank agreed on (same op, sizes and
    statics; ``x``, the optional tensors in ``extra`` and the handle's tensors
    passing the guard) returns at once; anything else gets
    ``full_check(check_values)``, this rank's verdict (with the handle's values
    in check mode), and every rank's agreement, and is remembered in agree-once mode."""
    key = _handle_call_key(op, handle, x, extra)
    busy = outstanding_error(op, buf)
    guard = None if key is None or busy is not None else buf.known_calls.get(key)
    if guard is not None and guard(*_handle_call_tensors(x, handle, extra)):
        return
    check_values = buf.agreement.check_mode(device_of(x))
    agree_combine(op, buf, x, handle, busy or full_check(check_values))
    if key is not None and not check_values:
        guard = metadata_guard(_handle_call_tensors(x, handle, extra), allow_grad=True)
        if guard is not None:
            buf.known_calls.remember(key, guard)
