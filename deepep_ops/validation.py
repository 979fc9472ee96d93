"""Input checks of docs/deepep_contract.md §6, raised as Python errors before any communication.

DeepEP itself checks little on the host: bad ids read out of bounds, duplicate
ids trap the device, a wrong hidden size fails an NVCC compile. Everything that
can be checked on this rank alone is checked here, before the first collective,
so a rank never enters a collective that its own input would make fail.

Checks of tensor *values* (ids in range, no duplicates) need a verdict on the
host. They always run for CPU tensors and in exact (prefill) mode, which syncs
anyway (on CUDA: one Triton kernel and one host read, :mod:`deepep_ops.triton_validation`);
for GPU decode they would add a host sync per layer, so they run only with
``DEEPEP_OPS_CHECK_VALUES=1`` and never while a CUDA graph is captured.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from deepep_ops.layout import (
    COMBINE_HIDDEN_ALIGNMENT,
    DISPATCH_DTYPES,
    DISPATCH_ROW_BYTES_ALIGNMENT,
    HYBRID_MAX_SCALEOUT_RANKS,
    HYBRID_MAX_SCALEUP_PLUS_LOCAL_EXPERTS,
    HYBRID_MAX_SCALEUP_RANKS,
    INT32_MAX,
    MAX_EXPERTS,
    MAX_LOCAL_EXPERTS,
    MAX_RANKS,
    MAX_TOPK,
    TURN_HYBRID_MODE_OFF,
    decode_num_recv_tokens,
)
from deepep_ops._torch_compat import guard_or_false, version_counter
from deepep_ops.handle import (
    HANDLE_TENSOR_SPECS,
    DispatchArgs,
    DispatchedHandle,
    DispatchHandle,
    handle_dims,
    recv_rows,
)

_SCALE_DTYPES = (torch.float32, torch.int32)


def verdict(check, *args, **kwargs) -> Optional[Exception]:
    """The ``ValueError``/``TypeError`` that ``check(*args, **kwargs)`` raises, or None:
    this rank's verdict, which :mod:`deepep_ops.agreement` shares with its peers."""
    try:
        check(*args, **kwargs)
    except (ValueError, TypeError) as error:
        return error
    return None


