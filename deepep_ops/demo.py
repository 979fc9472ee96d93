"""``python -m deepep_ops demo``: a compiled expert-parallel MoE layer over DeepEP ops.

Spawns ``--world-size`` ranks (gloo on CPU with the reference buffer by
default; NCCL + ``deep_ep.ElasticBuffer`` with ``--backend deepep``), builds a
small MoE layer, compiles it with ``fullgraph=True, dynamic=True``, runs decode
steps at several batch sizes (a different T on every rank, one shared bucket)
and a prefill step, and prints what the compiler did and how the results compare
with a dense single-process MoE.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DECODE_BATCHES = (1, 2, 3, 8, 13, 32, 57, 64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tokens_on(rank: int, batch: int) -> int:
    """Ranks hold different token counts (as DP ranks do); rank 0 the most, and
    the group maximum is ``batch``."""
    return max(batch - rank, 1)


def _make_backend(args, group, device):
    if args.backend == "reference":
        from deepep_ops import ReferenceElasticBuffer

        return ReferenceElasticBuffer(group, num_max_tokens_per_rank=args.capacity, hidden=args.hidden, num_topk=args.topk)
    import deep_ep  # lazy: only where users built DeepEP v2

    return deep_ep.ElasticBuffer(group, num_max_tokens_per_rank=args.capacity, hidden=args.hidden, num_topk=args.topk)


def _timed(fn, sync, reps: int) -> tuple[object, float]:
    """(last result, median seconds per call)."""
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _worker(rank: int, args, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    on_gpu = args.backend == "deepep" or args.device == "cuda"
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if on_gpu else "gloo",
        rank=rank,
        world_size=args.world_size,
        timeout=timedelta(seconds=300),
        **({"device_id": device} if on_gpu else {}),
    )
    try:
        _run(rank, args, device, results)
    finally:
        dist.destroy_process_group()


def _run(rank: int, args, device: torch.device, results) -> None:
    import deepep_ops
    from deepep_ops.moe import MoELayer, dense_moe, make_moe_weights
    from deepep_ops.prepare_finalize import DeepEPPrepareFinalize
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    say = (lambda msg: print(f"[demo] {msg}", flush=True)) if rank == 0 else (lambda msg: None)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    group = dist.group.WORLD
    buffer = deepep_ops.EPBuffer(_make_backend(args, group, device))
    weights = make_moe_weights(args.experts, args.hidden, args.intermediate, seed=0)
    weights = type(weights)(*(w.to(device) for w in weights))
    seen_buckets: set[int] = set()
    rows = []

    def layer_for(decode: bool):
        pf = DeepEPPrepareFinalize(buffer, args.experts, args.topk, decode=decode, device=device)
        return MoELayer(weights, pf).to(device)

    def inputs(step: int, tokens: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * step + rank)
        return torch.randn(tokens, args.hidden, generator=g).to(device, torch.bfloat16)

    for mode in ("decode", "prefill"):
        torch._dynamo.reset()
        counters.clear()
        layer = layer_for(mode == "decode")
        counter = CompileCounterWithBackend(args.compile_backend)
        compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
        batches = DECODE_BATCHES if mode == "decode" else (args.prefill_tokens,)
        for step, batch in enumerate(batches):
            tokens = _tokens_on(rank, batch)
            # The bucket must be the same on every rank: bucket the maximum over
            # the group, which every rank knows here (vLLM: num_tokens_across_dp_cpu).
            bucket = deepep_ops.pow2_bucket(batch, args.capacity) if mode == "decode" else None
            if bucket is not None:
                seen_buckets.add(bucket)
            x = inputs(step, tokens)
            t0 = time.perf_counter()
            compiled(x, bucket)  # first call at this size: compile (if any) + run
            first_call = time.perf_counter() - t0
            eager_out, eager_s = _timed(lambda: layer(x, bucket), sync, args.reps)
            comp_out, comp_s = _timed(lambda: compiled(x, bucket), sync, args.reps)
            dense = dense_moe(x, weights, args.topk)
            err = (comp_out.float() - dense.float()).abs().max().item() if tokens else 0.0
            err_eager = (comp_out.float() - eager_out.float()).abs().max().item() if tokens else 0.0
            rows.append((mode, batch, tokens, bucket, err, err_eager, eager_s, comp_s))
            say(
                f"{mode:7s} T={batch:4d} (rank0) M={bucket if bucket else args.capacity:4d} "
                f"first call {first_call:6.2f}s  frames compiled so far: {counter.frame_count}"
            )
        graph_breaks = sum(counters["graph_break"].values())
        # Expected: one dynamic graph, plus one specialised to T=1 if T=1 occurred.
        expected = 1 + any(_tokens_on(rank, b) == 1 for b in batches)
        recompiles = counter.frame_count - expected
        rows.append((mode, "summary", counter.frame_count, graph_breaks, recompiles))

    results.put((rank, rows, sorted(seen_buckets)))


def _print_table(per_rank: dict, args) -> None:
    rows0, buckets = per_rank[0]
    worst_summary = {}
    for rank, (rows, _) in per_rank.items():
        for r in rows:
            if r[1] == "summary":
                prev = worst_summary.get(r[0], (0, 0, 0))
                worst_summary[r[0]] = tuple(max(a, b) for a, b in zip(prev, r[2:]))
    worst_err = {}
    for rank, (rows, _) in per_rank.items():
        for r in rows:
            if r[1] != "summary":
                key = (r[0], r[1])
                worst_err[key] = max(worst_err.get(key, 0.0), r[4])
    print()
    print(f"deepep-ops demo: {args.world_size} ranks, backend={args.backend}, compile backend={args.compile_backend}, "
          f"H={args.hidden}, E={args.experts}, K={args.topk}, capacity={args.capacity}")
    header = f"{'mode':8s} {'T':>5s} {'M':>5s} {'max |err| vs dense':>19s} {'vs eager':>9s} {'eager ms':>9s} {'compiled ms':>12s} {'speedup':>8s}"
    print(header)
    print("-" * len(header))
    for r in rows0:
        if r[1] == "summary":
            continue
        mode, batch, _tokens, bucket, _err, err_eager, eager_s, comp_s = r
        print(f"{mode:8s} {batch:5d} {bucket if bucket else args.capacity:5d} {worst_err[(mode, batch)]:19.4f} "
              f"{err_eager:9.4f} {eager_s * 1e3:9.2f} {comp_s * 1e3:12.2f} {eager_s / comp_s:7.2f}x")
    print()
    for mode, (frames, breaks, recompiles) in worst_summary.items():
        print(f"{mode:8s} graph breaks: {breaks}   frames compiled: {frames}   "
              f"recompiles after the first dynamic graph: {recompiles}   (worst rank)")
    print(f"distinct bucket sizes (num_max_tokens_per_rank): {len(buckets)} {buckets}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="deepep-ops demo", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("reference", "deepep"), default="reference",
                        help="reference: ReferenceElasticBuffer (CPU/gloo by default); deepep: deep_ep.ElasticBuffer on GPUs")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="reference backend: where to run")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--capacity", type=int, default=256, help="buffer num_max_tokens_per_rank")
    parser.add_argument("--prefill-tokens", type=int, default=200)
    parser.add_argument("--compile-backend", default="inductor", help="inductor or aot_eager")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per step")
    args = parser.parse_args(argv)
    if args.prefill_tokens > args.capacity or max(DECODE_BATCHES) > args.capacity:
        parser.error(f"--capacity {args.capacity} must be >= --prefill-tokens and >= {max(DECODE_BATCHES)}")

    print(f"[demo] spawning {args.world_size} ranks ({args.backend} buffer); "
          f"compiling with {args.compile_backend} (the first calls take a while on CPU)...", flush=True)
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(args, _free_port(), results), nprocs=args.world_size, start_method="spawn")
    per_rank = {}
    while not results.empty():
        rank, rows, buckets = results.get()
        per_rank[rank] = (rows, buckets)
    _print_table(per_rank, args)
