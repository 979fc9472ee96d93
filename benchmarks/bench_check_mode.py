"""Cost of the cross-rank check (deepep_ops.agreement) per op call, CPU, gloo.

Runs decode dispatch + combine on 2 gloo ranks (reference buffer) with check
mode on (every call exchanges its signature and verdict) and off (agree once:
a tuple build and a set lookup), and the bare exchange. Prints a table.

    PYTHONPATH=.:tests python benchmarks/bench_check_mode.py [--iters 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from _dist import run_distributed  # noqa: E402


def _bench(rank, world, iters, T, H, K, E):
    import torch
    import torch.distributed as dist

    import deepep_ops as D

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(T, H, generator=g).bfloat16()
    idx = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K].contiguous()
    w = torch.rand(T, K, generator=g)
    rows = {}
    for check in (False, True):
        buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=T), check=check)
        for i in range(iters + 10):
            if i == 10:
                dist.barrier()
                t0 = time.perf_counter()
            r = D.dispatch(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=T)
            D.combine(r.recv_x, r.handle, buf)
        rows[f"dispatch+combine, check={check}"] = (time.perf_counter() - t0) / iters * 1e6
    agreement = buf.agreement
    sig = ("decode", T, E, H, K, "torch.bfloat16", None, None, 1)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        agreement.agree("bench", "dispatch", ["f"] * len(sig), sig, None, torch.device("cpu"))
    rows["one exchange (check mode, per op call)"] = (time.perf_counter() - t0) / iters * 1e6
    agreement._check = False
    t0 = time.perf_counter()
    for _ in range(iters * 100):
        agreement.agree("bench", "dispatch", ["f"] * len(sig), sig, None, torch.device("cpu"))
    rows["seen combination (agree-once mode)"] = (time.perf_counter() - t0) / (iters * 100) * 1e6
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        agreement.max_over_ranks(T)
    rows["default bucket: max T over the group"] = (time.perf_counter() - t0) / iters * 1e6
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=1024)
    a = p.parse_args()
    res = run_distributed(_bench, 2, a.iters, a.tokens, a.hidden, 4, 8, timeout=600)
    print(f"2 gloo ranks, T={a.tokens}, H={a.hidden}, K=4, E=8, {a.iters} iters; microseconds per call (rank 0 | rank 1)")
    print(f"{'what':45s} {'rank 0':>10s} {'rank 1':>10s}")
    for k in res[0]:
        print(f"{k:45s} {res[0][k]:10.1f} {res[1][k]:10.1f}")


if __name__ == "__main__":
    main()