def device_of(x: object) -> torch.device:
    """x's device (CPU for a non-tensor: its validation error reports it)."""
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D, ``is_contiguous()``) as a view with row-major strides.

    ``is_contiguous()`` ignores the strides of size-1 and empty dims: K=1 weights
    from ``torch.topk(...).values * c`` with T=0 have strides (1, 0), which byte
    views (and DeepEP's pointer arithmetic) reject. Same elements, no copy.
    """
    rows, cols = t.shape
    if t.stride(1) == 1 and (t.stride(0) == cols or rows <= 1):
        return t
    return t.as_strided((rows, cols), (cols, 1))


def row_major_args(args: DispatchArgs) -> DispatchArgs:
    """Validated dispatch ``args`` with row-major x, topk_idx and topk_weights
    (``args`` itself when they already are)."""
    x, topk_idx, topk_weights = row_major(args.x), row_major(args.topk_idx), row_major(args.topk_weights)
    if x is args.x and topk_idx is args.topk_idx and topk_weights is args.topk_weights:
        return args
    return args._replace(x=x, topk_idx=topk_idx, topk_weights=topk_weights)


def _is_int(v: object) -> bool:
    """A Python int (SymInts included: M may be symbolic), not a bool."""
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _fail(op: str, arg: str, expected: str, got: object, exc: type = ValueError) -> None:
    raise exc(f"{op}: {arg} must be {expected}, got {got}")


def _check_tensor(
    op: str, name: str, t: torch.Tensor, ndim: int, dtypes: tuple, device: torch.device, contiguous: bool = True
) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, name, "a torch.Tensor", type(t).__name__, TypeError)
    if t.dim() != ndim:
        _fail(op, name, f"{ndim}-D", f"shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        _fail(op, name, " or ".join(str(d) for d in dtypes), t.dtype, TypeError)
    if t.device != device:
        _fail(op, name, f"on {device} (the device of x)", t.device)
    if contiguous and not t.is_contiguous():
        _fail(op, name, "contiguous", f"strides {t.stride()} for shape {tuple(t.shape)}")


def value_checks_wanted(device: torch.device, decode: bool) -> bool:
    """The policy of the module doc, without the capture state: CPU tensors and
    prefill always, GPU decode with ``DEEPEP_OPS_CHECK_VALUES=1``."""
    return device.type == "cpu" or not decode or os.environ.get("DEEPEP_OPS_CHECK_VALUES") == "1"


def value_checks_enabled(device: torch.device, decode: bool) -> bool:
    """Whether checks that read tensor values on the host run now (see module doc)."""
    if device.type == "cpu":
        return True
    # GPU decode, the hot path: one dict lookup, no query of the capture state.
    if not value_checks_wanted(device, decode):
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _values_ok_on_device(topk_idx: torch.Tensor, num_experts: int) -> bool:
    """The verdict of one Triton kernel for CUDA ids (:mod:`deepep_ops.triton_validation`);
    False (look closer) elsewhere or without Triton."""
    if not topk_idx.is_cuda:
        return False
    try:
        from deepep_ops.triton_validation import topk_idx_values_ok
    except ImportError:  # a CUDA torch without Triton: the torch form below
        return False
    return topk_idx_values_ok(topk_idx, num_experts)


def check_topk_idx_values(op: str, topk_idx: torch.Tensor, num_experts: int) -> None:
    """Ids are −1 or in [0, E), and no expert repeats within a row.

    CUDA ids get one kernel and one host read first; the torch form (about ten
    kernels and two host reads) runs only to name what a flagged tensor holds.
    """
    if topk_idx.numel() == 0 or _values_ok_on_device(topk_idx, num_experts):
        return
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    if bool(bad.any()):
        t, k = (int(v) for v in bad.nonzero()[0])
        _fail(op, f"topk_idx[{t}, {k}]", f"-1 or in [0, num_experts={num_experts})", int(topk_idx[t, k]))
    ids = topk_idx.sort(dim=1).values
    dup = (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)
    if bool(dup.any()):
        t = int(dup.nonzero()[0, 0])
        _fail(op, f"topk_idx[{t}]", "free of repeated expert ids", topk_idx[t].tolist())


def check_dispatch(op: str, args: DispatchArgs, buf) -> None:
    """Every dispatch check of contract §6 that this rank can make on its own.

    ``buf``: the :class:`~deepep_ops.EPOpsBuffer` (its R, capacity and id dtype).
    """
    x, x_scales, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank, expert_alignment, decode = args
    num_ranks = buf.num_ranks
    if not isinstance(x, torch.Tensor):
        _fail(op, "x", "a torch.Tensor", type(x).__name__, TypeError)
    device = x.device
    _check_tensor(op, "x", x, 2, DISPATCH_DTYPES, device)
    T, H = x.shape
    row_alignment = DISPATCH_ROW_BYTES_ALIGNMENT // x.element_size()
    if H % row_alignment:
        _fail(op, "x.shape[1] (hidden)", f"a multiple of {row_alignment} for {x.dtype}", H)
    if x.dtype == torch.float8_e4m3fn and x_scales is None:
        _fail(op, "x_scales", "given when x is float8_e4m3fn", None)
    if x.dtype == torch.bfloat16 and x_scales is not None:
        _fail(op, "x_scales", "None when x is bfloat16", f"a {x_scales.dtype} tensor")
    if x_scales is not None:
        # DeepEP reads scales through their strides (contract §1): any layout will do.
        _check_tensor(op, "x_scales", x_scales, 2, _SCALE_DTYPES, device, contiguous=False)
        if x_scales.shape[0] != T:
            _fail(op, "x_scales.shape[0]", f"x.shape[0]={T}", x_scales.shape[0])
        if x_scales.shape[1] < 1:
            _fail(op, "x_scales.shape[1] (scale columns)", ">= 1", x_scales.shape[1])

    _check_tensor(op, "topk_idx", topk_idx, 2, (buf.topk_idx_dtype,), device)
    if topk_idx.shape[0] != T:
        _fail(op, "topk_idx.shape[0]", f"x.shape[0]={T}", topk_idx.shape[0])
    K = topk_idx.shape[1]
    if not 1 <= K <= MAX_TOPK:
        _fail(op, "topk_idx.shape[1] (num_topk)", f"in [1, {MAX_TOPK}]", K)
    _check_tensor(op, "topk_weights", topk_weights, 2, (torch.float32,), device)
    if tuple(topk_weights.shape) != (T, K):
        _fail(op, "topk_weights.shape", f"{(T, K)} (as topk_idx)", tuple(topk_weights.shape))

    if num_ranks > MAX_RANKS:
        _fail(op, "the EP group size", f"<= {MAX_RANKS}", num_ranks)
    if not _is_int(num_experts) or num_experts <= 0:
        _fail(op, "num_experts", "a positive int", repr(num_experts))
    if num_experts % num_ranks:
        _fail(op, "num_experts", f"divisible by the EP group size {num_ranks}", num_experts)
    if num_experts > MAX_EXPERTS:
        _fail(op, "num_experts", f"<= {MAX_EXPERTS}", num_experts)
    if num_experts // num_ranks > MAX_LOCAL_EXPERTS:
        _fail(op, "num_experts / num_ranks", f"<= {MAX_LOCAL_EXPERTS} local experts", num_experts // num_ranks)
    if not _is_int(expert_alignment) or expert_alignment < 1:
        _fail(op, "expert_alignment", ">= 1 (an int)", repr(expert_alignment))
    M = num_max_tokens_per_rank
    if not _is_int(M):
        _fail(op, "num_max_tokens_per_rank", "an int", repr(M), TypeError)
    if M <= 0:
        _fail(op, "num_max_tokens_per_rank", "> 0", M)
    if T > M:
        _fail(op, "x.shape[0] (tokens)", f"<= num_max_tokens_per_rank={M}", T)
    if buf.capacity > 0 and M > buf.capacity:
        _fail(op, "num_max_tokens_per_rank", f"<= the buffer capacity {buf.capacity}", M)
    if decode_num_recv_tokens(num_ranks, M) > INT32_MAX:
        _fail(op, "num_ranks * num_max_tokens_per_rank", f"<= {INT32_MAX} (int32 token ids)", num_ranks * M)
    if buf.num_scaleout_ranks > 1:
        check_hybrid_dispatch(op, args, buf)

    if value_checks_enabled(device, decode):
        check_topk_idx_values(op, topk_idx, num_experts)


def check_hybrid_dispatch(op: str, args: DispatchArgs, buf) -> None:
    """Hybrid mode's own limits (contract §9: DeepEP's hybrid kernels static-assert
    them, so past them the JIT compile fails), and a channel count the backend
    can tell (:meth:`EPOpsBuffer.num_channels <deepep_ops.EPOpsBuffer.num_channels>`,
    which raises ValueError naming the switch otherwise)."""
    S, U = buf.num_scaleout_ranks, buf.num_scaleup_ranks
    domain = f"hybrid mode ({S} scale-out x {U} scale-up ranks)"
    if S > HYBRID_MAX_SCALEOUT_RANKS:
        _fail(op, f"the scale-out ranks of {domain}", f"<= {HYBRID_MAX_SCALEOUT_RANKS}; {TURN_HYBRID_MODE_OFF}", S)
    if U > HYBRID_MAX_SCALEUP_RANKS:
        _fail(op, f"the scale-up ranks of {domain}", f"<= {HYBRID_MAX_SCALEUP_RANKS}; {TURN_HYBRID_MODE_OFF}", U)
    EL = args.num_experts // buf.num_ranks
    if U + EL > HYBRID_MAX_SCALEUP_PLUS_LOCAL_EXPERTS:
        _fail(op, f"scale-up ranks + num_experts / num_ranks in {domain}",
              f"<= {HYBRID_MAX_SCALEUP_PLUS_LOCAL_EXPERTS}; {TURN_HYBRID_MODE_OFF}", U + EL)
    if buf.num_channels(args) < 1:
        _fail(op, f"the channel count of {domain}", f">= 1; {TURN_HYBRID_MODE_OFF}", buf.num_channels(args))


def check_combine(
    op: str,
    x: torch.Tensor,
    handle: DispatchHandle,
    buf,
    out: Optional[torch.Tensor] = None,
    check_values: bool = False,
) -> None:
    """Combine checks of contract §6 plus the consistency of the handle with its mode;
    with ``check_values`` also the handle's values (:func:`check_handle_values`, a host read)."""
    num_ranks = buf.num_ranks
    check_routing_unchanged(op, handle)
    device = x.device
    _check_tensor(op, "x", x, 2, (torch.bfloat16,), device)
    H = x.shape[1]
    if H % COMBINE_HIDDEN_ALIGNMENT:
        _fail(op, "x.shape[1] (hidden)", f"a multiple of {COMBINE_HIDDEN_ALIGNMENT} (DeepEP combine kernels)", H)
    check_handle(op, handle, num_ranks, device, buf.num_scaleout_ranks)
    T = handle.topk_idx.shape[0]
    rows = recv_rows(handle)
    if x.shape[0] != rows:
        what = "rows dispatch returned" if handle.decode else "expanded rows dispatch_exact returned"
        _fail(op, "x.shape[0]", f"the {rows} {what}", x.shape[0])
    if out is not None:
        _check_tensor(op, "out", out, 2, (torch.bfloat16,), device)
        if tuple(out.shape) != (T, H):
            _fail(op, "out.shape", f"{(T, H)} (tokens, hidden)", tuple(out.shape))
    if check_values and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        check_handle_values(op, handle, num_ranks, x.shape[0])


