"""The compiled decode weight-and-reduce on its own, against its memory floor (one GPU).

``bench_deepep.py``'s glue column is the compiled step minus the bare ops with
identity experts: each received row broadcast over its K lanes (stride 0), so
the floor counts one [rows, H] read. This takes the kernel apart, each variant
compiled with ``fullgraph=True, dynamic=True`` and run on the same inputs in
one process:

- ``weight_and_reduce``: the id globalize of ``prepare`` then
  :func:`deepep_ops.prepare_finalize.weight_and_reduce` (the compiled form:
  one pointwise kernel, K lanes per element);
- ``reduction form``: ``where(ids >= 0, y·w, 0).sum(dim=1)`` over [rows, K, H],
  the form ``weight_and_reduce`` replaced;
- ``copy``: read one lane, write [rows, H]: a pointwise kernel that moves the
  fewest bytes.

for two expert-output layouts: ``broadcast`` ([rows, H] expanded over K, as
bench_deepep's identity experts) and ``per lane`` ([rows, K, H] contiguous, as
real experts write it), and with the hidden size static (marked with
``torch._dynamo.mark_static``, as a model's weights fix it) or symbolic
(``dynamic=True`` on a function of activations only). Times: device µs per
call from the profiler (kernels only, no launch overhead), median of
``--repeats`` profiles; floor: the bytes the variant must move over the copy
bandwidth measured in the same run.

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


def _globalized_weight_and_reduce(y, w, local_ids, offset):
    from deepep_ops.prepare_finalize import weight_and_reduce

    global_ids = torch.where(local_ids >= 0, local_ids + offset, -1)  # as DeepEPPrepareFinalize.prepare
    return weight_and_reduce(y, w, global_ids, False)


def _reduction_form(y, w, local_ids, offset):
    global_ids = torch.where(local_ids >= 0, local_ids + offset, -1)
    return torch.where((global_ids >= 0).unsqueeze(-1), y.float() * w.unsqueeze(-1), 0.0).sum(1).to(y.dtype)


def _copy(y, w, local_ids, offset):
    return y.select(1, 0) * 2


VARIANTS = {"weight_and_reduce": _globalized_weight_and_reduce, "reduction form": _reduction_form, "copy": _copy}


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


def floor_bytes(variant: str, layout: str, rows: int, K: int, H: int) -> int:
    """The fewest bytes ``variant`` moves: the lanes it reads (bf16), ids and weights, the [rows, H] bf16 it writes."""
    if variant == "copy":
        return 2 * rows * H * 2
    lanes = rows * H * 2 if layout == "broadcast" else rows * K * H * 2
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
    rows, H, K, E = args.rows, args.hidden, args.topk, args.experts
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, H, generator=g).to("cuda", torch.bfloat16)
    per_lane = torch.randn(rows, K, H, generator=g).to("cuda", torch.bfloat16)
    w = torch.rand(rows, K, generator=g).cuda()
    local_ids = torch.randint(-1, E, (rows, K), generator=g).cuda()
    offset = torch.tensor(0, device="cuda")
    bandwidth = copy_bandwidth()

    table = []
    for layout, y in (("broadcast", base.unsqueeze(1).expand(rows, K, H)), ("per lane", per_lane)):
        want = _reduction_form(y, w, local_ids, offset).float()  # eager
        for variant, fn in VARIANTS.items():
            floor = floor_bytes(variant, layout, rows, K, H) / bandwidth * 1e6
            for hidden_dim in ("static", "symbolic"):
                torch._dynamo.reset()
                if hidden_dim == "static":
                    torch._dynamo.mark_static(y, 2)
                else:
                    torch._dynamo.maybe_mark_dynamic(y, 2)
                compiled = torch.compile(fn, fullgraph=True, dynamic=True)
                if variant != "copy":
                    err = (compiled(y, w, local_ids, offset).float() - want).abs().max().item()
                    assert err < 0.1, f"{variant}/{layout}/{hidden_dim}: off eager by {err}"
                us = kernel_us(compiled, (y, w, local_ids, offset), repeats=args.repeats)
                table.append((variant, layout, hidden_dim, us, floor))
                # a fresh tensor for the next marking (mark_static/maybe_mark_dynamic stick to the object)
                y = y.clone() if layout == "per lane" else base.clone().unsqueeze(1).expand(rows, K, H)

    print(f"\ncompiled decode weight-and-reduce, rows={rows} H={H} K={K}, {torch.cuda.get_device_name(0)}, "
          f"torch {torch.__version__}; device µs per call (kernels), median of {args.repeats} profiles of 20 "
          f"calls; copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    print("| variant | expert output | H | kernel µs | floor µs | kernel / floor |")
    print("|---|---|---|---|---|---|")
    for variant, layout, hidden_dim, us, floor in table:
        print(f"| {variant} | {layout} | {hidden_dim} | {us:.1f} | {floor:.1f} | {us / floor:.2f}× |")


if __name__ == "__main__":
    main()
