"""Eager vs compiled (vs compiled + CUDA graphs) prepare + finalize on the reference buffer.

One step = route-free prepare (dispatch) → a free expert stand-in (the received
rows broadcast over the top-k lanes) → finalize (weight-and-reduce + combine),
so the table measures the communication layer and the glue the compiler fuses
around it, not expert GEMMs. All variants run side by side in one process per
rank, on the same inputs, and the table gives medians and ratios.

CPU (default: 2 gloo ranks):
    python benchmarks/bench_prepare_finalize.py
One GPU (world size 1, no process group), also timing the compiled step captured
in a CUDA graph and replayed:
    python benchmarks/bench_prepare_finalize.py --device cuda --world-size 1 --hidden 7168 --topk 8 --experts 64
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DECODE_T = (1, 8, 64, 512)
PREFILL_T = (4096,)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_step(pf, num_topk: int):
    """prepare → expert stand-in → finalize, returning the combined [T, H] bf16."""

    def step(x, topk_weights, topk_ids, m):
        p = pf.prepare(x, topk_weights, topk_ids, num_max_tokens_per_rank=m)
        rows, k = p.topk_ids.shape
        y = p.expert_x if p.expert_x_scale is None else p.expert_x.to(torch.bfloat16)
        y = y.unsqueeze(1).expand(rows, k, y.shape[1])
        out = torch.empty_like(x)
        pf.finalize(out, y, p.topk_weights, p.topk_ids, p.handle)
        return out

    return step


def capture_cuda_graph(fn, args):
    """Capture ``fn(*args)`` in a CUDA graph; returns a callable that replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and warm up outside the capture
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args)

    def replay(*_ignored):
        graph.replay()
        return out

    return replay


def _time(fn, sync, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank: int, args, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    group = None
    if args.world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=args.world_size, timeout=timedelta(seconds=600))
        group = dist.group.WORLD
    try:
        results.put((rank, _bench(rank, args, device, group)))
    finally:
        if group is not None:
            dist.destroy_process_group()


def _bench(rank: int, args, device, group) -> list:
    import deepep_ops
    from deepep_ops.prepare_finalize import DeepEPPrepareFinalize

    capacity = max(PREFILL_T + DECODE_T)
    buffer = deepep_ops.EPOpsBuffer(deepep_ops.ReferenceElasticBuffer(
        group, num_max_tokens_per_rank=capacity, hidden=args.hidden, num_topk=args.topk))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    variants = ["eager", "compiled"] + (["compiled+cudagraph"] if device.type == "cuda" else [])
    rows = []
    for decode, sizes in ((True, DECODE_T), (False, PREFILL_T)):
        pf = DeepEPPrepareFinalize(buffer, args.experts, args.topk, decode=decode,
                                   use_fp8_dispatch=args.fp8, device=device)
        step = make_step(pf, args.topk)
        fns = {"eager": step}
        torch._dynamo.reset()
        fns["compiled"] = torch.compile(step, fullgraph=True, dynamic=True)
        for T in sizes:
            g = torch.Generator().manual_seed(T * 31 + rank)
            x = torch.randn(T, args.hidden, generator=g).to(device, torch.bfloat16)
            ids = torch.stack([torch.randperm(args.experts, generator=g)[: args.topk] for _ in range(T)]).to(device)
            w = torch.rand(T, args.topk, generator=g).to(device)
            m = deepep_ops.pow2_bucket(T, capacity) if decode else None
            times = {}
            ref = step(x, w, ids, m)
            fns.pop("compiled+cudagraph", None)
            if "compiled+cudagraph" in variants and decode:
                # The compiled step captured once per T with torch.cuda.graph, as
                # serving engines do (vLLM's CUDAGraphWrapper); replay on the same inputs.
                fns["compiled+cudagraph"] = capture_cuda_graph(fns["compiled"], (x, w, ids, m))
            for name, fn in fns.items():
                out = fn(x, w, ids, m)  # compile / record outside the timed region
                err = (out.float() - ref.float()).abs().max().item()
                if err > 0.05:
                    raise AssertionError(f"{name} T={T}: result differs from eager by {err}")
                times[name] = _time(lambda: fn(x, w, ids, m), sync, args.warmup, args.reps)
            rows.append(("decode" if decode else "prefill", T, m or capacity, times))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--fp8", action="store_true", help="block-fp8 dispatch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    if args.world_size == 1:
        _worker(0, args, 0, results)
    else:
        mp.start_processes(_worker, args=(args, _free_port(), results), nprocs=args.world_size, start_method="spawn")
    per_rank = {}
    while not results.empty():
        rank, rows = results.get()
        per_rank[rank] = rows
    rows = per_rank[0]
    names = list(rows[0][3])
    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"\nprepare+finalize, reference buffer, {args.world_size} rank(s) on {dev}, torch {torch.__version__}, "
          f"H={args.hidden} K={args.topk} E={args.experts} {'fp8' if args.fp8 else 'bf16'} dispatch; "
          f"median of {args.reps}, rank 0")
    head = "| mode | T | M | " + " | ".join(f"{n} µs" for n in names) + " | " + " | ".join(
        f"eager / {n}" for n in names[1:]) + " |"
    print(head)
    print("|" + "---|" * (3 + len(names) + len(names) - 1))
    for mode, T, m, times in rows:
        us = [times.get(n) for n in names]
        cells = [f"{t * 1e6:.0f}" if t is not None else "–" for t in us]
        ratios = [f"{times['eager'] / times[n]:.2f}×" if n in times else "–" for n in names[1:]]
        print(f"| {mode} | {T} | {m} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
