"""The kernels of ``deepep_ops::weight_and_reduce`` (schema: :data:`deepep_ops.schemas.WEIGHT_AND_REDUCE`).

Finalize's weight-and-reduce as one op, so that on CUDA it is one Triton kernel
(:mod:`deepep_ops.triton_reduce`) that reads only the routed lanes. Inductor's
fused form of the same sum (:func:`reduce_lanes_fused`) reads every lane and
loads the row's K ids and K weights again for each element, so the op wins
where lanes are skipped (a rank that owns a fraction of the experts) and at
large batches; at small ones the two are even (figures:
``benchmarks/bench_weight_and_reduce.py``, benchmarks/README.md).
"""

from __future__ import annotations

import torch

from deepep_ops.validation import check_weight_and_reduce


def reduce_lanes(
    expert_output: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, apply_weights: bool
) -> torch.Tensor:
    """Whole-tensor form, any device: [rows, k, H], [rows, k] float32, [rows, k] -> [rows, H].

    Four kernels eagerly; what an eager CPU step runs.
    """
    routed = (topk_ids >= 0).unsqueeze(-1)
    terms = expert_output.float() * topk_weights.unsqueeze(-1) if apply_weights else expert_output.float()
    return torch.where(routed, terms, 0.0).sum(dim=1).to(expert_output.dtype)


def reduce_lanes_fused(
    expert_output: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, apply_weights: bool
) -> torch.Tensor:
    """Lane-by-lane form for Inductor: the same sum, one term per lane in lane order.

    A loop over the (static) k, so Inductor emits one pointwise kernel over
    [rows, H] with k loads per element. The reduction form (``where(...).sum(dim=1)``
    over [rows, k, H]) became a looped reduction over a symbolic k whose launch
    config was tuned on the first (smallest) batch: 25x its memory floor at
    T = 512 on an H200 (benchmarks/bench_deepep.py). ``range(k)`` specializes k
    (a guard, no recompile: k is fixed per model).
    """
    rows, k = topk_ids.shape
    acc = None
    for j in range(k):
        lane = expert_output.select(1, j).float()
        if apply_weights:
            lane = lane * topk_weights.select(1, j).unsqueeze(1)
        term = torch.where(topk_ids.select(1, j).unsqueeze(1) >= 0, lane, 0.0)
        acc = term if acc is None else acc + term
    if acc is None:  # k == 0: no lanes
        return expert_output.new_zeros((rows, expert_output.shape[-1]))
    return acc.to(expert_output.dtype)


def weight_and_reduce_any(expert_output, topk_weights, topk_ids, apply_weights):
    """The op's kernel on every device but CUDA."""
    check_weight_and_reduce(expert_output, topk_weights, topk_ids)
    return reduce_lanes(expert_output, topk_weights, topk_ids, apply_weights)


def weight_and_reduce_cuda(expert_output, topk_weights, topk_ids, apply_weights):
    """The op's CUDA kernel: the Triton kernel (imported on first use: CPU installs have no Triton)."""
    check_weight_and_reduce(expert_output, topk_weights, topk_ids)
    from deepep_ops.triton_reduce import weight_and_reduce_triton

    return weight_and_reduce_triton(expert_output, topk_weights, topk_ids, apply_weights)


def weight_and_reduce_traced(
    expert_output: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, apply_weights: bool
) -> torch.Tensor:
    """The op's CUDA kernel as code for ``torch.compile`` to trace: [rows, k, H] (k >= 1),
    [rows, k] float32, [rows, k] -> [rows, H].

    The same checks and the same Triton kernel, but the graph holds the kernel
    itself, not the opaque op: Inductor launches it with its own launcher, which
    costs a fraction of the op's host time (a dispatcher round trip plus
    Triton's per-call argument specialization), the difference that matters
    where a compiled step runs without CUDA graphs (docs/performance.md).
    """
    check_weight_and_reduce(expert_output, topk_weights, topk_ids, traced=True)
    from deepep_ops.triton_reduce import launch

    out = expert_output.new_empty((expert_output.shape[0], expert_output.shape[2]))
    launch(out, expert_output, topk_weights, topk_ids, apply_weights)
    return out
