"""Decode dispatch + combine on one GPU: raw buffer vs deepep_ops vs prepare/finalize.

Side by side in one process, on the same inputs, for each T (M = next pow2 of T):

- ``raw``: ``ElasticBuffer.dispatch`` + ``combine`` called directly with the
  flags the eager ops use (decode: no CPU sync, no expand; DeepEP's default
  ``do_handle_copy=True``, the handle's own copy of ``topk_idx``, as vLLM calls
  it; DeepEP v2.5 has no copy, so there ``raw`` is ``raw/no copy``), the floor;
  ``raw/no copy``: the same with ``do_handle_copy=False``;
  ``raw/as backend`` (host table only): with ``backends/deep_ep.py``'s exact
  arguments (no copy, ``num_sms`` given); ``backend``: that module's dispatch,
  then DeepEP's combine on the handle it returns, no op layer (host table only);
- ``ops``: ``deepep_ops.dispatch`` + ``deepep_ops.combine`` (the eager fast path);
  ``ops/torch.ops``: the same forced through the dispatcher;
- ``pf``: :class:`DeepEPPrepareFinalize` prepare → expert stand-in → finalize,
  eager and ``torch.compile(fullgraph=True, dynamic=True)``. The stand-in
  (``--expert-output``): ``materialized`` (default) hands finalize a
  persistent [R·M, K, H] bf16 tensor, one output per (row, lane) in memory, as
  a grouped GEMM leaves it in a model, so the glue reads what it reads there
  (every routed lane); ``broadcast`` hands it the received rows expanded over K
  (stride 0: the identity experts of earlier runs, which make the
  weight-and-reduce read one row K times over); the hidden size
  is marked static (``--hidden-dim static``, the default), as it is in a model,
  whose weights fix it, and in vLLM, which marks only the token dim dynamic:
  a symbolic H (``--hidden-dim dynamic``, what ``dynamic=True`` does to a
  function of activations only) puts symbolic index arithmetic into every glue
  kernel (the fused weight-and-reduce 2.8x slower at T = 512 on the H200);
- ``… graph``: each captured once with ``torch.cuda.graph`` and replayed.

Then the compiled glue (quantization, id globalize, weight-and-reduce, the
output copy: compiled pf graph − ops graph) against its memory-traffic floor:
the bytes it must move (:func:`glue_bytes`) over the device-to-device copy
bandwidth measured in the same run. Times: median wall µs over ``--reps``
calls, each synchronized; the variants take turns call by call, so drifting
clocks and load fall on all alike; ops − raw is also given paired (the median
of the differences of neighbouring calls, with its 95 % confidence interval),
which cancels the drift that a difference of two medians keeps. With
``--backend deepep``, the host time of an eager pair is split at DeepEP's calls
(a timing shim around the ``ElasticBuffer``): inside DeepEP, and the rest,
which for the ops is the op layer's own. ``--profile-glue`` lists the compiled
step's kernels at the largest T.

    python benchmarks/bench_deepep.py --backend deepep     # DeepEP's buffer (new_buffer), NCCL world size 1
    python benchmarks/bench_deepep.py --backend reference  # ReferenceElasticBuffer
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_op_overhead import _through_dispatcher, backend_dispatch  # noqa: E402
from bench_prepare_finalize import capture_cuda_graph, make_step  # noqa: E402

SIZES = (1, 8, 64, 512)


def _time_interleaved_us(fns: dict, reps: int, warmup: int = 5, samples: Optional[dict] = None) -> dict:
    """Median wall µs per synchronized call of each of ``fns``, taking turns call by call
    (each call's µs appended to ``samples[name]`` when given, for paired differences)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    if samples is not None:
        for name, t in times.items():
            samples[name] = [v * 1e6 for v in t]
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def paired_difference(a: list, b: list) -> tuple:
    """Median of ``a[i] - b[i]`` (calls made one after the other) and its
    distribution-free 95 % confidence interval (order statistics of the
    differences): ``(median, low, high)``. Wall times of one pair drift by tens
    of µs on the device hosts; a difference of neighbours cancels the drift that
    a difference of two medians keeps."""
    d = sorted(x - y for x, y in zip(a, b))
    n = len(d)
    half = 0.98 * n**0.5  # 1.96 * sqrt(n) / 2
    lo, hi = max(0, int(n / 2 - half)), min(n - 1, int(n / 2 + half))
    return statistics.median(d), d[lo], d[hi]


class TimedBuffer:
    """``ElasticBuffer``'s API over ``native``, adding the host seconds spent inside
    its ``dispatch`` and ``combine`` to :attr:`inside`: what is left of a pair's
    host time is the caller's own (the op layer's, for the ops)."""

    def __init__(self, native: object) -> None:
        self._native = native
        self.inside = 0.0

    def __getattr__(self, name: str):
        return getattr(self._native, name)

    def _timed(self, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.inside += time.perf_counter() - t0

    def dispatch(self, *args, **kwargs):
        return self._timed(self._native.dispatch, *args, **kwargs)

    def combine(self, *args, **kwargs):
        return self._timed(self._native.combine, *args, **kwargs)


def _host_split_us(fns: dict, timed: TimedBuffer, reps: int = 30, batch: int = 20) -> dict:
    """``{name: (host µs per pair, of it inside DeepEP's calls)}``, unsynchronized
    batches as in :func:`_host_issue_us`, medians over ``reps``."""
    total = {name: [] for name in fns}
    inside = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            timed.inside = 0.0
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            total[name].append((time.perf_counter() - t0) / batch * 1e6)
            inside[name].append(timed.inside / batch * 1e6)
            torch.cuda.synchronize()
    return {name: (statistics.median(total[name]), statistics.median(inside[name])) for name in fns}


def _host_issue_us(fns: dict, reps: int = 30, batch: int = 20) -> dict:
    """Median host µs to issue one call of each of ``fns`` without synchronizing:
    ``batch`` calls back to back (the GPU runs behind), timed before the sync that
    drains them, the variants taking turns. What the host itself spends, which
    the synchronized wall times above mix with the GPU's tail."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            times[name].append((time.perf_counter() - t0) / batch * 1e6)
            torch.cuda.synchronize()
    return {name: statistics.median(t) for name, t in times.items()}


def _profile_kernels(fn, label: str, calls: int = 5) -> None:
    """Print the CUDA kernels of ``calls`` calls of ``fn`` with their device µs per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    print(f"\nkernels of {label} (device µs per call):")
    rows = [(e.device_time_total / calls, e.count // calls, e.key) for e in prof.key_averages()
            if e.device_time_total > 0 and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    for us, count, key in sorted(rows, reverse=True)[:20]:
        print(f"  {us:8.1f} µs  x{count}  {key[:110]}")


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), 1 GiB buffers."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times)


def glue_bytes(T: int, M: int, R: int, H: int, K: int, fp8: bool, expert_output_bytes: int) -> int:
    """The fewest bytes the decode glue moves: quantize x (fp8: read bf16, write fp8 +
    scales), read the expert outputs it reduces (``expert_output_bytes``), local ids
    and weights once, write the reduced rows. (No output copy: the step's output is
    fresh, so Inductor hands combine's result back as it, and finalize's copy_
    disappears.)"""
    rows = R * M
    quant = (T * H * 2 + T * H + T * (H // 128) * 4) if fp8 else 0
    return quant + expert_output_bytes + rows * K * (8 + 4) + rows * H * 2


def expert_output_bytes(T: int, M: int, R: int, H: int, K: int, fp8: bool, materialized: bool) -> int:
    """What the weight-and-reduce must read of the expert outputs: materialized, every
    routed lane of every real row, [H] bf16 each (R = 1 and no empty slot here:
    all T·K lanes); broadcast, each received row once (all its lanes are that row,
    read as received: fp8 before the stand-in's conversion)."""
    return T * K * H * 2 if materialized else R * M * H * (1 if fp8 else 2)




def make_lanes_step(pf, lanes: torch.Tensor):
    """prepare → expert stand-in → finalize, the stand-in's outputs ``lanes[:rows]``
    ([R·M_max, K, H] bf16, persistent): what the glue reads in a model, where the
    experts' grouped GEMM writes one output per (row, lane), without the GEMM."""

    def step(x, topk_weights, topk_ids, m):
        p = pf.prepare(x, topk_weights, topk_ids, num_max_tokens_per_rank=m)
        out = torch.empty_like(x)
        pf.finalize(out, lanes[: p.topk_ids.shape[0]], p.topk_weights, p.topk_ids, p.handle)
        return out

    return step


def _make_buffer(backend: str, capacity: int, args):
    """(native buffer with ElasticBuffer's API, cleanup)."""
    import deepep_ops

    if backend == "reference":
        return deepep_ops.ReferenceElasticBuffer(None, num_max_tokens_per_rank=capacity, hidden=args.hidden,
                                                 num_topk=args.topk), (lambda: None)
    import torch.distributed as dist

    from deepep_ops.backends.deep_ep import new_buffer

    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    # v2.1's ElasticBuffer or v2.5's EPBuffer, whichever is installed.
    native = new_buffer(dist.group.WORLD, num_max_tokens_per_rank=capacity, hidden=args.hidden,
                        num_topk=args.topk, use_fp8_dispatch=args.fp8, explicitly_destroy=True)

    def cleanup():
        native.destroy()
        dist.destroy_process_group()

    return native, cleanup


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("deepep", "reference"), default="deepep")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--fp8", action="store_true", help="block-fp8 dispatch in prepare/finalize")
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--compile-first", choices=("largest", "smallest"), default="largest",
                        help="the T whose shapes the compile sees first (Inductor's launch configs follow it)")
    parser.add_argument("--hidden-dim", choices=("static", "dynamic"), default="static",
                        help="whether the compiled step sees H as a constant (as in a model: its weights fix it) "
                             "or as a symbol (dynamic=True on a function of activations only)")
    parser.add_argument("--expert-output", choices=("materialized", "broadcast"), default="materialized",
                        help="what the expert stand-in hands finalize: a persistent [R*M, K, H] output per (row, "
                             "lane), as a grouped GEMM leaves it, or the received rows broadcast over K (stride 0)")
    parser.add_argument("--profile-glue", action="store_true",
                        help="print the kernels of the compiled step and of the bare ops at the largest T")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    args = parser.parse_args(argv)

    import deepep_ops
    from deepep_ops.prepare_finalize import DeepEPPrepareFinalize

    torch.cuda.set_device(0)
    sizes = [int(s) for s in args.sizes.split(",")]
    H, K, E = args.hidden, args.topk, args.experts
    capacity = max(sizes)
    native, cleanup = _make_buffer(args.backend, capacity, args)
    buffer = deepep_ops.EPOpsBuffer(native)
    timed = timed_buffer = None
    if args.backend == "deepep":
        from deepep_ops.backends.deep_ep import DeepEPBackend

        # The same DeepEP buffer behind a timing shim: where an eager pair's host time goes.
        timed = TimedBuffer(native)
        real = buffer.backend
        timed_buffer = deepep_ops.EPOpsBuffer(DeepEPBackend(timed, real.handle_class, real.topk_idx_dtype, real.api))
    R = buffer.num_ranks
    bandwidth = copy_bandwidth()
    pf = DeepEPPrepareFinalize(buffer, E, K, decode=True, use_fp8_dispatch=args.fp8, device="cuda")
    lanes = None
    if args.expert_output == "materialized":
        # Distinct per lane, so a reduce that mixes up lanes or weights shows in the checks
        # below; the same for every row, since DeepEP's decode row order is not deterministic
        # (a stand-in keyed by row would give eager and compiled calls other answers).
        g = torch.Generator().manual_seed(0)
        lane_values = torch.randn(1, K, H, generator=g).to("cuda", torch.bfloat16)
        lanes = lane_values.expand(R * capacity, K, H).contiguous()
    step = make_step(pf, K) if lanes is None else make_lanes_step(pf, lanes)
    compiled = torch.compile(step, fullgraph=True, dynamic=True)

    def tokens(t: torch.Tensor) -> torch.Tensor:
        if args.hidden_dim == "static":
            torch._dynamo.mark_static(t, 1)
        return t
    rows = []
    try:
        if args.compile_first == "largest":
            # The first call compiles, and Inductor sizes its kernels' launch configs
            # for that call's shapes: vLLM compiles at max_num_batched_tokens, so the
            # largest T first is what a server gets (the smallest first ran the
            # glue's pointwise kernel 2.5x slower at T = 512 on the H200).
            big = max(sizes)
            M = deepep_ops.pow2_bucket(big, capacity)
            compiled(tokens(torch.zeros(big, H, dtype=torch.bfloat16, device="cuda")),
                     torch.full((big, K), 1.0 / K, device="cuda"),
                     torch.arange(K, device="cuda").repeat(big, 1), M)
        for T in sizes:
            M = deepep_ops.pow2_bucket(T, capacity)
            g = torch.Generator().manual_seed(T)
            x = tokens(torch.randn(T, H, generator=g).to("cuda", torch.bfloat16))
            ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).cuda()
            w = torch.rand(T, K, generator=g).cuda()

            # DeepEP's default: v2.1 copies topk_idx into its handle; v2.5 cannot (it asserts).
            def raw(copy=buffer.backend.api.handle_copy, num_sms=0):
                recv_x, _, _, handle, _ = native.dispatch(
                    x, topk_idx=ids, topk_weights=w, num_experts=E, num_max_tokens_per_rank=M,
                    expert_alignment=1, num_sms=num_sms, do_handle_copy=copy, do_cpu_sync=False, do_expand=False,
                    do_zero_padding=False,
                )
                return native.combine(recv_x, handle=handle)[0]

            def raw_no_copy():
                return raw(copy=False)

            def raw_as_backend():  # exactly the arguments backends/deep_ep.py passes
                return raw(copy=False, num_sms=buffer.backend.num_sms(E, K))

            def backend():  # the backend module's dispatch, DeepEP's combine on its handle: no op layer
                d = backend_dispatch(buffer.backend, x, ids, w, E, M)
                return native.combine(d.recv_x, handle=d.native_handle)[0]

            def ops():
                d = deepep_ops.dispatch(x, ids, w, buffer, num_experts=E, num_max_tokens_per_rank=M)
                return deepep_ops.combine(d.recv_x, d.handle, buffer)

            def ops_dispatcher():
                with _through_dispatcher():
                    return ops()

            def pf_eager():
                return step(x, w, ids, M)

            def pf_compiled():
                return compiled(x, w, ids, M)

            fns = {"raw": raw, "raw/no copy": raw_no_copy, "ops": ops, "ops/torch.ops": ops_dispatcher, "pf": pf_eager,
                   "pf compiled": pf_compiled}
            expected = pf_eager().float()
            err = (pf_compiled().float() - expected).abs().max().item()
            assert err < 0.05, f"T={T}: compiled differs from eager by {err}"
            assert torch.equal(raw(), ops()), f"T={T}: ops differ from raw"
            for name in ("raw", "ops", "pf compiled"):
                replay = capture_cuda_graph(lambda f=fns[name]: f(), ())
                out = replay()
                if name == "pf compiled":
                    err = (out.float() - expected).abs().max().item()
                    assert err < 0.05, f"T={T}: graph replay differs from eager by {err}"
                fns[f"{name} graph"] = replay
            samples: dict = {}
            times = _time_interleaved_us(fns, args.reps, samples=samples)
            paired = {ref: paired_difference(samples["ops"], samples[ref]) for ref in ("raw", "raw/no copy")}
            issue = _host_issue_us({"raw": raw, "raw/no copy": raw_no_copy, "raw/as backend": raw_as_backend,
                                    "backend": backend, "ops": ops})
            split = None
            if timed is not None:
                def raw_timed():
                    recv_x, _, _, handle, _ = timed.dispatch(
                        x, topk_idx=ids, topk_weights=w, num_experts=E, num_max_tokens_per_rank=M,
                        expert_alignment=1, num_sms=buffer.backend.num_sms(E, K), do_handle_copy=False,
                        do_cpu_sync=False, do_expand=False, do_zero_padding=False,
                    )
                    return timed.combine(recv_x, handle=handle)[0]

                def ops_timed():
                    d = deepep_ops.dispatch(x, ids, w, timed_buffer, num_experts=E, num_max_tokens_per_rank=M)
                    return deepep_ops.combine(d.recv_x, d.handle, timed_buffer)

                split = _host_split_us({"raw/as backend": raw_timed, "ops": ops_timed}, timed)
            rows.append((T, M, times, issue, paired, split))
            if args.profile_glue and T == sizes[-1]:
                _profile_kernels(pf_compiled, f"pf compiled, T={T} M={M} (eager launches)")
                _profile_kernels(ops, f"ops, T={T} M={M}")
    finally:
        cleanup()

    dev = torch.cuda.get_device_name(0)
    de = ""
    if args.backend == "deepep":
        import deep_ep

        de = f", deep_ep {getattr(deep_ep, '__version__', '?')}"
    print(f"\ndecode dispatch+combine, {args.backend} backend, {R} rank on {dev}, torch {torch.__version__}{de}, "
          f"H={H} K={K} E={E}, {'fp8' if args.fp8 else 'bf16'} prepare/finalize with {args.expert_output} expert "
          f"outputs, compiled at the {args.compile_first} "
          f"T first with a {args.hidden_dim} H; median wall µs of {args.reps} "
          f"synchronized calls; copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    names = list(rows[0][2])
    print("| T | M | " + " | ".join(names) + " | ops − raw | glue = pf compiled graph − ops graph | glue floor |"
          " glue / floor |")
    print("|---|---|" + "---|" * (len(names) + 4))
    for T, M, t, *_ in rows:
        glue = t["pf compiled graph"] - t["ops graph"]
        read = expert_output_bytes(T, M, R, H, K, args.fp8, materialized=lanes is not None)
        floor = glue_bytes(T, M, R, H, K, args.fp8, read) / bandwidth * 1e6
        print(f"| {T} | {M} | " + " | ".join(f"{t[n]:.0f}" for n in names)
              + f" | {t['ops'] - t['raw']:+.1f} | {glue:.1f} | {floor:.1f} | {glue / floor:.1f}× |")
    print("\nhost µs to issue one eager pair, unsynchronized (20 back to back, median of 30)")
    print("(raw/as backend: the raw calls with backends/deep_ep.py's arguments, no copy and num_sms given; "
          "backend: that module's dispatch, then DeepEP's combine on its handle: no op layer)")
    print("| T | M | raw | raw/no copy | raw/as backend | backend | ops | ops − raw/no copy "
          "| backend − raw/as backend | ops − backend |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for T, M, _t, i, *_ in rows:
        print(f"| {T} | {M} | {i['raw']:.1f} | {i['raw/no copy']:.1f} | {i['raw/as backend']:.1f} "
              f"| {i['backend']:.1f} | {i['ops']:.1f} | {i['ops'] - i['raw/no copy']:+.1f} "
              f"| {i['backend'] - i['raw/as backend']:+.1f} | {i['ops'] - i['backend']:+.1f} |")
    print(f"\nops − raw, wall µs, paired: the median of the differences of neighbouring calls in the first table's "
          f"run [95 % CI], {args.reps} pairs")
    print("| T | M | ops − raw | ops − raw/no copy |")
    print("|---|---|---|---|")
    for T, M, _t, _i, paired, _split in rows:
        cells = " | ".join(f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]" for m, lo, hi in (paired["raw"], paired["raw/no copy"]))
        print(f"| {T} | {M} | {cells} |")
    if rows and rows[0][5] is not None:
        print("\nhost µs per eager pair, split at DeepEP's calls (a timing shim around the ElasticBuffer; "
              "unsynchronized, 20 back to back, median of 30): inside = in ElasticBuffer.dispatch + combine, "
              "outside = the rest (the op layer, for ops)")
        print("| T | M | raw total | raw inside | raw outside | ops total | ops inside | ops outside "
              "| ops − raw outside | ops − raw inside |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for T, M, _t, _i, _p, sp in rows:
            (rt, ri), (ot, oi) = sp["raw/as backend"], sp["ops"]
            print(f"| {T} | {M} | {rt:.1f} | {ri:.1f} | {rt - ri:.1f} | {ot:.1f} | {oi:.1f} | {ot - oi:.1f} "
                  f"| {(ot - oi) - (rt - ri):+.1f} | {oi - ri:+.1f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
