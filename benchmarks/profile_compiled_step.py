"""Where the host time of a compiled prepare/finalize step goes, without CUDA graphs.

Times the step (prepare → identity experts → finalize, decode or prefill) eager
and compiled, taking turns, then runs the compiled step under cProfile and
sums each function's own time by where its code lives:

- ``Dynamo frame + guards``: ``torch/_dynamo`` (the frame hook, guard checks);
- ``AOT / Inductor wrappers``: ``torch/_functorch``, ``torch/_inductor`` (runtime
  wrappers, ``assert_size_stride``, output handling);
- ``Inductor call()``: the generated module (kernel launches, our ops' calls);
- ``deepep_ops``: our kernels and their admission (known calls, checks);
- ``DeepEP``: ``deep_ep`` Python and its C++ calls;
- ``torch ops (C++)``: built-in calls (the dispatcher, allocations, launches);
- ``other``.

cProfile slows Python down, so the table gives shares of the profiled time,
scaled to the unprofiled compiled step's median.

``--torch-profiler`` adds, for eager and compiled alike (and, in decode, the
dispatch + combine pair alone), what ``torch.profiler`` counts per step: CUDA kernel launches, host syncs (stream, device and event
synchronizations, blocking copies, ``item()``-style host reads) and
allocations, how long the GPU was busy (kernels and copies), and the events
with the most self CPU time. A step whose host
time is far above its Python and launches waits somewhere: this says where.
``--gc-freeze`` times both again after ``gc.freeze()``, as vLLM does after
start-up, to show what Python's cyclic collector costs each step, and the
compiled step with Dynamo's guards skipped
(``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``), close to how
vLLM calls its compiled graphs.

    python benchmarks/profile_compiled_step.py --backend deepep --sizes 1,64,512
    python benchmarks/profile_compiled_step.py --backend deepep --sizes 64 --torch-profiler --gc-freeze
    python benchmarks/profile_compiled_step.py --backend reference --device cpu --hidden 512 --topk 2 --experts 8
    python benchmarks/profile_compiled_step.py --backend null --device cpu --hidden 256 --sizes 1,64 --gc-freeze
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import os
import pstats
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

CATEGORIES = ("Dynamo frame + guards", "AOT / Inductor wrappers", "Inductor call()", "deepep_ops", "DeepEP",
              "torch ops (C++)", "other")


def _category(filename: str, name: str) -> str:
    if filename == "~":  # a built-in
        return "DeepEP" if "deep_ep" in name or "EPBuffer" in name else "torch ops (C++)"
    if "torch/_dynamo" in filename:
        return "Dynamo frame + guards"
    if "torch/_functorch" in filename or "torch/_inductor" in filename:
        return "AOT / Inductor wrappers"
    # Before the /tmp/ test: DeepEP may be installed under /tmp (the device machines' is).
    if "deep_ep" in filename:
        return "DeepEP"
    if "deepep_ops" in filename or "fake_impls" in filename:
        return "deepep_ops"
    if "torchinductor" in filename or "/tmp/" in filename:
        return "Inductor call()"
    return "other"


def _breakdown(fn, calls: int) -> dict:
    """Own time per category over ``calls`` profiled calls, as fractions of the total."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    per = dict.fromkeys(CATEGORIES, 0.0)
    for (filename, _line, name), (_cc, _nc, tottime, _ct, _callers) in pstats.Stats(prof).stats.items():
        per[_category(filename, name)] += tottime
    total = sum(per.values()) or 1.0
    return {k: v / total for k, v in per.items()}


#: torch.profiler's names for the CUDA runtime and driver calls counted per step.
_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
             "cudaLaunchCooperativeKernel")
_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
          "aten::_local_scalar_dense")
_ALLOCS = ("cudaMalloc", "cudaFree", "cudaHostAlloc")


