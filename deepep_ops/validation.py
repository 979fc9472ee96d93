"""Input checks of spec §6, raised as Python errors before any communication.

DeepEP itself checks little on the host: bad ids read out of bounds, duplicate
ids trap the device, a wrong hidden size fails an NVCC compile. Everything that
can be checked on this rank alone is checked here, before the first collective,
so a rank never enters a collective that its own input would make fail.

Checks of tensor *values* (ids in range, no duplicates) need the data on the
host. They always run for CPU tensors and in exact (prefill) mode, which syncs
anyway; for GPU decode they would add a host sync per layer, so they run only
with ``DEEPEP_OPS_CHECK_VALUES=1`` and never while a CUDA graph is captured.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from deepep_ops.layout import (
    COMBINE_HIDDEN_ALIGNMENT,
    DISPATCH_DTYPES,
    DISPATCH_ROW_BYTES_ALIGNMENT,
    INT32_MAX,
    MAX_EXPERTS,
    MAX_LOCAL_EXPERTS,
    MAX_RANKS,
    MAX_TOPK,
    decode_num_recv_tokens,
    recv_src_metadata_cols,
)
from deepep_ops.handle import HANDLE_TENSOR_SPECS, HANDLE_TENSORS, DispatchHandle, HandleDims, handle_dims

_SCALE_DTYPES = (torch.float32, torch.int32)
# The int32 handle tensors as a slice of DispatchHandle, and their specs in that order.
_FIRST_HANDLE_TENSOR = DispatchHandle._fields.index(HANDLE_TENSORS[0])
_END_HANDLE_TENSORS = _FIRST_HANDLE_TENSOR + len(HANDLE_TENSORS)


def _handle_shapes(R: int, EL: int, N: int, T: int, K: int) -> tuple:
    """The int32 handle tensors' shapes, in :data:`HANDLE_TENSORS` order (hot path)."""
    return ((R,), (EL,), (EL,), (N, recv_src_metadata_cols(K)), (T, K))


_dims = HandleDims(2, 3, 5, 7, 11)
assert HANDLE_TENSORS[3] == "recv_src_metadata" and _handle_shapes(*_dims) == tuple(
    spec.shape(_dims) for spec in HANDLE_TENSOR_SPECS.values()
), "validation._handle_shapes has drifted from handle.HANDLE_TENSOR_SPECS"
del _dims


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


def value_checks_enabled(device: torch.device, exact: bool) -> bool:
    """Whether checks that read tensor values on the host run (see module doc)."""
    if device.type == "cpu":
        return True
    # GPU decode, the hot path: one dict lookup, no query of the capture state.
    if not exact and os.environ.get("DEEPEP_OPS_CHECK_VALUES") != "1":
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def check_topk_idx_values(op: str, topk_idx: torch.Tensor, num_experts: int) -> None:
    """Ids are −1 or in [0, E), and no expert repeats within a row."""
    if topk_idx.numel() == 0:
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


def check_dispatch(
    op: str,
    x: torch.Tensor,
    x_scales: Optional[torch.Tensor],
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    num_ranks: int,
    capacity: int,
    topk_idx_dtype: torch.dtype,
    num_experts: int,
    num_max_tokens_per_rank: int,
    expert_alignment: int,
    exact: bool,
) -> None:
    """Every dispatch check of spec §6 that this rank can make on its own."""
    if not _dispatch_is_valid(
        x, x_scales, topk_idx, topk_weights, num_ranks, capacity, topk_idx_dtype, num_experts,
        num_max_tokens_per_rank, expert_alignment,
    ):
        _explain_dispatch(
            op, x, x_scales, topk_idx, topk_weights, num_ranks=num_ranks, capacity=capacity,
            topk_idx_dtype=topk_idx_dtype, num_experts=num_experts,
            num_max_tokens_per_rank=num_max_tokens_per_rank, expert_alignment=expert_alignment,
        )
    if value_checks_enabled(x.device, exact):
        check_topk_idx_values(op, topk_idx, num_experts)


