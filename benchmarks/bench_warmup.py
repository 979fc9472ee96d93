"""Start-up warm-up and compile-cache reuse on real DeepEP v2 (issue 17).

    python benchmarks/bench_warmup.py                      # GPU: every visible GPU, real DeepEP
    python benchmarks/bench_warmup.py --backend reference  # CPU smoke run (gloo, small sizes)

Phases, each in freshly spawned ranks (nothing warm in memory):

1. ``empty JIT``: a fresh ``EP_JIT_CACHE_DIR``; ``deepep_ops.warmup`` (seconds per
   bucket), then a decode sweep T = 1..capacity through ``DeepEPPrepareFinalize``:
   the first step at every T against that T's steady step (median of 3). A
   bucket whose first step is > 2× its steady step paid a JIT (FAIL).
2. ``primed JIT``: the same ``EP_JIT_CACHE_DIR`` again; warm-up seconds per bucket.
3. compile cache (``--compile``): the decode MoE layer compiled with Inductor
   in two fresh processes sharing one new ``TORCHINDUCTOR_CACHE_DIR``: compile
   seconds, FX-graph / AOT-autograd cache hits, pickle/deepcopy warnings.

Skips (exit 0, a message) without CUDA or ``deep_ep`` for the DeepEP backend.
Defaults (H=7168, K=8, E=64, capacity 256: 9 decode buckets + prefill, ~7 s of
JIT each when cold) keep the whole run near 4 minutes.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_buffer(args, group):
    import deepep_ops

    if args.backend == "reference":
        raw = deepep_ops.ReferenceElasticBuffer(group, num_max_tokens_per_rank=args.capacity, hidden=args.hidden,
                                                num_topk=args.topk)
    else:
        import deep_ep

        raw = deep_ep.ElasticBuffer(group, num_max_tokens_per_rank=args.capacity, hidden=args.hidden,
                                    num_topk=args.topk)
    return deepep_ops.EPOpsBuffer(raw)


def _device(args, rank: int) -> torch.device:
    if args.backend == "reference":
        return torch.device("cpu")
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _phase_warmup(rank, world, args, device, buf, sweep: bool) -> dict:
    import deepep_ops
    from deepep_ops.prepare_finalize import DeepEPPrepareFinalize

    num_tokens = args.warmup_tokens if args.warmup_tokens == "full" else int(args.warmup_tokens)
    rows = deepep_ops.warmup(buf, hidden=args.hidden, num_topk=args.topk, num_experts=args.experts, device=device,
                             num_tokens=num_tokens)
    out = {"rows": [r._asdict() for r in rows]}
    if not sweep:
        return out
    pf = DeepEPPrepareFinalize(buf, args.experts, args.topk, decode=True, device=device)
    g = torch.Generator(device=device).manual_seed(rank)

    def inputs(t):
        x = torch.randn(t, args.hidden, generator=g, device=device).to(torch.bfloat16)
        ids = torch.rand(t, args.experts, generator=g, device=device).argsort(dim=1)[:, : args.topk].to(buf.topk_idx_dtype).contiguous()
        return x, ids, torch.full((t, args.topk), 1.0 / args.topk, device=device)

    def step(x, ids, w, m):
        _sync(device)
        start = time.perf_counter()
        p = pf.prepare(x, w, ids, num_max_tokens_per_rank=m)
        y = torch.empty_like(x)
        pf.finalize_reduced(y, torch.zeros(p.expert_x.shape, dtype=torch.bfloat16, device=device), p.handle)
        _sync(device)
        return time.perf_counter() - start

    if args.glue_step:
        # The process's first prepare/finalize call: CUDA's lazy module loading of
        # the glue's kernels and Python's first calls, once per process whatever
        # the bucket (a serving engine pays it in its profile run). Reported apart.
        out["glue_first"] = step(*inputs(1), 1)
    per_t = []
    for t in range(1, args.capacity + 1):
        x, ids, w = inputs(t)
        m = buf.bucket(t)
        times = [step(x, ids, w, m) for _ in range(4)]
        per_t.append((t, m, times[0], statistics.median(times[1:])))
    out["sweep"] = per_t
    return out


def _phase_compile(rank, world, args, device, buf) -> dict:
    from torch._dynamo.utils import counters

    import deepep_ops
    from deepep_ops.moe import MoELayer, make_moe_weights

    weights = make_moe_weights(args.experts, args.hidden, args.intermediate)
    weights = type(weights)(*(w.to(device) for w in weights))
    layer = MoELayer(weights, deepep_ops.DeepEPPrepareFinalize(buf, args.experts, args.topk, decode=True,
                                                               device=device)).to(device)
    f = torch.compile(layer, fullgraph=True, dynamic=True, backend="inductor")
    x = torch.randn(3, args.hidden, device=device).to(torch.bfloat16)
    _sync(device)
    start = time.perf_counter()
    f(x)
    _sync(device)
    return {"seconds": time.perf_counter() - start, "inductor": dict(counters["inductor"]),
            "aot": dict(counters["aot_autograd"])}


def _worker(rank, world, port, args, phase, env, q):
    os.environ.update(env)
    log_stream = io.StringIO()  # pickling / deepcopy warnings of the compile caches land here
    handler = logging.StreamHandler(log_stream)
    logging.getLogger("torch").addHandler(handler)
    import torch.distributed as dist

    try:
        device = _device(args, rank)
        backend = "gloo" if args.backend == "reference" else "nccl"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=300))
        try:
            buf = _make_buffer(args, dist.group.WORLD)
            if phase == "compile":
                res = _phase_compile(rank, world, args, device, buf)
            else:
                res = _phase_warmup(rank, world, args, device, buf, sweep=phase == "empty JIT")
            dist.barrier()
        finally:
            dist.destroy_process_group()
        res["warnings"] = [ln for ln in log_stream.getvalue().splitlines()
                           if "pickle" in ln.lower() or "deepcopy" in ln.lower()]
        q.put((rank, "ok", res))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        import traceback

        q.put((rank, "error", f"{e!r}\n{traceback.format_exc()}"))


def _spawn(args, world, phase, env) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, phase, env, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, status, res = q.get(timeout=args.phase_timeout)
            if status != "ok":
                raise RuntimeError(f"{phase}: rank {rank} failed:\n{res}")
            results[rank] = res
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return results[0]


def _print_warmup(title, rows):
    from deepep_ops.warmup import WarmupRow, format_warmup_table

    print(f"\n## warm-up, {title}\n")
    print(format_warmup_table([WarmupRow(**r) for r in rows]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("deepep", "reference"), default="deepep")
    ap.add_argument("--ranks", type=int, default=None, help="EP ranks (default: visible GPUs; reference: 2)")
    ap.add_argument("--hidden", type=int, default=None, help="H (default 7168; reference 256)")
    ap.add_argument("--topk", type=int, default=None, help="K (default 8; reference 2)")
    ap.add_argument("--experts", type=int, default=None, help="E (default 64; reference 4)")
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--capacity", type=int, default=None, help="num_max_tokens_per_rank (default 256; reference 16)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure compile-cache reuse across processes")
    ap.add_argument("--warmup-tokens", choices=("0", "1", "full"), default="full",
                    help="deepep_ops.warmup's num_tokens: 0/1 warm the JIT only, full runs M tokens per bucket")
    ap.add_argument("--glue-step", action=argparse.BooleanOptionalAction, default=True,
                    help="time the process's first prepare/finalize call apart, before the sweep")
    ap.add_argument("--phase-timeout", type=float, default=300.0)
    args = ap.parse_args()
    ref = args.backend == "reference"
    for name, gpu, cpu in (("hidden", 7168, 256), ("topk", 8, 2), ("experts", 64, 4), ("capacity", 256, 16)):
        if getattr(args, name) is None:
            setattr(args, name, cpu if ref else gpu)
    if not ref:
        if not torch.cuda.is_available():
            print("bench_warmup: skipped: no CUDA device (use --backend reference for a CPU smoke run)")
            return 0
        try:
            import deep_ep  # noqa: F401
        except ImportError:
            print("bench_warmup: skipped: deep_ep is not installed")
            return 0
    world = args.ranks or (2 if ref else torch.cuda.device_count())
    print(f"bench_warmup: backend={args.backend} ranks={world} H={args.hidden} K={args.topk} E={args.experts} "
          f"capacity={args.capacity} torch={torch.__version__}")

    failed = False
    with tempfile.TemporaryDirectory(prefix="ep_jit_") as jit_dir, \
            tempfile.TemporaryDirectory(prefix="inductor_") as inductor_dir:
        env = {"EP_JIT_CACHE_DIR": jit_dir, "DEEPEP_OPS_WARMUP": "1"}
        cold = _spawn(args, world, "empty JIT", env)
        _print_warmup("empty EP_JIT_CACHE_DIR", cold["rows"])
        primed = _spawn(args, world, "primed JIT", env)
        _print_warmup("primed EP_JIT_CACHE_DIR (a later process)", primed["rows"])

        print(f"\n## first decode step at every T after warm-up (num_tokens={args.warmup_tokens}; rank 0), "
              "worst T per bucket\n")
        if "glue_first" in cold:
            print(f"(the process's first prepare/finalize call, T=1 M=1, before the sweep: "
                  f"{cold['glue_first'] * 1e3:.2f} ms)\n")
        print(f"{'M':>6} {'Ts':>11} {'worst T':>8} {'first ms':>9} {'steady ms':>10} {'ratio':>6}  verdict")
        by_bucket = {}
        for t, m, first, steady in cold["sweep"]:
            by_bucket.setdefault(m, []).append((first / max(steady, 1e-9), t, first, steady))
        for m in sorted(by_bucket):
            items = by_bucket[m]
            ratio, t, first, steady = max(items)
            ok = ratio <= 2.0
            failed |= not ok
            ts = f"{min(i[1] for i in items)}..{max(i[1] for i in items)}"
            print(f"{m:>6} {ts:>11} {t:>8} {first * 1e3:>9.2f} {steady * 1e3:>10.2f} {ratio:>6.2f}  "
                  f"{'ok' if ok else 'FAIL (> 2x: cold)'}")

        if args.compile:
            cenv = dict(env, TORCHINDUCTOR_CACHE_DIR=inductor_dir)
            runs = [_spawn(args, world, "compile", cenv) for _ in range(2)]
            print("\n## compile of the decode MoE layer (Inductor), rank 0, two fresh processes, one cache dir\n")
            print(f"{'process':<8} {'seconds':>8} {'fx hit':>7} {'fx miss':>8} {'aot hit':>8} {'aot miss':>9} "
                  f"{'warnings':>9}")
            for name, r in zip(("cold", "warm"), runs):
                print(f"{name:<8} {r['seconds']:>8.1f} {r['inductor'].get('fxgraph_cache_hit', 0):>7} "
                      f"{r['inductor'].get('fxgraph_cache_miss', 0):>8} {r['aot'].get('autograd_cache_hit', 0):>8} "
                      f"{r['aot'].get('autograd_cache_miss', 0):>9} {len(r['warnings']):>9}")
                for w in r["warnings"][:3]:
                    print(f"    {w[:200]}")
            warm = runs[1]
            hit = warm["inductor"].get("fxgraph_cache_hit", 0) > 0 and warm["aot"].get("autograd_cache_hit", 0) > 0
            failed |= not hit or any(r["warnings"] for r in runs)
            print(f"\ncompile cache reused across processes: {'yes' if hit else 'NO'}")
    print("\nbench_warmup: " + ("FAIL" if failed else "ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
