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
)
from deepep_ops.handle import HANDLE_TENSOR_SPECS, DispatchHandle, handle_dims

_SCALE_DTYPES = (torch.float32, torch.int32)


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
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return device.type == "cpu" or exact or os.environ.get("DEEPEP_OPS_CHECK_VALUES") == "1"


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

    if value_checks_enabled(device, exact):
        check_topk_idx_values(op, topk_idx, num_experts)


def check_combine(
    op: str,
    x: torch.Tensor,
    handle: DispatchHandle,
    *,
    num_ranks: int,
    out: Optional[torch.Tensor] = None,
) -> None:
    """Combine checks of spec §6 plus the consistency of the handle with its mode."""
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


# --- training (issue 14): the ops the backward passes call ---------------------------------------
def check_cached_dispatch(
    op: str, x: torch.Tensor, x_scales: Optional[torch.Tensor], handle: DispatchHandle, *, num_ranks: int
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
    _check_handle(op, handle, num_ranks, device)
    if x.shape[0] != handle.topk_idx.shape[0]:
        _fail(op, "x.shape[0] (tokens)", f"the handle's {handle.topk_idx.shape[0]} dispatched tokens", x.shape[0])


def check_combine_with_weights(
    op: str, x: torch.Tensor, topk_weights: torch.Tensor, handle: DispatchHandle, *, num_ranks: int
) -> None:
    """:func:`check_combine`, plus ``topk_weights`` float32 [rows, K] (decode) or [X] (prefill)."""
    check_combine(op, x, handle, num_ranks=num_ranks)
    K = handle.topk_idx.shape[1]
    shape = (x.shape[0],) if handle.do_expand else (x.shape[0], K)
    _check_tensor(op, "topk_weights", topk_weights, len(shape), (torch.float32,), x.device)
    if tuple(topk_weights.shape) != shape:
        _fail(op, "topk_weights.shape", f"{shape} (rows of x{'' if handle.do_expand else ', K'})",
              tuple(topk_weights.shape))


def _check_handle(op: str, handle: DispatchHandle, num_ranks: int, device: torch.device) -> None:
    _check_tensor(op, "handle.topk_idx", handle.topk_idx, 2, (torch.int64, torch.int32), device)
    _check_tensor(op, "handle.recv_src_metadata", handle.recv_src_metadata, 2, (torch.int32,), device)
    dims = handle_dims(handle, num_ranks)
    for name, spec in HANDLE_TENSOR_SPECS.items():
        t = getattr(handle, name)
        shape = spec.shape(dims)
        _check_tensor(op, f"handle.{name}", t, len(shape), (torch.int32,), device)
        if tuple(t.shape) != shape:
            _fail(op, f"handle.{name}.shape", str(shape), tuple(t.shape))
    if not handle.do_expand and dims.num_recv_tokens != decode_num_recv_tokens(num_ranks, handle.num_max_tokens_per_rank):
        _fail(op, "handle.recv_src_metadata.shape[0]",
              f"R*M = {num_ranks * handle.num_max_tokens_per_rank} for a decode (do_expand=False) handle",
              dims.num_recv_tokens)
