"""Host-side cost of the op layer: ``deepep_ops`` dispatch + combine over a null buffer.

The null buffer has ``deep_ep.ElasticBuffer``'s API (the keywords, the 5-tuple
returns, an ``EPHandle`` with its 16-argument constructor) but returns
preallocated outputs and launches nothing, so what is timed is pure Python +
dispatcher work. Side by side, in one process, on the same inputs:

- ``raw``: ``NullElasticBuffer.dispatch`` + ``combine`` called directly, the way
  a serving engine calls DeepEP (the floor);
- ``backend``: :class:`~deepep_ops.backends.deep_ep.DeepEPBackend` (the EPHandle
  rebuild, the tuple packing);
- ``ops``: ``deepep_ops.dispatch`` + ``deepep_ops.combine`` (validation, the
  dispatcher, the kernels' packing).

The differences are the per-pair overhead the op layer adds on top of DeepEP.
``--profile`` prints the cProfile of the ``ops`` loop. CPU tensors by default;
``--device cuda`` uses CUDA tensors (still no kernels) to include device-side
checks' host cost.

    python benchmarks/bench_op_overhead.py [--device cuda] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import statistics
import sys
import time

import torch

import deepep_ops
from deepep_ops.backends.deep_ep import DeepEPBackend


def backend_dispatch(backend, x, ids, w, num_experts, num_max_tokens_per_rank):
    """A decode dispatch straight through the backend module (no op layer), in this
    tree's backend API; trees before the op codec took keywords (old-tree timings)."""
    try:
        from deepep_ops.handle import DispatchArgs
    except ImportError:
        return backend.dispatch(x, None, ids, w, num_experts=num_experts,
                                num_max_tokens_per_rank=num_max_tokens_per_rank, expert_alignment=1, expand=False)
    return backend.dispatch(DispatchArgs(x, None, ids, w, num_experts, num_max_tokens_per_rank, 1, True))


class NullEPHandle:
    """``deep_ep.buffers.elastic.EPHandle``'s constructor, storing its fields."""

    __slots__ = (
        "do_expand", "num_experts", "expert_alignment", "num_max_tokens_per_rank", "num_sms", "topk_idx",
        "num_recv_tokens", "num_expanded_tokens", "num_recv_tokens_per_expert_list",
        "psum_num_recv_tokens_per_scaleup_rank", "psum_num_recv_tokens_per_expert",
        "num_unaligned_recv_tokens_per_expert", "recv_src_metadata", "dst_buffer_slot_idx",
        "token_metadata_at_forward", "channel_linked_list",
    )

    def __init__(self, *args) -> None:
        for name, value in zip(self.__slots__, args):
            setattr(self, name, value)


class NullElasticBuffer:
    """``ElasticBuffer``'s dispatch/combine API returning preallocated decode outputs.

    Outputs are allocated once per (T, M) on first use; every call returns them.
    """

    def __init__(self, num_max_tokens_per_rank: int, hidden: int, num_topk: int, device: torch.device) -> None:
        self.num_ranks = 1
        self.rank_idx = 0
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.hidden = hidden
        self.num_topk = num_topk
        self.device = device
        self._outs: dict = {}

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int) -> int:
        return 24

    def _decode_outputs(self, topk_idx: torch.Tensor, num_experts: int, m: int):
        key = (topk_idx.shape[0], m, num_experts)
        if key not in self._outs:
            R, K, H, dev = self.num_ranks, self.num_topk, self.hidden, self.device
            EL = num_experts // R
            rows = R * m
            psum_expert = torch.zeros(EL + 1, dtype=torch.int32, device=dev)[1:]
            handle_tensors = (
                torch.full((R,), topk_idx.shape[0], dtype=torch.int32, device=dev),
                psum_expert,
                torch.zeros(EL, dtype=torch.int32, device=dev),
                torch.zeros(rows, K + 2, dtype=torch.int32, device=dev),
                torch.zeros(topk_idx.shape[0], K, dtype=torch.int32, device=dev),
            )
            self._outs[key] = (
                torch.zeros(rows, H, dtype=torch.bfloat16, device=dev),
                torch.zeros(rows, K, dtype=torch.int64, device=dev),
                torch.zeros(rows, K, dtype=torch.float32, device=dev),
                handle_tensors,
                torch.zeros(topk_idx.shape[0], H, dtype=torch.bfloat16, device=dev),
            )
        return self._outs[key]

    def dispatch(self, x, *, topk_idx, topk_weights, num_experts, num_max_tokens_per_rank, expert_alignment=1,
                 do_handle_copy=True, do_cpu_sync=False, do_expand=False, do_zero_padding=False, **_):
        recv_x, recv_idx, recv_w, ht, _ = self._decode_outputs(topk_idx, num_experts, num_max_tokens_per_rank)
        handle = NullEPHandle(
            do_expand, num_experts, expert_alignment, num_max_tokens_per_rank,
            self.get_theoretical_num_sms(num_experts, topk_idx.shape[1]), topk_idx, recv_x.shape[0], 0, [],
            *ht, None, None,
        )
        return recv_x, recv_idx, recv_w, handle, None

    def combine(self, x, handle, **_):
        out = self._decode_outputs(handle.topk_idx, handle.num_experts, handle.num_max_tokens_per_rank)[4]
        return out, None, None


