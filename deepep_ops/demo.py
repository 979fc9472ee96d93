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

from deepep_ops.layout import COMBINE_HIDDEN_ALIGNMENT, MAX_EXPERTS, MAX_LOCAL_EXPERTS, MAX_RANKS, MAX_TOPK

DECODE_BATCHES = (1, 2, 3, 8, 13, 32, 57, 64)


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
    from deepep_ops.moe import MoELayer, dense_moe, make_moe_weights, route
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
        pf = layer.pf
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
            routing = route(x, weights.router, args.topk)

            def communication(x=x, routing=routing, bucket=bucket):
                # Eager dispatch + combine with the step's routing, experts = identity:
                # what neither compiling nor Inductor can make faster (opaque ops).
                p = pf.prepare(x, routing[0], routing[1], num_max_tokens_per_rank=bucket)
                y = p.expert_x.unsqueeze(1).expand(-1, p.topk_ids.shape[1], -1)
                out = torch.empty_like(x)
                pf.finalize(out, y, p.topk_weights, p.topk_ids, p.handle)

            t0 = time.perf_counter()
            compiled(x, bucket)  # first call at this size: compile (if any) + run
            first_call = time.perf_counter() - t0
            med = _interleaved_medians(
                {"eager": lambda: layer(x, bucket), "compiled": lambda: compiled(x, bucket), "comm": communication},
                sync, args.reps,
            )
            eager_out, comp_out = layer(x, bucket), compiled(x, bucket)
            dense = dense_moe(x, weights, args.topk)
            err = (comp_out.float() - dense.float()).abs().max().item() if tokens else 0.0
            err_eager = (comp_out.float() - eager_out.float()).abs().max().item() if tokens else 0.0
            rows.append((mode, batch, tokens, bucket, err, err_eager, med["eager"], med["compiled"], med["comm"]))
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
    worst = {}  # (mode, T) -> max over ranks of (err, err vs eager, eager s, compiled s, comm s)
    for rank, (rows, _) in per_rank.items():
        for r in rows:
            if r[1] != "summary":
                key = (r[0], r[1])
                worst[key] = tuple(max(a, b) for a, b in zip(worst.get(key, (0.0,) * 5), r[4:]))
    print()
    print(f"deepep-ops demo: {args.world_size} ranks, backend={args.backend}, compile backend={args.compile_backend}, "
          f"H={args.hidden}, E={args.experts}, K={args.topk}, capacity={args.capacity}, "
          f"{_threads_per_rank(args)} torch thread(s) per rank")
    print(f"times: median of {args.reps} interleaved calls after {WARMUP} warm-up calls, the slower rank's; "
          "d+c = eager dispatch + combine alone (identity experts); rest = step - d+c")
    header = (f"{'mode':8s} {'T':>5s} {'M':>5s} {'max |err| vs dense':>19s} {'vs eager':>9s} {'eager ms':>9s} "
              f"{'compiled ms':>12s} {'speedup':>8s} {'d+c ms':>7s} {'eager rest':>11s} {'compiled rest':>14s}")
    print(header)
    print("-" * len(header))
    for r in rows0:
        if r[1] == "summary":
            continue
        mode, batch, _tokens, bucket = r[:4]
        err, err_eager, eager_s, comp_s, comm_s = worst[(mode, batch)]
        print(f"{mode:8s} {batch:5d} {bucket if bucket else args.capacity:5d} {err:19.4f} "
              f"{err_eager:9.4f} {eager_s * 1e3:9.2f} {comp_s * 1e3:12.2f} {eager_s / comp_s:7.2f}x "
              f"{comm_s * 1e3:7.2f} {(eager_s - comm_s) * 1e3:11.2f} {(comp_s - comm_s) * 1e3:14.2f}")
    print()
    for mode, (frames, breaks, recompiles) in worst_summary.items():
        print(f"{mode:8s} graph breaks: {breaks}   frames compiled: {frames}   "
              f"recompiles after the first dynamic graph: {recompiles}   (worst rank)")
    print(f"distinct bucket sizes (num_max_tokens_per_rank): {len(buckets)} {buckets}")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's line breaks and show every option's default."""


def _positive(name: str, minimum: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deepep_ops demo",
        description=(
            "Compile a small expert-parallel MoE layer over the deepep_ops ops and report graph breaks,\n"
            "recompiles, bucket sizes, the error against a dense single-process MoE, and eager vs\n"
            "compiled time per step.\n\n"
            "Spawns --world-size ranks: gloo on CPU with the reference buffer by default; NCCL with\n"
            "--device cuda, and deep_ep.ElasticBuffer with --backend deepep (both need one GPU per rank)."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--backend", choices=("reference", "deepep"), default="reference",
                        help="reference: deepep_ops.ReferenceElasticBuffer; deepep: deep_ep.ElasticBuffer (GPUs, DeepEP v2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the reference backend runs (--backend deepep always runs on CUDA)")
    parser.add_argument("--world-size", type=_positive("--world-size"), default=2, metavar="R",
                        help=f"ranks (1..{MAX_RANKS}); --experts must be a multiple of it")
    parser.add_argument("--hidden", type=_positive("--hidden"), default=256, metavar="H",
                        help=f"hidden size, a multiple of {COMBINE_HIDDEN_ALIGNMENT} (DeepEP combine)")
    parser.add_argument("--intermediate", type=_positive("--intermediate"), default=128, metavar="I",
                        help="expert MLP width")
    parser.add_argument("--experts", type=_positive("--experts"), default=8, metavar="E",
                        help=f"experts, global (<= {MAX_EXPERTS}, <= {MAX_LOCAL_EXPERTS} per rank)")
    parser.add_argument("--topk", type=_positive("--topk"), default=2, metavar="K",
                        help=f"experts per token (<= --experts and <= {MAX_TOPK})")
    parser.add_argument("--capacity", type=_positive("--capacity"), default=256, metavar="M",
                        help="buffer num_max_tokens_per_rank: >= --prefill-tokens and >= "
                             f"{max(DECODE_BATCHES)} (the largest decode batch)")
    parser.add_argument("--prefill-tokens", type=_positive("--prefill-tokens"), default=200, metavar="T",
                        help="tokens per rank in the prefill step")
    parser.add_argument("--compile-backend", choices=("inductor", "aot_eager", "eager"), default="inductor",
                        help="torch.compile backend (aot_eager starts faster)")
    parser.add_argument("--reps", type=_positive("--reps"), default=30,
                        help="timed repetitions per step and mode (after warm-up); the table shows medians")
    parser.add_argument("--threads", type=_positive("--threads", 0), default=0,
                        help="torch threads per rank; 0: the cores divided among the ranks, at least 1")
    return parser


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Every bad value is a usage error naming the option and what it allows (before any rank starts)."""
    R, E, K = args.world_size, args.experts, args.topk
    if R > MAX_RANKS:
        parser.error(f"--world-size must be in 1..{MAX_RANKS}, got {R}")
    if args.hidden % COMBINE_HIDDEN_ALIGNMENT:
        parser.error(f"--hidden must be a multiple of {COMBINE_HIDDEN_ALIGNMENT} (DeepEP combine), got {args.hidden}")
    if E % R:
        parser.error(f"--experts must be a multiple of --world-size {R}, got {E}")
    if E > MAX_EXPERTS or E // R > MAX_LOCAL_EXPERTS:
        parser.error(f"--experts must be <= {MAX_EXPERTS} and <= {MAX_LOCAL_EXPERTS} per rank, got {E} over {R} ranks")
    if K > min(E, MAX_TOPK):
        parser.error(f"--topk must be in 1..{min(E, MAX_TOPK)} (<= --experts {E} and <= {MAX_TOPK}), got {K}")
    need = max(args.prefill_tokens, max(DECODE_BATCHES))
    if args.capacity < need:
        parser.error(
            f"--capacity must be >= {need} (--prefill-tokens {args.prefill_tokens} and the largest "
            f"decode batch {max(DECODE_BATCHES)}), got {args.capacity}"
        )
    if args.backend == "deepep" or args.device == "cuda":
        what = "--backend deepep" if args.backend == "deepep" else "--device cuda"
        if not torch.cuda.is_available():
            parser.error(f"{what} needs CUDA GPUs, and torch.cuda.is_available() is False; use --device cpu")
        if torch.cuda.device_count() < R:
            parser.error(f"{what} needs one GPU per rank: --world-size {R}, {torch.cuda.device_count()} GPUs visible")
    if args.backend == "deepep":
        import importlib.util

        if importlib.util.find_spec("deep_ep") is None:
            parser.error("--backend deepep needs the deep_ep package (DeepEP v2, built from source); "
                         "use --backend reference")


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)

    print(f"[demo] spawning {args.world_size} ranks ({args.backend} buffer); "
          f"compiling with {args.compile_backend} (the first calls take a while on CPU)...", flush=True)
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