def _torch_profile(fn, sync, calls: int, top: int) -> tuple:
    """``(counts per step, [(event, self CPU µs per step)] of the ``top`` events)``
    over ``calls`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        sync()
    events = prof.key_averages()
    counts = {"launches": 0, "syncs": 0, "allocs": 0, "gpu_us": 0.0}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:  # kernels and copies, not the CPU ops above them
            counts["gpu_us"] += e.self_device_time_total
        for kind, names in (("launches", _LAUNCHES), ("syncs", _SYNCS), ("allocs", _ALLOCS)):
            if e.key in names:
                counts[kind] += e.count
    counts = {k: v / calls for k, v in counts.items()}
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return counts, [(e.key, e.self_cpu_time_total / calls) for e in ranked]


@contextlib.contextmanager
def _gc_frozen():
    """Every object alive now moved out of the cyclic collector's reach (``gc.freeze``)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _median(fn, sync, reps: int) -> float:
    ts = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("deepep", "reference", "null"), default="deepep",
                        help="null: bench_op_overhead's DeepEP-API buffer that moves nothing (decode only; "
                             "check mode and value checks off, as GPU decode runs): the host cost of our "
                             "code and torch's alone")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mode", choices=("decode", "prefill"), default="decode")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--sizes", default="1,64,512")
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--profile-calls", type=int, default=200)
    parser.add_argument("--torch-profiler", action="store_true",
                        help="also count launches, host syncs and allocations per step, eager and compiled")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="also time both steps after gc.freeze(), and the compiled one without guard checks")
    parser.add_argument("--top", type=int, default=8, help="events listed per step with --torch-profiler")
    args = parser.parse_args(argv)
    if args.backend == "null" and args.mode != "decode":
        parser.error("--backend null has decode outputs only: use --mode decode")

    import deepep_ops
    from deepep_ops import DeepEPPrepareFinalize

    device = torch.device(args.device)
    sizes = [int(s) for s in args.sizes.split(",")]
    capacity = max(sizes)
    H, K, E = args.hidden, args.topk, args.experts
    if args.backend == "deepep":
        from deepep_ops.backends.deep_ep import new_buffer

        torch.cuda.set_device(0)
        store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
        dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
        # v2.1's ElasticBuffer or v2.5's EPBuffer, whichever is installed.
        native = new_buffer(dist.group.WORLD, num_max_tokens_per_rank=capacity, hidden=H, num_topk=K,
                            explicitly_destroy=True)
    elif args.backend == "null":
        import deepep_ops.validation as validation
        from bench_op_overhead import NullElasticBuffer, NullEPHandle
        from deepep_ops.backends.deep_ep import DeepEPBackend

        validation.value_checks_enabled = lambda device, decode: False  # as for GPU decode
        native = DeepEPBackend(NullElasticBuffer(capacity, H, K, device), NullEPHandle, torch.int64)
    else:
        native = deepep_ops.ReferenceElasticBuffer(None, num_max_tokens_per_rank=capacity, hidden=H, num_topk=K)
    # The null buffer runs as GPU decode does (agree-once); the others keep their device's default.
    buffer = deepep_ops.EPOpsBuffer(native, check=False if args.backend == "null" else None)
    decode = args.mode == "decode"
    pf = DeepEPPrepareFinalize(buffer, E, K, decode=decode, device=device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)

    def step(x, w, ids, m):
        p = pf.prepare(x, w, ids, num_max_tokens_per_rank=m)
        y = p.expert_x.unsqueeze(1).expand(-1, p.topk_ids.shape[1], -1)
        out = torch.empty_like(x)
        pf.finalize(out, y, p.topk_weights, p.topk_ids, p.handle)
        return out

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    print(f"compiled {args.mode} prepare/finalize without CUDA graphs, {args.backend} on "
          f"{torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}, "
          f"H={H} K={K} E={E}; deepep_ops from {os.path.dirname(deepep_ops.__file__)}")
    print("| T | eager µs | compiled µs | compiled / eager | " + " | ".join(f"{c} µs" for c in CATEGORIES) + " |")
    print("|---|---|---|---|" + "---|" * len(CATEGORIES))
    extra = []  # ("profiler" | "gc", T, what that table prints), printed after the main table
    for T in sorted(sizes, reverse=True):  # the largest first: one dynamic graph for all
        g = torch.Generator().manual_seed(T)
        x = torch.randn(T, H, generator=g).to(device, torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(device)
        w = torch.rand(T, K, generator=g).to(device)
        m = deepep_ops.pow2_bucket(T, capacity) if decode else None
        eager_fn, comp_fn = (lambda: step(x, w, ids, m)), (lambda: compiled(x, w, ids, m))
        for _ in range(3):
            eager_fn()
            comp_fn()
        eager, comp = [], []
        for _ in range(5):  # taking turns
            eager.append(_median(eager_fn, sync, args.reps // 5))
            comp.append(_median(comp_fn, sync, args.reps // 5))
        eager_s, comp_s = statistics.median(eager), statistics.median(comp)
        shares = _breakdown(comp_fn, args.profile_calls)
        sync()
        print(f"| {T} | {eager_s * 1e6:.0f} | {comp_s * 1e6:.0f} | {comp_s / eager_s:.2f} | "
              + " | ".join(f"{shares[c] * comp_s * 1e6:.0f}" for c in CATEGORIES) + " |")
        if args.torch_profiler:
            variants = {"eager": eager_fn, "compiled": comp_fn}
            if decode:
                # The ops alone, without the step's glue: what both steps spend beyond this pair is theirs.
                def ops_pair():
                    d = deepep_ops.dispatch(x, ids, w, buffer, num_experts=E, num_max_tokens_per_rank=m)
                    return deepep_ops.combine(d.recv_x, d.handle, buffer)

                variants["ops pair (eager)"] = ops_pair
            extra.append(("profiler", T, {name: _torch_profile(fn, sync, args.profile_calls, args.top)
                                          for name, fn in variants.items()}))
        if args.gc_freeze:
            def unguarded():
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return compiled(x, w, ids, m)

            times = {k: [] for k in ("eager", "compiled", "compiled, guards skipped", "eager, gc frozen",
                                     "compiled, gc frozen")}
            for _ in range(5):  # taking turns, the frozen pair inside one freeze
                times["eager"].append(_median(eager_fn, sync, args.reps // 5))
                times["compiled"].append(_median(comp_fn, sync, args.reps // 5))
                times["compiled, guards skipped"].append(_median(unguarded, sync, args.reps // 5))
                with _gc_frozen():
                    times["eager, gc frozen"].append(_median(eager_fn, sync, args.reps // 5))
                    times["compiled, gc frozen"].append(_median(comp_fn, sync, args.reps // 5))
            extra.append(("gc", T, {k: statistics.median(v) for k, v in times.items()}))
    print("category µs: cProfile's own-time shares of the compiled step, scaled to its unprofiled median "
          "(host time; on a GPU the step is host-bound at these sizes)")
    for kind, T, data in extra:
        if kind == "profiler":
            print(f"\ntorch.profiler, T={T}, per step over {args.profile_calls} steps "
                  "(syncs: stream/device/event synchronizations, blocking cudaMemcpy, host reads of tensor values)")
            print("| step | kernel launches | host syncs | cudaMalloc/Free | GPU busy µs | "
                  "top self-CPU events (µs per step) |")
            print("|---|---|---|---|---|---|")
            for name, (counts, top) in data.items():
                events = "; ".join(f"{key} {us:.1f}" for key, us in top)
                print(f"| {name} | {counts['launches']:.1f} | {counts['syncs']:.1f} | {counts['allocs']:.1f} | "
                      f"{counts['gpu_us']:.0f} | {events} |")
        else:
            print(f"\nPython's cyclic GC and Dynamo's guards, T={T}: median µs, taking turns ({args.reps} steps each)")
            print("| " + " | ".join(data) + " | compiled / eager | frozen: compiled / eager |")
            print("|" + "---|" * (len(data) + 2))
            print("| " + " | ".join(f"{v * 1e6:.0f}" for v in data.values())
                  + f" | {data['compiled'] / data['eager']:.2f} | "
                  f"{data['compiled, gc frozen'] / data['eager, gc frozen']:.2f} |")
    if args.backend == "deepep":
        native.destroy()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
