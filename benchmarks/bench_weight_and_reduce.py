"""The compiled decode weight-and-reduce on its own, against its memory floor (one GPU).

``bench_deepep.py``'s glue column is the compiled step minus the bare ops with
identity experts: each received row broadcast over its K lanes (stride 0), so
the floor counts one [rows, H] read. This takes the kernel apart, each variant
compiled with ``fullgraph=True, dynamic=True`` (H marked static, as a model's
weights fix it) and run on the same inputs in one process:

- ``op``: the id globalize of ``prepare``, then ``deepep_ops::weight_and_reduce``
  (what finalize calls on CUDA without gradients: one Triton kernel that reads
  only the routed lanes);
- ``fused``: the same with :func:`deepep_ops.reduce.reduce_lanes_fused`, the
  plain-torch form Inductor fuses into one pointwise kernel (K lanes per
  element, the row's K ids and weights loaded again for each element);
- ``reduction form``: ``where(ids >= 0, y·w, 0).sum(dim=1)`` over [rows, K, H],
  the form ``fused`` replaced;
- ``copy``: read one lane, write [rows, H]: a pointwise kernel that moves the
  fewest bytes of the broadcast case.

for three expert outputs: ``broadcast`` ([rows, H] expanded over K, all lanes
routed: bench_deepep's identity experts at R = 1), ``per lane`` ([rows, K, H],
all lanes routed: real experts on one rank) and ``per lane, 1/4 routed`` (the
other lanes −1 and NaN: a rank that owns a quarter of the experts). Times:
device µs per call from the profiler (kernels only, no launch overhead),
median of ``--repeats`` profiles; floor: the bytes of the routed lanes, ids,
weights and output over the copy bandwidth measured in the same run.

    python benchmarks/bench_weight_and_reduce.py --rows 512 --hidden 7168 --topk 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_deepep import copy_bandwidth  # noqa: E402


def _globalize(local_ids, offset):
    return torch.where(local_ids >= 0, local_ids + offset, -1)  # as DeepEPPrepareFinalize.prepare


def _op(y, w, local_ids, offset):
    return torch.ops.deepep_ops.weight_and_reduce(y, w, _globalize(local_ids, offset), True)


def _fused(y, w, local_ids, offset):
    from deepep_ops.reduce import reduce_lanes_fused

    return reduce_lanes_fused(y, w, _globalize(local_ids, offset), True)


def _reduction_form(y, w, local_ids, offset):
    routed = (_globalize(local_ids, offset) >= 0).unsqueeze(-1)
    return torch.where(routed, y.float() * w.unsqueeze(-1), 0.0).sum(1).to(y.dtype)


def _copy(y, w, local_ids, offset):
    return y.select(1, 0) * 2


VARIANTS = {"op": _op, "fused": _fused, "reduction form": _reduction_form, "copy": _copy}


def kernel_us(fn, args: tuple, calls: int = 20, repeats: int = 5) -> float:
    """Median over ``repeats`` profiles of the CUDA kernels' device µs per call of ``fn(*args)``."""
    from torch.profiler import ProfilerActivity, profile

    fn(*args)
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn(*args)
            torch.cuda.synchronize()
        per_call.append(sum(e.device_time_total for e in prof.key_averages()
                            if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA) / calls)
    return statistics.median(per_call)


def floor_bytes(routed_lanes: int, rows: int, K: int, H: int, broadcast: bool) -> int:
    """The fewest bytes: the routed lanes (bf16; one row for a broadcast output), ids and weights, the output."""
    lanes = rows * H * 2 if broadcast else routed_lanes * H * 2
    return lanes + rows * K * (8 + 4) + rows * H * 2


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="received rows R·M")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    import deepep_ops  # noqa: F401  (defines the ops)

    rows, H, K, E = args.rows, args.hidden, args.topk, args.experts
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, 1, H, generator=g).to("cuda", torch.bfloat16)
    per_lane = torch.randn(rows, K, H, generator=g).to("cuda", torch.bfloat16)
    w = torch.rand(rows, K, generator=g).cuda()
    all_routed = torch.randint(0, E, (rows, K), generator=g).cuda()
    quarter = torch.where(torch.rand(rows, K, generator=g).cuda() < 0.25, all_routed, -1)
    quarter[:, 0] = all_routed[:, 0]  # every received row has a lane here
    offset = torch.tensor(0, device="cuda")
    bandwidth = copy_bandwidth()
    cases = {
        "broadcast": (lambda: base.expand(rows, K, H), all_routed),
        "per lane": (lambda: per_lane.clone(), all_routed),
        "per lane, 1/4 routed": (lambda: torch.where((quarter >= 0).unsqueeze(-1), per_lane, float("nan")), quarter),
    }

    table = []
    for case, (make_y, ids) in cases.items():
        routed = int((ids >= 0).sum())
        floor = floor_bytes(routed, rows, K, H, case == "broadcast") / bandwidth * 1e6
        for variant, fn in VARIANTS.items():
            if variant == "copy" and case != "broadcast":
                continue
            y = make_y()  # a fresh tensor: mark_static sticks to the object
            torch._dynamo.mark_static(y, 2)
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=True, dynamic=True)
            if variant != "copy":
                want = _reduction_form(y, w, ids, offset).float()  # eager
                err = (compiled(y, w, ids, offset).float() - want).abs().max().item()
                assert err < 0.1, f"{variant}/{case}: off eager by {err}"
            us = kernel_us(compiled, (y, w, ids, offset), repeats=args.repeats)
            table.append((case, variant, us, floor))

    print(f"\ncompiled decode weight-and-reduce, rows={rows} H={H} K={K}, {torch.cuda.get_device_name(0)}, "
          f"torch {torch.__version__}; device µs per call (kernels, the id globalize included), median of "
          f"{args.repeats} profiles of 20 calls; copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    print("| expert output | variant | kernel µs | floor µs | kernel / floor |")
    print("|---|---|---|---|---|")
    for case, variant, us, floor in table:
        print(f"| {case} | {variant} | {us:.1f} | {floor:.1f} | {us / floor:.2f}× |")


if __name__ == "__main__":
    main()
