"""The Triton kernel of ``deepep_ops::weight_and_reduce`` on CUDA (imported on first use).

One program per (row, block of H): it loads the row's k ids and k weights once,
skips every lane whose id is −1 (its expert output is never read, so garbage
there cannot leak), and accumulates the routed lanes in fp32 in lane order.
(Masked loads without the branch, every lane's load in flight at once, were
slower on the H200 with a quarter of the lanes routed: benchmarks/README.md.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Channels per program; 1024 with 4 warps was the fastest of 512/4, 1024/4 and
#: 2048/8 at H = 7168 on the H200 (benchmarks/README.md).
_BLOCK_H = 1024
_NUM_WARPS = 4


@triton.jit
def _weight_and_reduce_kernel(
    out_ptr, y_ptr, w_ptr, ids_ptr, H,
    stride_yr, stride_yk, stride_yh, stride_wr, stride_wk, stride_ir, stride_ik, stride_or,
    K: tl.constexpr, BLOCK_H: tl.constexpr, APPLY_WEIGHTS: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(K):
        expert = tl.load(ids_ptr + r * stride_ir + j * stride_ik)
        if expert >= 0:
            lane = tl.load(y_ptr + r * stride_yr + j * stride_yk + offs * stride_yh, mask=mask, other=0.0)
            lane = lane.to(tl.float32)
            if APPLY_WEIGHTS:
                lane = lane * tl.load(w_ptr + r * stride_wr + j * stride_wk)
            acc += lane
    tl.store(out_ptr + r * stride_or + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def weight_and_reduce_triton(
    expert_output: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, apply_weights: bool
) -> torch.Tensor:
    """[rows, k, H], [rows, k] float32, [rows, k] int -> [rows, H] in expert_output's dtype (CUDA)."""
    if expert_output.device.index != torch.cuda.current_device():
        # Triton launches on the current device, not the tensor's.
        with torch.cuda.device(expert_output.device):
            return weight_and_reduce_triton(expert_output, topk_weights, topk_ids, apply_weights)
    rows, k, H = expert_output.shape
    out = torch.empty((rows, H), dtype=expert_output.dtype, device=expert_output.device)
    if rows == 0 or H == 0:
        return out
    if k == 0:
        return out.zero_()
    launch(out, expert_output, topk_weights, topk_ids, apply_weights)
    return out


def launch(
    out: torch.Tensor, expert_output: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    apply_weights: bool,
) -> None:
    """Write the weighted sum of ``expert_output`` [rows, k, H] into ``out`` [rows, H]
    (k >= 1, on the current device).

    Traceable: under ``torch.compile`` Dynamo records the kernel itself, and
    Inductor launches it from its output code with its own launcher, without
    Triton's per-call argument specialization or a dispatcher round trip.
    """
    _rows, k, H = expert_output.shape
    grid = (expert_output.shape[0], triton.cdiv(H, _BLOCK_H))
    _weight_and_reduce_kernel[grid](
        out, expert_output, topk_weights, topk_ids, H,
        *expert_output.stride(), *topk_weights.stride(), *topk_ids.stride(), out.stride(0),
        K=k, BLOCK_H=_BLOCK_H, APPLY_WEIGHTS=apply_weights, num_warps=_NUM_WARPS,
    )