def check_routing_unchanged(op: str, handle: DispatchHandle) -> None:
    """An eager handle's ``topk_idx`` still holds what was dispatched: its version
    counter has not moved since (an in-place write to it, or to a view of it,
    moves it). Combine would otherwise reduce with routing the dispatch never saw."""
    version = getattr(handle, "topk_idx_version", None)
    if version is not None and version_counter(handle.topk_idx) != version:
        _fail(op, "handle.topk_idx",
              "unchanged between dispatch and combine (it was written in place after dispatch, so combine "
              "would reduce with routing that was never dispatched; pass dispatch a tensor you do not modify, "
              "or a copy)", f"version {version_counter(handle.topk_idx)}, dispatched at version {version}")


def combine_rows_ok(x: torch.Tensor, handle: DispatchedHandle) -> bool:
    """For an eager dispatch's handle and an ``x`` whose other metadata a guard
    vouched for: x has the handle's rows, and the handle's routing is unchanged
    (:func:`check_routing_unchanged`). False means: check in full."""
    version = handle.topk_idx_version
    return (version is None or version_counter(handle.topk_idx) == version) and x.shape[0] == recv_rows(handle)


def check_combine_rows(
    op: str,
    x: torch.Tensor,
    handle: DispatchHandle,
    buf,
    out: Optional[torch.Tensor] = None,
) -> None:
    """:func:`check_combine` for a handle whose tensors an eager dispatch made (a
    :class:`~deepep_ops.handle.DispatchedHandle`): only ``x`` and ``out`` against
    it, in one expression; the full check names whatever is wrong."""
    check_routing_unchanged(op, handle)
    try:
        rows, H = x.shape
        device = handle.recv_src_metadata.device
        if (
            x.dtype == torch.bfloat16
            and x.is_contiguous()
            and H % COMBINE_HIDDEN_ALIGNMENT == 0
            and rows == recv_rows(handle)
            and x.device == device
            and (
                out is None
                or (
                    out.dtype == torch.bfloat16
                    and out.shape == (handle.topk_idx.shape[0], H)
                    and out.device == device
                    and out.is_contiguous()
                )
            )
        ):
            return
    except (AttributeError, TypeError, ValueError, IndexError):
        pass
    check_combine(op, x, handle, buf, out=out)


