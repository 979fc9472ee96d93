"""Prefill dispatch + combine on one GPU: raw ``ElasticBuffer`` vs the eager ops, and
the prefill prepare/finalize eager vs compiled.

Side by side in one process, on the same inputs, for each T (the buffer's
capacity is the largest T; prefill dispatches at the capacity):

- ``raw``: ``ElasticBuffer.dispatch`` (``do_cpu_sync``, ``do_expand``,
  ``do_zero_padding``, DeepEP's default handle copy) + ``combine`` of the
  received rows, the floor;
- ``ops``: ``deepep_ops.dispatch_exact`` + ``deepep_ops.combine`` (the eager
  fast path, with the value checks prefill runs by default);
- ``ops, torch-form checks``: the same with the value checks in their torch
  form (about ten kernels, two host reads) instead of the one Triton kernel
  CUDA ids get (``deepep_ops.triton_validation``);
- ``ops, no value checks``: the ops with the host checks of ``topk_idx``
  values off (on by default in prefill: ``deepep_ops.validation``);
- ``pf eager`` / ``pf compiled``: :class:`deepep_ops.DeepEPPrepareFinalize`
  (``decode=False``) around an expert stand-in that scales each received row
  by its expert's factor (one [X, 1, H] bf16 output per row, as a grouped GEMM
  leaves it), eagerly and under ``torch.compile(fullgraph=True, dynamic=True)``
  (X is data-dependent: an unbacked size in the graph).

Two tables: median wall µs of synchronized pairs (the variants taking turns
call by call), and host µs to issue a pair unsynchronized (20 back to back).

    python benchmarks/bench_prefill.py --backend deepep --sizes 512,4096
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_deepep import _host_issue_us, _make_buffer, _time_interleaved_us  # noqa: E402


@contextlib.contextmanager
def _replaced(module: object, name: str, value: object):
    """``module.name`` set to ``value`` inside the block."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def _torch_form_checks():
    """The value checks without their Triton verdict (``validation._values_ok_on_device``)."""
    import deepep_ops.validation as validation

    return _replaced(validation, "_values_ok_on_device", lambda topk_idx, num_experts: False)


def _no_value_checks():
    """The host checks of ``topk_idx`` values off (``validation.value_checks_enabled``)."""
    import deepep_ops.validation as validation

    return _replaced(validation, "value_checks_enabled", lambda device, exact: False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("deepep", "reference"), default="deepep")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--sizes", default="512,4096", help="tokens per call (the largest is the capacity)")
    parser.add_argument("--profile", action="store_true", help="cProfile 50 ops pairs at the largest T")
    args = parser.parse_args(argv)
    args.fp8 = False

    import deepep_ops

    torch.cuda.set_device(0)
    sizes = [int(s) for s in args.sizes.split(",")]
    H, K, E = args.hidden, args.topk, args.experts
    capacity = max(sizes)
    native, cleanup = _make_buffer(args.backend, capacity, args)
    buffer = deepep_ops.EPOpsBuffer(native)
    from deepep_ops.prepare_finalize import DeepEPPrepareFinalize

    pf = DeepEPPrepareFinalize(buffer, E, K, decode=False, device="cuda")
    scale = torch.linspace(0.5, 1.5, E, device="cuda")

    def pf_step(x, w, ids):
        p = pf.prepare(x, w, ids)
        y = (p.expert_x.float() * scale[p.topk_ids]).to(torch.bfloat16).unsqueeze(1)  # [X, 1, H]
        out = torch.empty_like(x)
        pf.finalize(out, y, p.topk_weights, p.topk_ids, p.handle)
        return out

    pf_compiled = torch.compile(pf_step, fullgraph=True, dynamic=True)
    rows = []
    try:
        for T in sizes:
            g = torch.Generator().manual_seed(T)
            x = torch.randn(T, H, generator=g).to("cuda", torch.bfloat16)
            ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).cuda()
            w = torch.rand(T, K, generator=g).cuda()

            def raw():
                recv_x, _, _, handle, _ = native.dispatch(
                    x, topk_idx=ids, topk_weights=w, num_experts=E, num_max_tokens_per_rank=capacity,
                    expert_alignment=1, do_cpu_sync=True, do_expand=True, do_zero_padding=True,
                )
                return native.combine(recv_x, handle=handle)[0]

            def ops():
                d = deepep_ops.dispatch_exact(x, ids, w, buffer, num_experts=E, num_max_tokens_per_rank=capacity)
                return deepep_ops.combine(d.recv_x, d.handle, buffer)

            def ops_torch_checks():
                with _torch_form_checks():
                    return ops()

            def ops_unchecked():
                with _no_value_checks():
                    return ops()

            torch.testing.assert_close(ops(), raw(), atol=0, rtol=1e-2)
            assert torch.equal(ops(), ops_unchecked()), f"T={T}: the value checks changed the result"
            torch.testing.assert_close(pf_compiled(x, w, ids), pf_step(x, w, ids), atol=2e-2, rtol=2e-2)
            fns = {"raw": raw, "ops": ops, "ops, torch-form checks": ops_torch_checks,
                   "ops, no value checks": ops_unchecked,
                   "pf eager": lambda: pf_step(x, w, ids), "pf compiled": lambda: pf_compiled(x, w, ids)}
            rows.append((T, _time_interleaved_us(fns, args.reps), _host_issue_us(fns)))
            if args.profile and T == capacity:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.enable()
                for _ in range(50):
                    ops()
                torch.cuda.synchronize()
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    finally:
        cleanup()

    de = ""
    if args.backend == "deepep":
        import deep_ep

        de = f", deep_ep {getattr(deep_ep, '__version__', '?')}"
    print(f"\nprefill dispatch_exact+combine, {args.backend} backend, {buffer.num_ranks} rank on "
          f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}{de}, H={H} K={K} E={E}, capacity {capacity}")
    names = list(rows[0][1])
    for title, col in (("median wall µs of synchronized pairs", 1), ("host µs to issue one pair, unsynchronized", 2)):
        print(f"\n{title}")
        print("| T | " + " | ".join(names) + " | ops − raw | checks: Triton | checks: torch form "
              "| pf compiled / eager |")
        print("|---|" + "---|" * (len(names) + 4))
        for row in rows:
            t = row[col]
            print(f"| {row[0]} | " + " | ".join(f"{t[n]:.1f}" for n in names)
                  + f" | {t['ops'] - t['raw']:+.1f} | {t['ops'] - t['ops, no value checks']:+.1f} "
                  f"| {t['ops, torch-form checks'] - t['ops, no value checks']:+.1f} "
                  f"| {t['pf compiled'] / t['pf eager']:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
