"""Does a shared expert overlap DeepEP's dispatch on one GPU, and on how many SMs must DeepEP run?

Raw DeepEP v2.1 calls (``deep_ep.ElasticBuffer``, world size 1, decode layout,
no deepep_ops in the timed code), each variant captured once in a CUDA graph
and replayed, variants taking turns replay by replay:

- ``a2a``: dispatch → combine;
- ``shared``: the shared expert alone (a SiLU-gated MLP H → Is → H);
- ``sequential``: dispatch → combine, then the shared expert;
- ``overlapped``: dispatch with ``async_with_compute_stream=True``, the shared
  expert on the compute stream, the stream join, then combine.

for each ``num_sms`` of ``--num-sms`` (``0``: DeepEP's ``get_theoretical_num_sms``,
every SM of the GPU at R = 1). It prints the paired saving sequential −
overlapped with its 95 % CI beside issue 33's target, half the shorter of
shared expert and a2a. This is the floor under ``EPOpsBuffer(num_sms=N)``
and ``bench_moe_layer.py --overlap-sms N``.

    EP_AVOID_RECORD_STREAM=1 python benchmarks/bench_overlap_sms.py --sizes 64,512 --num-sms 0,24,48
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

# One CUDA-graph helper and one paired-difference CI for the layer benchmark and this one.
from bench_moe_layer import _graph, _paired_median_ci


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,512", help="tokens T (M = T)")
    parser.add_argument("--num-sms", default="0,24,48", help="DeepEP num_sms per row; 0: DeepEP's choice")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--shared-intermediate", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_overlap_sms.py needs a CUDA GPU and DeepEP v2.1 (deep_ep.ElasticBuffer)")
    import deep_ep

    torch.cuda.set_device(0)
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    H, K, E, IS = args.hidden, args.topk, args.experts, args.shared_intermediate
    sizes = [int(s) for s in args.sizes.split(",")]
    buf = deep_ep.ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=max(sizes), hidden=H, num_topk=K,
                                explicitly_destroy=True)
    theoretical = buf.get_theoretical_num_sms(E, K)
    counts = [int(n) or theoretical for n in args.num_sms.split(",")]
    g = torch.Generator().manual_seed(0)
    w_gate_up = (torch.randn(H, 2 * IS, generator=g) / H**0.5).cuda().bfloat16()
    w_down = (torch.randn(IS, H, generator=g) / IS**0.5).cuda().bfloat16()

    def shared(x):
        gate, up = (x @ w_gate_up).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ w_down

    print(f"raw DeepEP on {torch.cuda.get_device_name(0)} "
          f"({torch.cuda.get_device_properties(0).multi_processor_count} SMs; get_theoretical_num_sms: "
          f"{theoretical}), torch {torch.__version__}, H={H} K={K} E={E} shared I={IS}, decode layout; "
          f"median µs of {args.reps} graph replays, variants taking turns", flush=True)
    print("| T | num_sms | a2a | shared | sequential | overlapped | saved [95 % CI] | 0.5 min(shared, a2a) |")
    print("|---|---|---|---|---|---|---|---|")
    for T in sizes:
        x = torch.randn(T, H, generator=g).cuda().bfloat16()
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).cuda()
        w = torch.rand(T, K, generator=g).cuda()
        for n in counts:
            kw = dict(topk_idx=ids, topk_weights=w, num_experts=E, num_max_tokens_per_rank=T, num_sms=n,
                      do_handle_copy=False, do_cpu_sync=False, do_expand=False)

            def a2a():
                recv, _i, _w, handle, _e = buf.dispatch(x, **kw)
                return buf.combine(recv, handle=handle)[0]

            def sequential():
                return a2a() + shared(x)

            def overlapped():
                recv, _i, _w, handle, event = buf.dispatch(x, async_with_compute_stream=True, **kw)
                s = shared(x)
                event.current_stream_wait()
                return buf.combine(recv, handle=handle)[0] + s

            try:
                variants = (("a2a", a2a), ("shared", lambda: shared(x)), ("sequential", sequential),
                            ("overlapped", overlapped))
                fns = {name: _graph(fn, torch.device("cuda", 0)) for name, fn in variants}
                times = {name: [] for name in fns}
                for _ in range(args.reps):
                    for name, replay in fns.items():
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        replay()
                        torch.cuda.synchronize()
                        times[name].append((time.perf_counter() - t0) * 1e6)
            except Exception as e:  # noqa: BLE001 - one row's failure is reported, the rest still run
                print(f"| {T} | {n} | failed: {type(e).__name__}: {str(e)[:200]} |||||||", flush=True)
                continue
            t = {k: statistics.median(v) for k, v in times.items()}
            mid, lo, hi = _paired_median_ci(times["sequential"], times["overlapped"])
            print(f"| {T} | {n} | {t['a2a']:.1f} | {t['shared']:.1f} | {t['sequential']:.1f} | {t['overlapped']:.1f} "
                  f"| {mid:+.1f} [{lo:+.1f}, {hi:+.1f}] | {0.5 * min(t['shared'], t['a2a']):.1f} |", flush=True)
    buf.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
