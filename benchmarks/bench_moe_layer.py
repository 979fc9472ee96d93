"""A realistic MoE layer over the deepep_ops ops: eager vs compiled (vs overlapped), side by side.

The layer: router (an [H, E] projection, softmax top-k) → prepare (dispatch) →
the routed experts as a grouped GEMM (a SiLU-gated MLP H → I → H per local
expert: ``torch._grouped_mm`` on Hopper GPUs, a loop over the local experts
elsewhere) → finalize (weight-and-reduce, combine) → plus a shared expert (a
gated MLP H → Is → H on the local tokens, DeepSeek / Qwen-MoE style).

Modes (``--mode``):

- ``decode``: decode layout (M = pow2_bucket(T), R·M received rows), forward
  only, T from ``--sizes``; on a GPU each variant is also captured in a CUDA
  graph and replayed ("graph" columns).
- ``prefill``: prefill layout (exact rows, CPU sync), forward only.
- ``train``: forward + backward of the layer (``--layout`` decode or prefill),
  the loss a mean square of the output; gradients reach x, the router and
  every expert weight.

Variants, the same weights and inputs, taking turns call by call:

- ``eager``: the layer as written, sequential (shared expert after combine);
- ``compiled``: ``torch.compile(fullgraph=True, dynamic=True)`` of the same;
- ``overlapped`` (where the installed deepep_ops has the async ops; not in
  ``train``: they have no gradient): the shared expert runs between dispatch's
  start and wait, compiled;
- ``overlapped N SMs`` (``--overlap-sms N[,N...]``): the overlapped layer on an
  ``EPOpsBuffer(num_sms=N)`` over the same DeepEP buffer. DeepEP's own choice at
  R = 1 is every SM of the GPU, which leaves the shared expert's kernels little
  room beside dispatch's; fewer SMs for communication leave it some;
- ``shared`` and ``a2a``: the shared expert alone, and router + dispatch +
  combine alone (compiled): what overlap can hide is min(shared, a2a); the
  table prints ``saved`` = compiled − overlapped (each overlapped variant)
  beside half of it.

On a GPU: ``--backend deepep`` (real DeepEP v2, world size 1 over NCCL) or
``reference``. On CPU: the reference buffer over ``--world-size`` gloo ranks,
in check mode unless ``--check off`` (CPU tensors' default: every call also
exchanges its metadata, an extra gloo round that no overlap can hide; a GPU
runs with it off).

    python benchmarks/bench_moe_layer.py --backend deepep --mode train --layout prefill --sizes 512,4096
    python benchmarks/bench_moe_layer.py --device cpu --world-size 2 --mode decode --sizes 1,8,64 --check off
    python benchmarks/bench_moe_layer.py --backend deepep --mode decode --sizes 64,512 --overlap-sms 16,32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

BF16 = torch.bfloat16


# ----------------------------------------------------------------------------- the layer
def gated_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """[n, H] → [n, H]: SiLU(x·Wg) · (x·Wu) · Wd, bf16 in and out."""
    gate, up = (x @ w_gate_up).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ w_down


def grouped_experts(x: torch.Tensor, offs: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                    grouped_mm: bool) -> torch.Tensor:
    """[n, H] rows grouped by local expert (group e ends at ``offs[e]``, int32) → [n, H].

    Rows past ``offs[-1]`` come out zero on the loop path and unspecified on the
    grouped-GEMM path; callers never read them."""
    if grouped_mm:
        h = torch._grouped_mm(x, w_gate_up, offs=offs)
        gate, up = h.chunk(2, dim=-1)
        return torch._grouped_mm((torch.nn.functional.silu(gate) * up).to(BF16), w_down, offs=offs)
    out = torch.zeros_like(x)
    rows = torch.arange(x.shape[0], device=x.device)
    start = torch.zeros((), dtype=offs.dtype, device=x.device)
    for e in range(w_gate_up.shape[0]):
        mine = ((rows >= start) & (rows < offs[e])).unsqueeze(1)
        out = torch.where(mine, gated_mlp(x, w_gate_up[e], w_down[e]), out)
        start = offs[e]
    return out


class MoELayer(torch.nn.Module):
    """Router → prepare → grouped experts → finalize, plus a shared expert.

    ``forward(x [T, H] bf16, m)``: ``m`` is decode's bucket M (a host int) or None.
    """

    def __init__(self, pf, hidden: int, inter: int, shared_inter: int, grouped_mm: bool, seed: int = 0,
                 device="cpu", overlap: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        E, EL = pf.num_experts, pf.num_local_experts

        def p(*shape, fan_in):
            return torch.nn.Parameter((torch.randn(*shape, generator=g) / fan_in**0.5).to(device, BF16))

        self.pf, self.grouped_mm, self.overlap = pf, grouped_mm, overlap
        self.router = p(hidden, E, fan_in=hidden)
        # This rank's experts (every rank draws all E and keeps its own: the same model on every rank).
        w_gu = (torch.randn(E, hidden, 2 * inter, generator=g) / hidden**0.5)
        w_d = (torch.randn(E, inter, hidden, generator=g) / inter**0.5)
        first = pf.buffer.rank * EL
        self.w_gate_up = torch.nn.Parameter(w_gu[first:first + EL].to(device, BF16))
        self.w_down = torch.nn.Parameter(w_d[first:first + EL].to(device, BF16))
        self.shared_gate_up = p(hidden, 2 * shared_inter, fan_in=hidden)
        self.shared_down = p(shared_inter, hidden, fan_in=shared_inter)

    def _experts(self, prepared) -> torch.Tensor:
        """[rows, k, H] bf16 expert outputs, one per (row, lane); lanes of other ranks unspecified."""
        pf, x, ids = self.pf, prepared.expert_x, prepared.topk_ids
        rows, k = ids.shape
        local = ids - pf.rank_expert_offset  # [rows, k], in [0, EL) where routed here
        if not pf.decode:  # rows already grouped by expert, one lane each
            offs = torch.cumsum(prepared.expert_num_tokens, 0).to(torch.int32)
            return grouped_experts(x, offs, self.w_gate_up, self.w_down, self.grouped_mm).unsqueeze(1)
        # Decode: group the (row, lane) pairs by local expert; others sort last.
        EL = pf.num_local_experts
        key = torch.where(ids >= 0, local, EL).reshape(-1)
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(EL + 1, dtype=torch.int64, device=x.device).scatter_add_(0, key, torch.ones_like(key))[:EL]
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xs = x.repeat_interleave(k, dim=0)[order]
        ys = grouped_experts(xs, offs, self.w_gate_up, self.w_down, self.grouped_mm)
        out = torch.empty_like(ys).index_copy_(0, order, ys)
        return out.view(rows, k, -1)

    def shared_only(self, x: torch.Tensor, m) -> torch.Tensor:
        """The shared expert alone (a component timing)."""
        return gated_mlp(x, self.shared_gate_up, self.shared_down)

    def communication_only(self, x: torch.Tensor, m) -> torch.Tensor:
        """Router, dispatch and combine alone, the received rows sent back as they came
        (a component timing: the all-to-all the shared expert can hide)."""
        K = self.pf.num_topk
        probs = torch.softmax((x @ self.router).float(), dim=-1)
        w, ids = torch.topk(probs, K, dim=-1)
        p = self.pf.prepare(x, w / w.sum(dim=-1, keepdim=True), ids, num_max_tokens_per_rank=m)
        out = torch.empty_like(x)
        self.pf.finalize(out, p.expert_x.unsqueeze(1).expand(-1, p.topk_ids.shape[1], -1), p.topk_weights,
                         p.topk_ids, p.handle)
        return out

    def forward(self, x: torch.Tensor, m) -> torch.Tensor:
        K = self.pf.num_topk
        probs = torch.softmax((x @ self.router).float(), dim=-1)
        w, ids = torch.topk(probs, K, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        if self.overlap:
            pending = self.pf.prepare_start(x, w, ids, num_max_tokens_per_rank=m)
            shared = gated_mlp(x, self.shared_gate_up, self.shared_down)
            # overlap=: the shared expert must be done before the wait, so the
            # compiler keeps it between start and wait.
            p = self.pf.prepare_wait(pending, overlap=[shared])
        else:
            p = self.pf.prepare(x, w, ids, num_max_tokens_per_rank=m)
        y = self._experts(p)
        out = torch.empty_like(x)
        self.pf.finalize(out, y, p.topk_weights, p.topk_ids, p.handle)
        if not self.overlap:
            shared = gated_mlp(x, self.shared_gate_up, self.shared_down)
        return out + shared


# ----------------------------------------------------------------------------- timing
def _time_interleaved(fns: dict, sync, reps: int, warmup: int = 3) -> dict:
    """Seconds of each call of each of ``fns`` (``reps`` samples each), taking turns call by call."""
    times = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def _paired_median_ci(a: list, b: list) -> tuple:
    """Median of the paired differences a[i] - b[i] (calls made back to back) and its
    95 % confidence interval from the order statistics (sign test), in seconds."""
    d = sorted(x - y for x, y in zip(a, b))
    n = len(d)
    k = max(0, int((n - 1.96 * n**0.5) / 2))
    return statistics.median(d), d[k], d[n - 1 - k]


def _graph(fn, device):
    """``fn`` captured once in a CUDA graph; calling the result replays it."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