def _time_interleaved(variants: dict, reps: int, inner: int = 20) -> dict:
    """Median and min µs per call of each variant; the variants take turns in every
    repetition, so load from other processes falls on all of them alike."""
    for setup, fn in variants.values():
        with setup():
            for _ in range(inner * 5):
                fn()
    times = {name: [] for name in variants}
    for _ in range(reps):
        for name, (setup, fn) in variants.items():
            with setup():
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times[name].append((time.perf_counter() - t0) / inner * 1e6)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


@contextlib.contextmanager
def _through_dispatcher():
    """The wrappers' eager fast path off: every call goes through torch.ops."""
    import deepep_ops.api as api

    # The gate's name in this tree and in older ones (bench_deepep.py runs on both).
    for gate, off in (("_eager_mode_is_plain", lambda: False), ("_plain_eager", lambda *_: False)):
        if hasattr(api, gate):
            break
    else:  # a tree without the fast path: always the dispatcher
        yield
        return
    saved = getattr(api, gate)
    setattr(api, gate, off)
    try:
        yield
    finally:
        setattr(api, gate, saved)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--sizes", default="1,8,64,512")
    parser.add_argument("--profile", action="store_true", help="cProfile the ops loop at the largest T")
    parser.add_argument("--value-checks", action="store_true",
                        help="keep the host reads of topk_idx values that CPU tensors get; by default they are "
                        "off, as for GPU decode (validation.value_checks_enabled)")
    args = parser.parse_args(argv)
    if not args.value_checks:
        import deepep_ops.validation as validation

        validation.value_checks_enabled = lambda device, exact: False
    device = torch.device(args.device)
    sizes = [int(s) for s in args.sizes.split(",")]
    H, K, E = args.hidden, args.topk, args.experts
    null = NullElasticBuffer(max(sizes), H, K, device)
    backend = DeepEPBackend(null, NullEPHandle, torch.int64)
    # Check mode (deepep_ops.agreement) off, as on GPU by default: the steady-state hot path.
    buffer = deepep_ops.EPOpsBuffer(backend, check=False)
    # Check mode on (deepep_ops.agreement; the CPU default, opt-in on GPU): at R = 1 no
    # exchange, so this column is the per-call checks alone (handle values read on the host).
    checked = deepep_ops.EPOpsBuffer(backend, check=True)

    rows = []
    for T in sizes:
        m = deepep_ops.pow2_bucket(T, null.num_max_tokens_per_rank)
        g = torch.Generator().manual_seed(T)
        x = torch.randn(T, H, generator=g).to(device, torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(device)
        w = torch.rand(T, K, generator=g).to(device)
        y = torch.zeros(m, H, dtype=torch.bfloat16, device=device)

        def raw():
            _, _, _, handle, _ = null.dispatch(
                x, topk_idx=ids, topk_weights=w, num_experts=E, num_max_tokens_per_rank=m,
                expert_alignment=1, do_handle_copy=False, do_cpu_sync=False, do_expand=False,
                do_zero_padding=False,
            )
            return null.combine(y, handle=handle)[0]

        def via_backend():
            out = backend_dispatch(backend, x, ids, w, E, m)
            handle = deepep_ops.DispatchHandle(ids, *out.handle_tensors, E, m, 1, True, 0)
            return backend.combine(y, handle)

        def ops(buffer=buffer):
            d = deepep_ops.dispatch(x, ids, w, buffer, num_experts=E, num_max_tokens_per_rank=m)
            return deepep_ops.combine(y, d.handle, buffer)

        def ops_checked():
            return ops(checked)

        plain = contextlib.nullcontext
        times = _time_interleaved({
            "raw": (plain, raw), "backend": (plain, via_backend), "ops": (plain, ops),
            "ops via torch.ops": (_through_dispatcher, ops), "ops, check mode": (plain, ops_checked),
        }, args.reps)
        rows.append((T, m, times))
        if args.profile and T == sizes[-1]:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(2000):
                ops()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)

    print(f"\nop-layer host overhead, null DeepEP-API buffer on {device}, torch {torch.__version__}, "
          f"H={H} K={K} E={E}; µs per dispatch + combine pair")
    names = list(rows[0][2])
    print("| T | M | " + " | ".join(names) + " | ops − raw | ops via torch.ops − raw | check mode − ops |")
    print("|---|---|" + "---|" * (len(names) + 3))
    for T, m, t in rows:
        cells = [f"{t[n][0]:.1f} ({t[n][1]:.1f})" for n in names]
        print(f"| {T} | {m} | " + " | ".join(cells) + f" | +{t['ops'][0] - t['raw'][0]:.1f} "
              f"| +{t['ops via torch.ops'][0] - t['raw'][0]:.1f} | +{t['ops, check mode'][0] - t['ops'][0]:.1f} |")
    print("cells: median (min) µs; differences of medians")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
