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
import shutil
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepep_ops import _cli

DECODE_BATCHES = _cli.DEMO_DECODE_BATCHES


def _tokens_on(rank: int, batch: int) -> int:
    """Ranks hold different token counts (as DP ranks do); rank 0 the most, and
    the group maximum is ``batch``."""
    return max(batch - rank, 1)


def _make_backend(args, group, device):
    if args.backend == "reference":
        from deepep_ops import ReferenceElasticBuffer

        return ReferenceElasticBuffer(group, num_max_tokens_per_rank=args.capacity, hidden=args.hidden, num_topk=args.topk)
    from deepep_ops.backends.deep_ep import new_buffer  # imports deep_ep: only where users built DeepEP v2

    # v2.1's ElasticBuffer or v2.5's EPBuffer, whichever is installed.
    return new_buffer(group, num_max_tokens_per_rank=args.capacity, hidden=args.hidden, num_topk=args.topk)


WARMUP = 3


def _interleaved_medians(fns: dict, sync, reps: int) -> dict:
    """{name: median seconds per call} over ``reps`` rounds after ``WARMUP`` rounds.

    The callables run alternately (one call of each per round), so drift on a
    shared machine hits them alike. Every rank runs the same sequence: the
    collectives inside keep the ranks in step.
    """
    times = {name: [] for name in fns}
    for i in range(WARMUP + reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= WARMUP:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _threads_per_rank(args) -> int:
    return args.threads or max(1, (os.cpu_count() or 1) // args.world_size)


def _worker(rank: int, args, init_method: str, results) -> None:
    # Ranks share the machine's cores: more intra-op threads than cores per rank
    # makes the OpenMP loops of Inductor's C++ kernels spin against each other.
    torch.set_num_threads(_threads_per_rank(args))
    on_gpu = args.backend == "deepep" or args.device == "cuda"
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if on_gpu else "gloo",
        init_method=init_method,  # a FileStore: no port to pick (and race for)
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
    from deepep_ops.moe import MoELayer, dense_moe, make_moe_weights, make_shared_weights, route
    from deepep_ops.prepare_finalize import DeepEPPrepareFinalize
    from deepep_ops._torch_compat import frame_counting_backend, graph_breaks, reset_compiler

    say = (lambda msg: print(f"[demo] {msg}", flush=True)) if rank == 0 else (lambda msg: None)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    group = dist.group.WORLD
    buffer = deepep_ops.EPOpsBuffer(_make_backend(args, group, device))
    weights = make_moe_weights(args.experts, args.hidden, args.intermediate, seed=0)
    weights = type(weights)(*(w.to(device) for w in weights))
    shared = None
    if args.shared_intermediate:
        shared = make_shared_weights(args.hidden, args.shared_intermediate)
        shared = type(shared)(*(w.to(device) for w in shared))
    seen_buckets: set[int] = set()
    rows = []

    def layers_for(decode: bool):
        """The sequential layer, and the overlapped one (None without a shared expert)."""
        pf = DeepEPPrepareFinalize(buffer, args.experts, args.topk, decode=decode, device=device)
        overlapped = None if shared is None else MoELayer(weights, pf, shared, overlap=True).to(device)
        return MoELayer(weights, pf, shared).to(device), overlapped

    def inputs(step: int, tokens: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * step + rank)
        return torch.randn(tokens, args.hidden, generator=g).to(device, torch.bfloat16)

    for mode in ("decode", "prefill"):
        reset_compiler()
        layer, overlapped_layer = layers_for(mode == "decode")
        pf = layer.pf
        counter = frame_counting_backend(args.compile_backend)
        compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
        overlapped = None
        if overlapped_layer is not None:
            overlapped = torch.compile(overlapped_layer, backend=counter, fullgraph=True, dynamic=True)
        batches = DECODE_BATCHES if mode == "decode" else (args.prefill_tokens,)
        for step, batch in enumerate(batches):
            tokens = _tokens_on(rank, batch)
            # The bucket must be the same on every rank: bucket the maximum over
            # the group, which every rank knows here (vLLM: num_tokens_across_dp_cpu).
            bucket = deepep_ops.pow2_bucket(batch, args.capacity) if mode == "decode" else None
            if bucket is not None:
                seen_buckets.add(bucket)
            x = inputs(step, tokens)
            routing = route(x, weights.router, args.topk)

            def communication(x=x, routing=routing, bucket=bucket):
                # Eager dispatch + combine with the step's routing, experts = identity:
                # what neither compiling nor Inductor can make faster (opaque ops).
                p = pf.prepare(x, routing[0], routing[1], num_max_tokens_per_rank=bucket)
                y = p.expert_x.unsqueeze(1).expand(-1, p.topk_ids.shape[1], -1)
                out = torch.empty_like(x)
                pf.finalize(out, y, p.topk_weights, p.topk_ids, p.handle)

            t0 = time.perf_counter()
            if step == 0:
                what = f"the {mode} layer" + (" and its overlapped twin" if overlapped else "")
                with _cli.Progress(say if rank == 0 else None,
                                   f"compiling {what} with {args.compile_backend} "
                                   "(first step; may take a minute or more on a CPU)"):
                    compiled(x, bucket)
                    if overlapped:
                        overlapped(x, bucket)
            else:
                compiled(x, bucket)  # first call at this size: a recompile (if any) + run
                if overlapped:
                    overlapped(x, bucket)
            first_call = time.perf_counter() - t0
            fns = {"eager": lambda: layer(x, bucket), "compiled": lambda: compiled(x, bucket), "comm": communication}
            if overlapped:
                fns["overlapped"] = lambda: overlapped(x, bucket)
            with torch.no_grad():  # inference: the overlapped layer's async ops have no gradient
                med = _interleaved_medians(fns, sync, args.reps)
                eager_out, outs = layer(x, bucket), [compiled(x, bucket)]
                if overlapped:
                    outs.append(overlapped(x, bucket))
            dense = dense_moe(x, weights, args.topk, shared)
            err = max((o.float() - dense.float()).abs().max().item() for o in outs) if tokens else 0.0
            err_eager = max((o.float() - eager_out.float()).abs().max().item() for o in outs) if tokens else 0.0
            rows.append((mode, batch, tokens, bucket, err, err_eager, med["eager"], med["compiled"], med["comm"],
                         med.get("overlapped", float("nan"))))
            say(
                f"{mode:7s} T={batch:4d} (rank0) M={bucket if bucket else args.capacity:4d} "
                f"first call {first_call:6.2f}s  frames compiled so far: {counter.frame_count}"
            )
        breaks = graph_breaks()
        # Expected per compiled layer: one dynamic graph, plus one specialised to T=1 if T=1 occurred.
        expected = (1 + any(_tokens_on(rank, b) == 1 for b in batches)) * (2 if overlapped else 1)
        recompiles = counter.frame_count - expected
        rows.append((mode, "summary", counter.frame_count, breaks, recompiles))

    results.put((rank, rows, sorted(seen_buckets)))


def _print_table(per_rank: dict, args) -> None:
    rows0, buckets = per_rank[0]
    worst_summary = {}
    for rank, (rows, _) in per_rank.items():
        for r in rows:
            if r[1] == "summary":
                prev = worst_summary.get(r[0], (0, 0, 0))
                worst_summary[r[0]] = tuple(max(a, b) for a, b in zip(prev, r[2:]))
    worst = {}  # (mode, T) -> max over ranks of (err, err vs eager, eager s, compiled s, comm s, overlapped s)
    for rank, (rows, _) in per_rank.items():
        for r in rows:
            if r[1] != "summary":
                key = (r[0], r[1])
                worst[key] = tuple(max(a, b) for a, b in zip(worst.get(key, (0.0,) * 6), r[4:]))
    overlap = bool(args.shared_intermediate)
    print()
    print(f"deepep-ops demo: {args.world_size} ranks, backend={args.backend}, compile backend={args.compile_backend}, "
          f"H={args.hidden}, E={args.experts}, K={args.topk}, capacity={args.capacity}, "
          f"{_threads_per_rank(args)} torch thread(s) per rank")
    print(f"times: median of {args.reps} interleaved calls after {WARMUP} warm-up calls, the slower rank's; "
          "d+c = eager dispatch + combine alone (identity experts); rest = step - d+c"
          + ("; overlapped = compiled, the shared expert (I=" + str(args.shared_intermediate) + ") run while "
             "the tokens are in flight" if overlap else ""))
    header = (f"{'mode':8s} {'T':>5s} {'M':>5s} {'max |err| vs dense':>19s} {'vs eager':>9s} {'eager ms':>9s} "
              f"{'compiled ms':>12s} {'speedup':>8s} {'d+c ms':>7s} {'eager rest':>11s} {'compiled rest':>14s}"
              + (f" {'overlapped ms':>14s} {'vs compiled':>12s}" if overlap else ""))
    print(header)
    print("-" * len(header))
    for r in rows0:
        if r[1] == "summary":
            continue
        mode, batch, _tokens, bucket = r[:4]
        err, err_eager, eager_s, comp_s, comm_s, over_s = worst[(mode, batch)]
        print(f"{mode:8s} {batch:5d} {bucket if bucket else args.capacity:5d} {err:19.4f} "
              f"{err_eager:9.4f} {eager_s * 1e3:9.2f} {comp_s * 1e3:12.2f} {eager_s / comp_s:7.2f}x "
              f"{comm_s * 1e3:7.2f} {(eager_s - comm_s) * 1e3:11.2f} {(comp_s - comm_s) * 1e3:14.2f}"
              + (f" {over_s * 1e3:14.2f} {over_s / comp_s:11.2f}x" if overlap else ""))
    print()
    for mode, (frames, breaks, recompiles) in worst_summary.items():
        print(f"{mode:8s} graph breaks: {breaks}   frames compiled: {frames}{' (2 layers)' if overlap else ''}   "
              f"recompiles after the first dynamic graph: {recompiles}   (worst rank)")
    print(f"distinct bucket sizes (num_max_tokens_per_rank): {len(buckets)} {buckets}")


def build_parser() -> argparse.ArgumentParser:
    """The demo's options (defined in :mod:`deepep_ops._cli`, which imports nothing heavy)."""
    return _cli.demo_parser()


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every bad value is a usage error naming the option and what it allows (before any rank starts)."""
    _cli.check_demo(parser, args)


def main(argv=None) -> int:
    """``python -m deepep_ops demo [options]``: parse and check the options, then :func:`run`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Spawn the ranks, run the demo and print its table (options already checked)."""
    print(f"[demo] spawning {args.world_size} ranks ({args.backend} buffer, {args.compile_backend}); "
          "each step's first call compiles, the first one for up to a minute or more on a CPU", flush=True)
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    store_dir = tempfile.mkdtemp(prefix="deepep_ops_demo_")
    try:
        mp.start_processes(_worker, args=(args, "file://" + os.path.join(store_dir, "store"), results),
                           nprocs=args.world_size, start_method="spawn")
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    per_rank = {}
    while not results.empty():
        rank, rows, buckets = results.get()
        per_rank[rank] = (rows, buckets)
    _print_table(per_rank, args)
    return 0
