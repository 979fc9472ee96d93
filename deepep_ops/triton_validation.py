"""The Triton kernel behind :func:`deepep_ops.validation.check_topk_idx_values` on CUDA
(imported on first use).

The torch form of the value checks (range, then duplicates after a sort) is
about ten kernels and two host syncs, more than DeepEP's own prefill pair at
T = 512 on the H200; this kernel and one host read cost about half of that
(``benchmarks/bench_prefill.py``; figures in benchmarks/README.md). One program checks a block of
rows (every id in [-1, E), no non-negative id twice in a row) and raises a
flag; the host reads it once. When it is raised, the torch form runs to name
the first bad entry.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Rows per program.
_BLOCK_T = 64


@triton.jit
def _bad_topk_idx_kernel(
    flag_ptr, ids_ptr, T, stride_t, stride_k, num_experts,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    base = ids_ptr + rows.to(tl.int64) * stride_t
    ids = tl.load(base[:, None] + cols[None, :] * stride_k, mask=row_ok[:, None] & (cols[None, :] < K), other=-1)
    bad = (ids < -1) | (ids >= num_experts)
    for j in tl.static_range(K):
        id_j = tl.load(base + j * stride_k, mask=row_ok, other=-1)
        # A later lane holding lane j's id (when that id is an expert, not -1).
        bad = bad | ((ids == id_j[:, None]) & (cols[None, :] > j) & (id_j[:, None] >= 0))
    if tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0) > 0:
        tl.store(flag_ptr, 1)


def topk_idx_values_ok(topk_idx: torch.Tensor, num_experts: int) -> bool:
    """Whether every id of the [T, K] integer CUDA tensor ``topk_idx`` is −1 or in
    [0, E) and no row repeats an expert (one kernel, one host sync)."""
    if topk_idx.device.index != torch.cuda.current_device():
        # Triton launches on the current device, not the tensor's.
        with torch.cuda.device(topk_idx.device):
            return topk_idx_values_ok(topk_idx, num_experts)
    T, K = topk_idx.shape
    flag = torch.zeros(1, dtype=torch.int32, device=topk_idx.device)
    _bad_topk_idx_kernel[(triton.cdiv(T, _BLOCK_T),)](
        flag, topk_idx, T, *topk_idx.stride(), num_experts,
        K=K, BLOCK_T=_BLOCK_T, BLOCK_K=triton.next_power_of_2(K),
    )
    return not bool(flag.item())