def check_handle_values(op: str, handle: DispatchHandle, num_ranks: int, num_rows: int) -> None:
    """The handle's values are those a dispatch of this mode returns (contract §3), so a
    relabelled, hand-made or corrupted handle fails here rather than combining to
    zeros or indexing out of bounds after the collective."""
    M = int(handle.num_max_tokens_per_rank)
    E = int(handle.num_experts)
    psum = handle.psum_num_recv_tokens_per_scaleup_rank.tolist()
    n_rows = handle.recv_src_metadata.shape[0]
    if psum and (psum[0] < 0 or any(b < a for a, b in zip(psum, psum[1:])) or psum[-1] > n_rows):
        _fail(op, "handle.psum_num_recv_tokens_per_scaleup_rank",
              f"a non-decreasing prefix sum in [0, {n_rows}] (rows of recv_src_metadata)", psum)
    n = psum[-1] if psum else 0
    if not handle.decode and n != n_rows:
        _fail(op, "handle.psum_num_recv_tokens_per_scaleup_rank[-1]",
              f"the {n_rows} rows of recv_src_metadata for a prefill handle; is this a dispatch (decode) handle?", n)
    meta = handle.recv_src_metadata[:n]
    src = meta[:, 0]
    if n and bool(((src < 0) | (src >= num_ranks * M)).any()):
        _fail(op, "handle.recv_src_metadata[:, 0] (source token ids)", f"in [0, R*M={num_ranks * M})",
              f"values in [{int(src.min())}, {int(src.max())}]")
    if not handle.decode and n:
        slots = meta[:, 2:]
        if bool(((slots < -1) | (slots >= num_rows)).any()):
            _fail(op, "handle.recv_src_metadata[:, 2:] (expanded slots)", f"-1 or in [0, {num_rows})",
                  f"values in [{int(slots.min())}, {int(slots.max())}]")
        if not bool((slots >= 0).any(dim=1).all()):
            _fail(op, "handle.recv_src_metadata[:, 2:] (expanded slots)",
                  "a slot >= 0 in every received row of a prefill handle; is this a dispatch (decode) handle?",
                  "a row without one")
    # Not the hybrid-only tensors: DeepEP leaves their cells past each terminator
    # uninitialised (contract §9), so no value test can tell a real handle from a bad one.
    ids = handle.topk_idx
    if ids.numel() and bool(((ids < -1) | (ids >= E)).any()):
        _fail(op, "handle.topk_idx", f"-1 or in [0, num_experts={E})", f"values in [{int(ids.min())}, {int(ids.max())}]")