#: --check: the EPOpsBuffer's ``check`` (deepep_ops.agreement).
_CHECK_MODES = {"default": None, "on": True, "off": False}


def _rank_main(rank: int, world: int, args, init_method: str, out_q) -> None:
    on_gpu = args.device == "cuda"
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    try:
        out_q.put((rank, _run(rank, world, args, init_method, device)))
    except BaseException:  # noqa: BLE001
        import traceback

        out_q.put((rank, traceback.format_exc()))


def _run(rank: int, world: int, args, init_method: str, device: torch.device) -> tuple:
    """``(rows, whether check mode was on)``; rows: ``(T, {variant: step seconds})`` per T."""
    import deepep_ops
    from deepep_ops.prepare_finalize import DeepEPPrepareFinalize

    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=600), **kw)
    sizes = [int(s) for s in args.sizes.split(",")]
    capacity = max(sizes)
    H, K, E = args.hidden, args.topk, args.experts
    if args.backend == "deepep":
        from deepep_ops.backends.deep_ep import new_buffer

        # v2.1's ElasticBuffer or v2.5's EPBuffer, whichever is installed.
        native = new_buffer(dist.group.WORLD, num_max_tokens_per_rank=capacity, hidden=H, num_topk=K,
                            explicitly_destroy=True)
    else:
        native = deepep_ops.ReferenceElasticBuffer(dist.group.WORLD if world > 1 else None,
                                                   num_max_tokens_per_rank=capacity, hidden=H, num_topk=K)
    buffer = deepep_ops.EPOpsBuffer(native, check=_CHECK_MODES[args.check])
    decode = (args.mode == "decode") or (args.mode == "train" and args.layout == "decode")
    pf = DeepEPPrepareFinalize(buffer, E, K, decode=decode, device=device)
    grouped_mm = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    make = lambda overlap: MoELayer(pf, H, args.intermediate, args.shared_intermediate, grouped_mm,  # noqa: E731
                                    device=device, overlap=overlap)
    layer = make(False)
    has_async = hasattr(pf, "prepare_start")
    layers = {"eager": layer, "compiled": torch.compile(layer, fullgraph=True, dynamic=True)}
    train = args.mode == "train"
    if has_async and not args.no_overlap and not train:  # the async ops have no gradient
        ov = make(True)
        ov.load_state_dict(layer.state_dict())
        layers["overlapped"] = torch.compile(ov, fullgraph=True, dynamic=True)
        for n in args.overlap_sms:
            # Another EPOpsBuffer over the same DeepEP buffer: only the SM count differs.
            pinned = deepep_ops.EPOpsBuffer(native, check=_CHECK_MODES[args.check], num_sms=n)
            ov_n = MoELayer(DeepEPPrepareFinalize(pinned, E, K, decode=decode, device=device), H,
                            args.intermediate, args.shared_intermediate, grouped_mm, device=device, overlap=True)
            ov_n.load_state_dict(layer.state_dict())
            layers[f"overlapped {n} SMs"] = torch.compile(ov_n, fullgraph=True, dynamic=True)
        # What overlap can save: min(shared expert, dispatch + combine), each compiled alone.
        layers["shared"] = torch.compile(layer.shared_only, fullgraph=True, dynamic=True)
        layers["a2a"] = torch.compile(layer.communication_only, fullgraph=True, dynamic=True)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows = []
    started = time.perf_counter()
    for T in sizes:
        g = torch.Generator().manual_seed(1000 + T + rank)
        x = torch.randn(T, H, generator=g).to(device, BF16)
        m = deepep_ops.pow2_bucket(T, capacity) if decode else None

        def step(fn=None):
            if not train:
                with torch.no_grad():
                    return fn(x, m)
            xg = x.detach().requires_grad_()
            out = fn(xg, m)
            out.float().pow(2).mean().backward()
            return out

        fns = {name: (lambda fn=fn: step(fn)) for name, fn in layers.items()}
        ref = fns["eager"]().float()
        for name, fn in fns.items():
            if name in ("shared", "a2a"):
                fn()
                continue
            err = (fn().float() - ref).abs().max().item()
            assert err <= 0.05 * ref.abs().max().item() + 0.05, f"T={T} {name}: differs from eager by {err}"
        if device.type == "cuda" and not train and decode:
            for name in list(fns):
                fns[f"{name} graph"] = _graph(fns[name], device)
        dist.barrier()
        rows.append((T, _time_interleaved(fns, sync, args.reps)))
        if rank == 0:
            # Progress, so that a run cut short by a time box still shows what it measured.
            medians = ", ".join(f"{name} {statistics.median(ts) * 1e3:.3f}" for name, ts in rows[-1][1].items())
            print(f"[{time.perf_counter() - started:.0f} s] T={T} median ms: {medians}", flush=True)
    if args.backend == "deepep":
        native.destroy()
    dist.destroy_process_group()
    return rows, buffer.agreement.check_mode(device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("deepep", "reference"), default="reference")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--mode", choices=("decode", "prefill", "train"), default="decode")
    parser.add_argument("--layout", choices=("decode", "prefill"), default="prefill", help="--mode train's layout")
    parser.add_argument("--hidden", type=int, default=None, help="default: 7168 on a GPU, 512 on CPU")
    parser.add_argument("--intermediate", type=int, default=None, help="routed expert width (default 2048 / 128)")
    parser.add_argument("--shared-intermediate", type=int, default=None, help="shared expert width (2048 / 256)")
    parser.add_argument("--experts", type=int, default=None, help="default: 64 on a GPU, 4 per rank on CPU")
    parser.add_argument("--topk", type=int, default=None, help="default: 8 on a GPU, 2 on CPU")
    parser.add_argument("--sizes", default=None, help="tokens per rank (default 1,8,64,512 decode, 4096 prefill)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--no-overlap", action="store_true", help="leave out the overlapped variant")
    parser.add_argument("--check", choices=tuple(_CHECK_MODES), default="default",
                        help="cross-rank check mode (deepep_ops.agreement): the buffer's default (on for CPU "
                             "tensors unless DEEPEP_OPS_CHECK=0, off on a GPU), or on / off; off is the steady "
                             "state a GPU runs in")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: compute threads per rank (default: the cores shared out); fewer leave cores to "
                             "gloo's communication threads")
    parser.add_argument("--overlap-sms", default="",
                        help="comma-separated SM counts: for each N, also the overlapped layer with DeepEP's "
                             "dispatch and combine on N SMs (EPOpsBuffer(num_sms=N))")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    try:
        args.overlap_sms = [int(n) for n in args.overlap_sms.split(",") if n]
    except ValueError:
        parser.error(f"--overlap-sms must be comma-separated ints, got {args.overlap_sms!r}")
    if any(n < 1 for n in args.overlap_sms):
        parser.error(f"--overlap-sms must be >= 1 each, got {args.overlap_sms}")
    args.hidden = args.hidden or (7168 if gpu else 512)
    args.intermediate = args.intermediate or (2048 if gpu else 128)
    args.shared_intermediate = args.shared_intermediate or (2048 if gpu else 256)
    args.experts = args.experts or (64 if gpu else 4 * args.world_size)
    args.topk = args.topk or (8 if gpu else 2)
    args.sizes = args.sizes or ("4096" if args.mode == "prefill" else "512,4096" if args.mode == "train"
                                else "1,8,64,512")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if gpu and args.world_size != 1:
        parser.error("--device cuda runs one rank (the device machines lend one GPU)")

    import torch.multiprocessing as mp

    init = "file://" + os.path.join(tempfile.mkdtemp(), "store")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, args.world_size, args, init, q)) for r in range(args.world_size)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=3000) for _ in procs)
    for p in procs:
        p.join()
    errors = {r: v for r, v in results.items() if isinstance(v, str)}
    if errors:
        for r, tb in sorted(errors.items()):
            print(f"--- rank {r} ---\n{tb}")
        sys.exit(1)
    rows, checked = results[0]
    where = (torch.cuda.get_device_name(0) if gpu else
             f"CPU ({os.cpu_count()} cores), {args.world_size} gloo ranks"
             + (f" with {args.threads} compute threads each" if args.threads else ""))
    layout = args.layout if args.mode == "train" else args.mode
    print(f"\nMoE layer, {args.mode} ({layout} layout), {args.backend} backend on {where}, torch {torch.__version__}, "
          f"H={args.hidden} I={args.intermediate} shared I={args.shared_intermediate} E={args.experts} "
          f"K={args.topk}, check mode {'on' if checked else 'off'}; median ms of {args.reps} synchronized steps "
          "(rank 0), variants taking turns")
    names = list(rows[0][1])
    overlapped = [n for n in names if n.startswith("overlapped") and not n.endswith(" graph")]
    ratios = [n for n in ["compiled", *overlapped, "compiled graph", *(f"{o} graph" for o in overlapped)]
              if n in names]
    # The overlap target: overlapped <= compiled - 0.5 * min(shared, a2a), per column kind.
    suffixes = [s for s in ("", " graph") if f"overlapped{s}" in names]
    saved = [(o, s) for s in suffixes for o in overlapped]
    head = ([f"{n} / eager" for n in ratios]
            + [f"saved{'' if o == 'overlapped' else ' (' + o[11:] + ')'}{s} (ms) [95 % CI]" for o, s in saved]
            + [f"0.5 min(shared, a2a){s} (ms)" for s in suffixes])
    print("| T | " + " | ".join(names) + " | " + " | ".join(head) + " |")
    print("|---|" + "---|" * (len(names) + len(head)))
    for T, samples in rows:
        t = {n: statistics.median(ts) for n, ts in samples.items()}
        base = {n: t["eager graph" if n.endswith("graph") else "eager"] for n in ratios}
        cells = [f"{t[n] / base[n]:.2f}" for n in ratios]
        for o, s in saved:
            mid, lo, hi = _paired_median_ci(samples[f"compiled{s}"], samples[f"{o}{s}"])
            cells.append(f"{mid * 1e3:.3f} [{lo * 1e3:.3f}, {hi * 1e3:.3f}]")
        cells += [f"{0.5 * min(t[f'shared{s}'], t[f'a2a{s}']) * 1e3:.3f}" for s in suffixes]
        print(f"| {T} | " + " | ".join(f"{t[n] * 1e3:.3f}" for n in names) + " | " + " | ".join(cells) + " |")
    if saved:
        print("saved = compiled - overlapped, the paired median over steps taken back to back [95 % CI]; shared and "
              "a2a: the shared expert and router + dispatch + combine, each compiled alone")


if __name__ == "__main__":
    main()