# Each check runs twice over: a predicate that is one chain of attribute reads and
# comparisons (the hot path, ~1 µs a call), and, only when it fails, the
# explaining checker that finds the first violated rule and raises its message.
# The predicate accepts a subset of what the explaining checker accepts (when in
# doubt it says no), so a wrong predicate costs time, never a missed error.


def _dispatch_is_valid(
    x, x_scales, topk_idx, topk_weights, num_ranks, capacity, topk_idx_dtype, num_experts, M, alignment
) -> bool:
    """True if every shape, dtype, device and size rule of :func:`check_dispatch` holds."""
    # Non-tensors and wrong ranks raise here (AttributeError, TypeError, ValueError or
    # IndexError): the explaining checker then names them.
    try:
        if x.dim() != 2 or not x.is_contiguous():
            return False
        device = x.device
        T, H = x.shape
        K = topk_idx.shape[1]
        if x_scales is None:
            if x.dtype != torch.bfloat16 or H % (DISPATCH_ROW_BYTES_ALIGNMENT // 2):
                return False
        elif not (
            x.dtype == torch.float8_e4m3fn
            and H % DISPATCH_ROW_BYTES_ALIGNMENT == 0
            and x_scales.dim() == 2
            and x_scales.dtype in _SCALE_DTYPES
            and x_scales.device == device
            and x_scales.shape[0] == T
        ):
            return False
        return _dispatch_rest_is_valid(
            topk_idx, topk_weights, device, T, K, num_ranks, capacity, topk_idx_dtype, num_experts, M, alignment
        )
    except (AttributeError, TypeError, ValueError, IndexError):
        return False


def _dispatch_rest_is_valid(
    topk_idx, topk_weights, device, T, K, num_ranks, capacity, topk_idx_dtype, num_experts, M, alignment
) -> bool:
    """The routing tensors' and the sizes' part of :func:`_dispatch_is_valid`."""
    return (
        topk_idx.dim() == 2
        and topk_idx.dtype == topk_idx_dtype
        and topk_idx.device == device
        and topk_idx.shape[0] == T
        and 1 <= K <= MAX_TOPK
        and topk_idx.is_contiguous()
        and topk_weights.dtype == torch.float32
        and topk_weights.device == device
        and topk_weights.shape == (T, K)
        and topk_weights.is_contiguous()
        and num_ranks <= MAX_RANKS
        and type(num_experts) is int
        and 0 < num_experts <= MAX_EXPERTS
        and num_experts % num_ranks == 0
        and num_experts // num_ranks <= MAX_LOCAL_EXPERTS
        and type(alignment) is int
        and alignment >= 1
        and type(M) is int
        and 0 < M
        and T <= M
        and (capacity <= 0 or M <= capacity)
        and decode_num_recv_tokens(num_ranks, M) <= INT32_MAX
    )


def _explain_dispatch(
    op: str,
    x: torch.Tensor,
    x_scales: Optional[torch.Tensor],
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    num_ranks: int,
    capacity: int,
    topk_idx_dtype: torch.dtype,
    num_experts: int,
    num_max_tokens_per_rank: int,
    expert_alignment: int,
) -> None:
    """Raise the error of the first dispatch rule the arguments break (none: return)."""
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
        # DeepEP reads scales through their strides (spec §1): any layout will do.
        _check_tensor(op, "x_scales", x_scales, 2, _SCALE_DTYPES, device, contiguous=False)
        if x_scales.shape[0] != T:
            _fail(op, "x_scales.shape[0]", f"x.shape[0]={T}", x_scales.shape[0])

    _check_tensor(op, "topk_idx", topk_idx, 2, (topk_idx_dtype,), device)
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
    if not isinstance(num_experts, int) or num_experts <= 0:
        _fail(op, "num_experts", "a positive int", num_experts)
    if num_experts % num_ranks:
        _fail(op, "num_experts", f"divisible by the EP group size {num_ranks}", num_experts)
    if num_experts > MAX_EXPERTS:
        _fail(op, "num_experts", f"<= {MAX_EXPERTS}", num_experts)
    if num_experts // num_ranks > MAX_LOCAL_EXPERTS:
        _fail(op, "num_experts / num_ranks", f"<= {MAX_LOCAL_EXPERTS} local experts", num_experts // num_ranks)
    if not isinstance(expert_alignment, int) or expert_alignment < 1:
        _fail(op, "expert_alignment", ">= 1", expert_alignment)
    M = num_max_tokens_per_rank
    if M <= 0:
        _fail(op, "num_max_tokens_per_rank", "> 0", M)
    if T > M:
        _fail(op, "x.shape[0] (tokens)", f"<= num_max_tokens_per_rank={M}", T)
    if capacity > 0 and M > capacity:
        _fail(op, "num_max_tokens_per_rank", f"<= the buffer capacity {capacity}", M)
    if decode_num_recv_tokens(num_ranks, M) > INT32_MAX:
        _fail(op, "num_ranks * num_max_tokens_per_rank", f"<= {INT32_MAX} (int32 token ids)", num_ranks * M)


def check_combine(
    op: str,
    x: torch.Tensor,
    handle: DispatchHandle,
    *,
    num_ranks: int,
    out: Optional[torch.Tensor] = None,
) -> None:
    """Combine checks of spec §6 plus the consistency of the handle with its mode."""
    if not _combine_is_valid(x, handle, num_ranks, out):
        _explain_combine(op, x, handle, num_ranks=num_ranks, out=out)


def check_combine_rows(
    op: str,
    x: torch.Tensor,
    handle: DispatchHandle,
    *,
    num_ranks: int,
    out: Optional[torch.Tensor] = None,
) -> None:
    """:func:`check_combine` for a handle whose tensors dispatch made (a
    :class:`~deepep_ops.handle.DispatchedHandle`): only ``x`` and ``out`` against it."""
    try:
        rows, H = x.shape
        device = handle.recv_src_metadata.device
        if (
            x.dtype == torch.bfloat16
            and x.is_contiguous()
            and H % COMBINE_HIDDEN_ALIGNMENT == 0
            and rows == (handle.num_expanded_tokens if handle.do_expand else handle.recv_src_metadata.shape[0])
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
    _explain_combine(op, x, handle, num_ranks=num_ranks, out=out)


def _combine_is_valid(x, handle: DispatchHandle, num_ranks: int, out) -> bool:
    """True if every rule of :func:`check_combine` holds (see :func:`_dispatch_is_valid`)."""
    # A non-tensor anywhere raises AttributeError/TypeError here: the explaining
    # checker then names it (cheaper than an isinstance per tensor).
    try:
        int32 = torch.int32
        topk_idx, recv_src_metadata = handle.topk_idx, handle.recv_src_metadata
        rows, H = x.shape
        T, K = topk_idx.shape
        n_rows = recv_src_metadata.shape[0]
        device = x.device
        M = handle.num_max_tokens_per_rank
        if not (
            x.dtype == torch.bfloat16
            and x.is_contiguous()
            and H % COMBINE_HIDDEN_ALIGNMENT == 0
            and topk_idx.dtype in (torch.int64, int32)
            and topk_idx.device == device
            and topk_idx.is_contiguous()
            and T <= M
        ):
            return False
        if handle.do_expand:
            if not (n_rows <= decode_num_recv_tokens(num_ranks, M) and rows == handle.num_expanded_tokens):
                return False
        elif not (n_rows == decode_num_recv_tokens(num_ranks, M) and rows == n_rows):
            return False
        psum_rank, psum_expert, unaligned, _, slots = handle[_FIRST_HANDLE_TENSOR:_END_HANDLE_TENSORS]
        EL = handle.num_experts // num_ranks
        # Unrolled (one tuple compare per property) for speed; _handle_shapes is
        # checked against HANDLE_TENSOR_SPECS at import.
        if not (
            (psum_rank.shape, psum_expert.shape, unaligned.shape, recv_src_metadata.shape, slots.shape)
            == _handle_shapes(num_ranks, EL, n_rows, T, K)
            and psum_rank.dtype is int32
            and psum_expert.dtype is int32
            and unaligned.dtype is int32
            and recv_src_metadata.dtype is int32
            and slots.dtype is int32
            and psum_rank.device == device
            and psum_expert.device == device
            and unaligned.device == device
            and recv_src_metadata.device == device
            and slots.device == device
            and psum_rank.is_contiguous()
            and psum_expert.is_contiguous()
            and unaligned.is_contiguous()
            and recv_src_metadata.is_contiguous()
            and slots.is_contiguous()
        ):
            return False
        if out is None:
            return True
        return out.dtype == torch.bfloat16 and out.device == device and out.shape == (T, H) and out.is_contiguous()
    except (AttributeError, TypeError, ValueError, IndexError):
        return False


def _explain_combine(
    op: str,
    x: torch.Tensor,
    handle: DispatchHandle,
    *,
    num_ranks: int,
    out: Optional[torch.Tensor] = None,
) -> None:
    """Raise the error of the first combine rule the arguments break (none: return)."""
    device = x.device
    _check_tensor(op, "x", x, 2, (torch.bfloat16,), device)
    H = x.shape[1]
    if H % COMBINE_HIDDEN_ALIGNMENT:
        _fail(op, "x.shape[1] (hidden)", f"a multiple of {COMBINE_HIDDEN_ALIGNMENT} (DeepEP combine kernels)", H)
    _check_tensor(op, "handle.topk_idx", handle.topk_idx, 2, (torch.int64, torch.int32), device)
    T, K = handle.topk_idx.shape
    M = handle.num_max_tokens_per_rank
    if T > M:
        _fail(op, "handle.topk_idx.shape[0] (tokens)", f"<= num_max_tokens_per_rank={M}", T)
    _check_tensor(op, "handle.recv_src_metadata", handle.recv_src_metadata, 2, (torch.int32,), device)
    dims = handle_dims(handle, num_ranks)
    for name, spec in HANDLE_TENSOR_SPECS.items():
        t = getattr(handle, name)
        shape = spec.shape(dims)
        _check_tensor(op, f"handle.{name}", t, len(shape), (torch.int32,), device)
        if tuple(t.shape) != shape:
            _fail(op, f"handle.{name}.shape", str(shape), tuple(t.shape))
    n_rows = dims.num_recv_tokens
    if handle.do_expand:
        if n_rows > decode_num_recv_tokens(num_ranks, M):
            _fail(op, "handle.recv_src_metadata.shape[0]", f"<= R*M = {num_ranks * M} for an expand handle", n_rows)
        if x.shape[0] != handle.num_expanded_tokens:
            _fail(op, "x.shape[0]", f"the {handle.num_expanded_tokens} expanded rows dispatch_exact returned", x.shape[0])
    else:
        if n_rows != decode_num_recv_tokens(num_ranks, M):
            _fail(
                op,
                "handle.recv_src_metadata.shape[0]",
                f"R*M = {num_ranks * M} for a decode (do_expand=False) handle; is this a dispatch_exact handle?",
                n_rows,
            )
        if x.shape[0] != n_rows:
            _fail(op, "x.shape[0]", f"the {n_rows} rows dispatch returned", x.shape[0])
    if out is not None:
        _check_tensor(op, "out", out, 2, (torch.bfloat16,), device)
        if tuple(out.shape) != (T, H):
            _fail(op, "out.shape", f"{(T, H)} (tokens, hidden)", tuple(out.shape))