def check_not_bool(op: str, **values: object) -> None:
    """The op schemas take ``int``, which turns ``True`` into 1 before the kernel
    sees it: the Python entry points reject bools themselves. Eager only: under
    Dynamo an isinstance test on a symbolic int specializes it."""
    if torch.compiler.is_compiling():
        return
    for name, v in values.items():
        if isinstance(v, bool):
            _fail(op, name, "an int, not a bool", repr(v), TypeError)


def check_token_bucket(tokens: object) -> None:
    """``token_bucket`` reads ``tokens.shape[0]``: a tensor of at least one dimension."""
    op = "deepep_ops.token_bucket"
    if not isinstance(tokens, torch.Tensor):
        _fail(op, "tokens", "a torch.Tensor", type(tokens).__name__, TypeError)
    if tokens.dim() < 1:
        _fail(op, "tokens", "a tensor of >= 1 dimension (its shape[0] is the token count)", "a 0-D tensor")


def check_weight_and_reduce(expert_output: object, topk_weights: object, topk_ids: object, *,
                            traced: bool = False) -> None:
    """``weight_and_reduce``'s static checks (ranks, dtypes, devices, k and the
    row count where it is known); the fake kernel runs them at trace time.

    ``traced``: the caller is code Dynamo traces
    (:func:`deepep_ops.reduce.weight_and_reduce_traced`, decode), and torch
    2.11's Dynamo cannot trace ``torch._check`` with a message function: rows a
    guard can compare are compared in Python (the op's message, at trace time);
    rows none can (unbacked, not provably equal) get a message-less run-time
    assert. Otherwise rows may be unbacked (prefill under torch.compile): a
    run-time check with the message, not a guard.
    """
    op = "deepep_ops.weight_and_reduce"
    for name, t, ndim in (("expert_output", expert_output, 3), ("topk_weights", topk_weights, 2),
                          ("topk_ids", topk_ids, 2)):
        if not isinstance(t, torch.Tensor):
            _fail(op, name, "a torch.Tensor", type(t).__name__, TypeError)
        if t.dim() != ndim:
            _fail(op, name, f"{ndim}-D", f"shape {tuple(t.shape)}")
    if expert_output.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        _fail(op, "expert_output.dtype", "torch.bfloat16, torch.float16 or torch.float32", expert_output.dtype,
              TypeError)
    if topk_weights.dtype != torch.float32:
        _fail(op, "topk_weights.dtype", "torch.float32", topk_weights.dtype, TypeError)
    if topk_ids.dtype not in (torch.int64, torch.int32):
        _fail(op, "topk_ids.dtype", "torch.int64 or torch.int32", topk_ids.dtype, TypeError)
    rows = expert_output.shape[0]
    for name, t in (("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        if t.device != expert_output.device:
            _fail(op, f"{name}.device", f"{expert_output.device} (the device of expert_output)", t.device)
        if t.shape[1] != expert_output.shape[1]:
            _fail(op, f"{name}.shape[1]", f"expert_output.shape[1] = {expert_output.shape[1]} (k)", t.shape[1])
        if traced:
            # Backed rows: compared (at most a guard), with the op's message. Rows
            # no guard can decide (unbacked, not provably equal): a run-time
            # assert, message-less since 2.11's Dynamo traces no message function.
            if guard_or_false(t.shape[0] != rows):
                _fail(op, f"{name}.shape[0]", f"expert_output.shape[0] = {rows} (rows)", t.shape[0])
            if not guard_or_false(t.shape[0] == rows):
                torch._check(t.shape[0] == rows)
        else:
            torch._check(
                t.shape[0] == rows,
                lambda t=t, name=name: f"{op}: {name}.shape[0] must be expert_output.shape[0] = "
                f"{rows} (rows), got {t.shape[0]}",
            )


# --- training (issue 14): the ops the backward passes call ---------------------------------------
def check_cached_dispatch(
    op: str, x: torch.Tensor, x_scales: Optional[torch.Tensor], handle: DispatchHandle, buf
) -> None:
    """``x`` [T, H] (bf16, or fp8 with scales) has the handle's T tokens; the handle is well formed."""
    if not isinstance(x, torch.Tensor):
        _fail(op, "x", "a torch.Tensor", type(x).__name__, TypeError)
    device = x.device
    _check_tensor(op, "x", x, 2, DISPATCH_DTYPES, device)
    row_alignment = DISPATCH_ROW_BYTES_ALIGNMENT // x.element_size()
    if x.shape[1] % row_alignment:
        _fail(op, "x.shape[1] (hidden)", f"a multiple of {row_alignment} for {x.dtype}", x.shape[1])
    if (x.dtype == torch.float8_e4m3fn) != (x_scales is not None):
        _fail(op, "x_scales", "given exactly when x is float8_e4m3fn", None if x_scales is None else x_scales.dtype)
    if x_scales is not None:
        _check_tensor(op, "x_scales", x_scales, 2, _SCALE_DTYPES, device, contiguous=False)
        if x_scales.shape[0] != x.shape[0]:
            _fail(op, "x_scales.shape[0]", f"x.shape[0]={x.shape[0]}", x_scales.shape[0])
    check_handle(op, handle, buf.num_ranks, device, buf.num_scaleout_ranks)
    if x.shape[0] != handle.topk_idx.shape[0]:
        _fail(op, "x.shape[0] (tokens)", f"the handle's {handle.topk_idx.shape[0]} dispatched tokens", x.shape[0])
    if buf.num_scaleout_ranks > 1:
        # DeepEP recomputes C from this call's token layout and asserts the handle's
        # shapes against it (contract §9): a cached dispatch of another dtype or
        # scale count may size its channels differently (bf16 vs fp8 with
        # prefer_overlap_with_compute=True).
        args = DispatchArgs(x, x_scales, handle.topk_idx, None, handle.num_experts, handle.num_max_tokens_per_rank,
                            handle.expert_alignment, handle.decode)
        num_channels = buf.num_channels(args)
        if num_channels != handle.num_channels:
            _fail(op, f"the channel count of this {x.dtype} cached dispatch in hybrid mode",
                  f"the handle's {handle.num_channels} (the dispatch's tokens had another dtype or scale count; "
                  "dispatch the same dtype, or with DeepEP prefer_overlap_with_compute=False, or "
                  f"{TURN_HYBRID_MODE_OFF})", num_channels)


def check_combine_with_weights(
    op: str, x: torch.Tensor, topk_weights: torch.Tensor, handle: DispatchHandle, buf
) -> None:
    """:func:`check_combine`, plus ``topk_weights`` float32 [rows, K] (decode) or [X] (prefill)."""
    check_combine(op, x, handle, buf)
    K = handle.topk_idx.shape[1]
    shape = (x.shape[0], K) if handle.decode else (x.shape[0],)
    _check_tensor(op, "topk_weights", topk_weights, len(shape), (torch.float32,), x.device)
    if tuple(topk_weights.shape) != shape:
        _fail(op, "topk_weights.shape", f"{shape} (rows of x{', K' if handle.decode else ''})",
              tuple(topk_weights.shape))


def check_handle(
    op: str, handle: DispatchHandle, num_ranks: int, device: torch.device, num_scaleout_ranks: int = 1
) -> None:
    """The handle's tensors have the shapes, dtypes and device of its mode and of
    the buffer's EP domain (the codec's :data:`~deepep_ops.handle.HANDLE_TENSOR_SPECS`:
    the hybrid-only tensors exactly when ``num_scaleout_ranks > 1``, C read off
    ``token_metadata_at_forward``); T <= M; N fits the mode."""
    for name in ("num_experts", "expert_alignment"):
        if not _is_int(getattr(handle, name)) or getattr(handle, name) < 1:
            _fail(op, f"handle.{name}", "a positive int", repr(getattr(handle, name)))
    if handle.num_experts % num_ranks:
        _fail(op, "handle.num_experts", f"divisible by the EP group size {num_ranks}", handle.num_experts)
    _check_tensor(op, "handle.topk_idx", handle.topk_idx, 2, (torch.int64, torch.int32), device)
    T = handle.topk_idx.shape[0]
    M = handle.num_max_tokens_per_rank
    if T > M:
        _fail(op, "handle.topk_idx.shape[0] (tokens)", f"<= num_max_tokens_per_rank={M}", T)
    _check_tensor(op, "handle.recv_src_metadata", handle.recv_src_metadata, 2, (torch.int32,), device)
    hybrid = num_scaleout_ranks > 1
    for name in ("token_metadata_at_forward", "channel_linked_list"):
        t = getattr(handle, name)
        if (t is None) == hybrid:
            what = (f"a tensor: the buffer is in hybrid mode ({num_scaleout_ranks} scale-out ranks); is this a "
                    "handle of a direct-mode buffer?") if hybrid else (
                "None: the buffer is in direct mode; is this a handle of a hybrid-mode buffer?")
            _fail(op, f"handle.{name}", what, "None" if t is None else f"a tensor of shape {tuple(t.shape)}")
    if hybrid:
        forward = handle.token_metadata_at_forward
        _check_tensor(op, "handle.token_metadata_at_forward", forward, 3, (torch.int32,), device)
        if forward.shape[0] < 1:
            _fail(op, "handle.token_metadata_at_forward.shape[0] (channels)", ">= 1", forward.shape[0])
    dims = handle_dims(handle, num_ranks, num_scaleout_ranks)
    for name, spec in HANDLE_TENSOR_SPECS.items():
        if spec.hybrid_only and not hybrid:
            continue
        t = getattr(handle, name)
        shape = spec.shape(dims)
        _check_tensor(op, f"handle.{name}", t, len(shape), (torch.int32,), device)
        if tuple(t.shape) != shape:
            _fail(op, f"handle.{name}.shape", str(shape), tuple(t.shape))
    n_rows = dims.num_recv_tokens
    if not handle.decode:
        if n_rows > decode_num_recv_tokens(num_ranks, M):
            _fail(op, "handle.recv_src_metadata.shape[0]", f"<= R*M = {num_ranks * M} for a prefill handle", n_rows)
    elif n_rows != decode_num_recv_tokens(num_ranks, M):
        _fail(
            op,
            "handle.recv_src_metadata.shape[0]",
            f"R*M = {num_ranks * M} for a decode (decode=True) handle; is this a dispatch_exact handle?",
            n_rows,
        )