"""Compile guarantees of :class:`deepep_ops.moe.MoELayer` on the reference buffer.

``torch.compile(layer, fullgraph=True, dynamic=True)`` over 2 gloo ranks
(spawned processes), for every combination of

- backend: ``aot_eager``, ``inductor``;
- mode: ``decode_host`` (decode, bucket M = ``pow2_bucket(T, capacity)``
  computed on the host and passed in: the graph sees a SymInt),
  ``decode_graph`` (decode, ``num_max_tokens_per_rank=None``: the in-graph
  ``deepep_ops::token_bucket`` op, an unbacked SymInt; every rank holds the same T),
  ``prefill`` (``dispatch_exact``, always at the buffer capacity);
- cache: ``cold`` (no FX-graph or AOT-autograd cache entry of this graph in the
  rank's ``TORCHINDUCTOR_CACHE_DIR``, fresh for the spawn and shared by its phases,
  so C++ kernels another mode already built are reused; in-memory caches cleared,
  ``torch._dynamo.reset()``) and ``warm`` (the same cache dir after the cold run,
  in-memory caches cleared and ``torch._dynamo.reset()`` again: what a new
  process finds on disk), with the FX graph cache and the AOT autograd cache on.

each is its own test id for: no graph breaks, at most 2 compiled frames over the
sweep of T (one for the T=1 0/1 specialisation, one dynamic graph from T=2 on),
agreement with an independent dense MoE (``dense_reference.dense_moe_layer``, no
deepep_ops code; bf16-MoE tolerance), equality with the same layer run eagerly
(bf16 tolerance; the eager answer is itself checked against the dense one), and,
for Inductor, that the warm run actually hit the FX graph / AOT autograd caches.

The experts are the layer's own (``LocalExperts``) behind ``GarbageExperts``,
which overwrites every output the finalize step must ignore: NaN in the lanes
of real rows whose id is −1 (another rank's expert or an empty slot), 1e30 in
decode's padding rows (all lanes −1), NaN in prefill's alignment-padding rows.
A weight-and-reduce that does not mask −1 lanes, a combine that reads padding
rows, or a sign flip of the routing weights is off the dense answer (NaN
counts as out of tolerance).

All 12 phases run in one spawn of 2 ranks (results cached per pytest process,
so the cost shows up in ``--durations`` on the first test): the dense answers
are computed once and shared by every phase, the eager ones once per mode and
shared by both backends, and the processes start once.

Sweeps (T = tokens per rank, both ranks the same T, capacity 1024): every phase
calls the compiled layer at increasing T starting at 1. Frame counts, shapes and
finiteness are checked at every swept T; values against the dense and eager
answers at every T of ``SAMPLE_TS``.

- Default tier (``tests/tiers.py``): every phase sweeps ``SAMPLE_TS`` =
  ``tiers.sample_tokens(1024)``: every power of two with its ±1 neighbours
  (where a bucket changes) and a seeded random sample. The warm aot_eager
  phases (see below) run only in the exhaustive tier (``slow``).
- Exhaustive tier (``--exhaustive``): the full 1..1024 sweep for the
  combinations in ``FULL_SWEEP_COMBOS``: every Inductor phase (cold and warm: a
  warm FX/AOT cache is where a guard on the bucket arithmetic has been seen to
  pin sizes and recompile on every T, and CPU Inductor can add size guards of
  its own) and the cold aot_eager phases. The warm aot_eager phases (no compile
  cache is involved there: they repeat the cold ones after
  ``torch._dynamo.reset()``) and the value checks use ``SAMPLE_TS``: all T in
  1..64, every 7th T up to 1024, and every power of two with its ±1 neighbours.

``test_bucket_values_bounded`` (world size 1, in the pytest process) records the
M every dispatch receives from the in-graph bucket over T up to 8192;
``test_prefill_rank_receiving_no_tokens`` compiles prefill for a rank that
receives no rows.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Dict, List, Tuple

import pytest
import torch

import dense_reference as ref
import _dist
import tiers
from _dist import run_distributed

# I (the expert MLP width) is small: the experts' matmuls are most of a step's cost,
# and no guard or shape in the graph depends on I.
E, H, I, K, CAP = 8, 256, 8, 2, 1024
WORLD = 2
BACKENDS = ("aot_eager", "inductor")
MODES = ("decode_host", "decode_graph", "prefill")
CACHES = ("cold", "warm")
MAX_FRAMES = 2

FULL_TS = tuple(range(1, CAP + 1))
if tiers.exhaustive():
    SAMPLE_TS = tuple(
        sorted(
            set(range(1, 65))
            | set(range(1, CAP + 1, 7))
            | {2**k + d for k in range(11) for d in (-1, 0, 1) if 1 <= 2**k + d <= CAP}
        )
    )
    #: (backend, mode, cache) swept over every T in 1..1024; the rest sweep SAMPLE_TS.
    FULL_SWEEP_COMBOS = frozenset(
        [("inductor", m, c) for m in MODES for c in CACHES] + [("aot_eager", m, "cold") for m in MODES]
    )
else:
    SAMPLE_TS = tiers.sample_tokens(CAP, salt="test_compile")
    FULL_SWEEP_COMBOS = frozenset()

# Tolerances, elementwise: |y - ref| <= ATOL + RTOL * mag, where mag = Σ_k w_k·|expert_k(x)|
# (from ``dense_moe_layer``), the scale of every intermediate the layer rounds to bf16:
# each expert lane, each rank's weighted partial sum, and the combined sum (3 roundings
# of ≤ 2^-9 relative each). Dense is exact up to fp32 noise: 3·2^-9 ≈ 0.6 %. Compiled vs
# eager: both round at the same places, fp32 summation order may flip each rounding:
# 6·2^-9 ≈ 1.2 %. A real bug (lost lane, wrong weight, wrong row) is off by O(mag).
EAGER_ATOL, EAGER_RTOL = 1e-3, 1.6e-2
DENSE_ATOL, DENSE_RTOL = 1e-3, 1e-2
#: Tokens whose K-th and (K+1)-th router probabilities are closer than this may
#: legitimately route differently under another fp32 summation order: skipped.
NEAR_TIE = 1e-5
#: What GarbageExperts writes where finalize must not look.
LANE_GARBAGE, PADDING_ROW_GARBAGE = float("nan"), 1e30


def caches_for(backend: str) -> Tuple[str, ...]:
    """The cache phases a backend runs: aot_eager's warm phase (no compile cache
    involved: the cold phase again after ``torch._dynamo.reset()``) only in the
    exhaustive tier."""
    return CACHES if backend == "inductor" or tiers.exhaustive() else ("cold",)


def sweep_for(backend: str, mode: str, cache: str) -> Tuple[int, ...]:
    return FULL_TS if (backend, mode, cache) in FULL_SWEEP_COMBOS else SAMPLE_TS


def make_tokens(T: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1_000_003 * rank + T)
    return torch.randn(T, H, generator=g).bfloat16()


def _violations(y: torch.Tensor, want: torch.Tensor, mag: torch.Tensor, keep: torch.Tensor, atol: float, rtol: float):
    """(max |y - want| over kept tokens, number of elements out of tolerance; NaN/inf are out)."""
    d = (y.double() - want.double()).abs()[keep]
    if d.numel() == 0:
        return 0.0, 0
    bad = ~(d <= atol + rtol * mag[keep])  # not (d > tol): NaN compares False
    return d.max().item() if bool(torch.isfinite(d).all()) else float("nan"), int(bad.sum())


class GarbageExperts(torch.nn.Module):
    """``inner``'s outputs where finalize reads them, garbage everywhere else.

    Decode: lanes with id −1 in real rows get ``LANE_GARBAGE`` (NaN), padding
    rows (every lane −1) ``PADDING_ROW_GARBAGE``. Prefill (one lane per row):
    the alignment-padding rows (their received x is all zero) get NaN.
    """

    def __init__(self, inner: torch.nn.Module, decode: bool) -> None:
        super().__init__()
        self.inner, self.decode = inner, decode

    def forward(self, x, x_scale, topk_ids, rank_expert_offset):
        # Literals, not the module-level floats: Dynamo lifts global Python floats
        # to symbolic inputs under dynamic=True (a second compile).
        lane_garbage, padding_row_garbage = float("nan"), 1e30  # = LANE_GARBAGE, PADDING_ROW_GARBAGE
        y = self.inner(x, x_scale, topk_ids, rank_expert_offset)
        if self.decode:
            routed = topk_ids >= 0
            real_row = routed.any(dim=1, keepdim=True)
            garbage = torch.where(real_row, lane_garbage, padding_row_garbage)
            return torch.where(routed.unsqueeze(-1), y, garbage.unsqueeze(-1).to(y.dtype))
        padding_row = (x == 0).all(dim=1)
        return torch.where(padding_row.view(-1, 1, 1), lane_garbage, y.view(x.shape[0], -1, y.shape[-1])).to(y.dtype)


def make_layer(buf, W, mode: str):
    from deepep_ops.moe import MoELayer
    from deepep_ops.prepare_finalize import DeepEPPrepareFinalize

    decode = mode != "prefill"
    pf = DeepEPPrepareFinalize(buf, W.router.shape[1], K, decode=decode, expert_alignment=1 if decode else 4)
    layer = MoELayer(W, pf)
    layer.experts = GarbageExperts(layer.experts, decode)
    return layer


# ---------------------------------------------------------------------------- child side
class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _run_all(rank: int, world: int) -> Dict[str, Dict[str, Dict[str, dict]]]:
    """In each rank: every (mode, backend, cache) phase; ``{backend: {mode: {cache: result}}}``."""
    import torch.distributed as dist
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config

    import deepep_ops as D
    from deepep_ops.moe import make_moe_weights

    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    torch._logging.set_logs(recompiles=True)
    recompiles = _ListHandler()
    logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(recompiles)

    W = make_moe_weights(E, H, I, seed=1)
    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K))

    t0 = time.perf_counter()
    dense = {}
    for T in SAMPLE_TS:
        y, mag, near_tie = ref.dense_moe_layer(make_tokens(T, rank), *W, K, near_tie=NEAR_TIE)
        dense[T] = (y, mag, ~near_tie)
    t_dense = time.perf_counter() - t0

    results: Dict[str, Dict[str, Dict[str, dict]]] = {b: {} for b in BACKENDS}
    # One Inductor cache dir per rank for all its phases: a cold phase finds no FX-graph
    # or AOT-autograd entry of its own graph (checked: no cache hit), while C++ kernels
    # that another mode's graph already built (same source) are reused, as on any
    # developer's machine, instead of being compiled again (~8 CPU-s a phase).
    cache_dir = tempfile.mkdtemp(prefix=f"deepep_compile_r{rank}_")
    try:
        _run_modes(rank, world, buf, W, dense, t_dense, cache_dir, results, recompiles)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return results


def _run_modes(rank, world, buf, W, dense, t_dense, cache_dir, results, recompiles) -> None:
    import torch.distributed as dist
    import torch._dynamo

    broken = False
    eager_decode = None
    for mode in MODES:
        layer = make_layer(buf, W, mode)
        t0 = time.perf_counter()
        if mode == "decode_graph":
            # Eagerly the in-graph bucket is the same int as decode_host's host bucket
            # (every rank holds T), so the eager answers are the same: spot-check, reuse.
            eager = eager_decode
            for T in (1, 33, 1024):
                torch.testing.assert_close(layer(make_tokens(T, rank), None), eager[T], atol=0, rtol=0)
        else:
            eager = {T: layer(make_tokens(T, rank), _bucket(mode, T)) for T in SAMPLE_TS}
            if mode == "decode_host":
                eager_decode = eager
        timings = {"t_dense_s": t_dense, "t_eager_s": time.perf_counter() - t0}
        for backend in BACKENDS:
            results[backend][mode] = {}
            if broken:
                continue
            try:
                for cache in caches_for(backend):
                    res = _phase_in_rank(rank, layer, backend, mode, cache, cache_dir, dense, eager, recompiles)
                    res.update(timings)
                    results[backend][mode][cache] = res
                    ok = [None] * world
                    dist.all_gather_object(ok, res["error"] is None)
                    if not all(ok):
                        res["error"] = res["error"] or f"another rank failed in the {cache} phase"
                        broken = True  # the ranks may be out of step: stop here
                        break
            finally:
                torch._dynamo.reset()


def _bucket(mode: str, T: int):
    import deepep_ops as D

    # Every rank holds T tokens, so the DP-global maximum is T.
    return D.pow2_bucket(T, CAP) if mode == "decode_host" else None


def _phase_in_rank(rank, layer, backend, mode, cache, cache_dir, dense, eager, recompiles) -> dict:
    import torch.distributed as dist
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters
    from torch._inductor.utils import clear_caches

    res: dict = {"error": None}
    try:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        clear_caches()  # in-memory caches: the warm phase must read the disk cache
        torch._dynamo.reset()
        counters.clear()
        recompiles.messages.clear()
        dist.barrier()
        cnt = CompileCounterWithBackend(backend)
        compiled = torch.compile(layer, backend=cnt, fullgraph=True, dynamic=True)
        sweep = sweep_for(backend, mode, cache)
        frame_ts: List[int] = []
        stats = {"eager_err": 0.0, "eager_bad": [], "dense_err": 0.0, "dense_bad": [], "eager_vs_dense_bad": [],
                 "nonfinite_ts": [], "bad_shape_ts": [], "checked_tokens": 0, "skipped_tokens": 0}
        t_first = None
        t_start, c_start = time.perf_counter(), _dist.tree_cpu_seconds([os.getpid()]) or 0.0
        for T in sweep:
            before = cnt.frame_count
            y = compiled(make_tokens(T, rank), _bucket(mode, T))
            if cnt.frame_count != before:
                frame_ts.append(T)
            if T == 2:
                t_first = time.perf_counter() - t_start
            if tuple(y.shape) != (T, H) or y.dtype != torch.bfloat16:
                stats["bad_shape_ts"].append((T, tuple(y.shape), str(y.dtype)))
            elif not bool(torch.isfinite(y).all()):
                stats["nonfinite_ts"].append(T)
            if T in dense:
                want, mag, keep = dense[T]
                err, bad = _violations(y, want, mag, keep, DENSE_ATOL, DENSE_RTOL)
                stats["dense_err"] = max(stats["dense_err"], err) if err == err else err
                if bad:
                    stats["dense_bad"].append((T, bad, err))
                err, bad = _violations(y, eager[T], mag, keep, EAGER_ATOL, EAGER_RTOL)
                stats["eager_err"] = max(stats["eager_err"], err) if err == err else err
                if bad:
                    stats["eager_bad"].append((T, bad, err))
                _, bad = _violations(eager[T], want, mag, keep, DENSE_ATOL, DENSE_RTOL)
                if bad:
                    stats["eager_vs_dense_bad"].append((T, bad))
                stats["checked_tokens"] += int(keep.sum())
                stats["skipped_tokens"] += int((~keep).sum())
        res.update(stats)
        res.update(
            frame_count=cnt.frame_count,
            frame_ts=frame_ts,
            num_steps=len(sweep),
            full_sweep=sweep == FULL_TS,
            graph_breaks=dict(counters["graph_break"]),
            inductor={k: v for k, v in counters["inductor"].items() if "cache" in k},
            aot_autograd={k: v for k, v in counters["aot_autograd"].items() if "cache" in k},
            recompile_reasons=list(recompiles.messages),
            t_compile_s=t_first,
            t_total_s=time.perf_counter() - t_start,
            cpu_total_s=(_dist.tree_cpu_seconds([os.getpid()]) or 0.0) - c_start,
        )
    except BaseException:  # noqa: BLE001 - reported per phase
        import traceback

        res["error"] = traceback.format_exc()
    return res


# ---------------------------------------------------------------------------- pytest side
def start_early() -> None:
    """Called by tests/conftest.py once collected: the spawn runs in the background."""
    _dist.start_early("test_compile", _spawn)


def _spawned():
    """Per-rank results of every phase, or the spawn's error text."""
    return _dist.result_once("test_compile", _spawn)


def _spawn():
    try:
        return run_distributed(
            # A rank may wait in a collective while its peer compiles (minutes on a loaded machine).
            _run_all, WORLD, gloo_timeout_s=900,
        )
    except AssertionError as e:
        return str(e)


def _phase(backend: str, mode: str, cache: str) -> List[dict]:
    per_rank = _spawned()
    if isinstance(per_rank, str):
        pytest.fail(f"spawned ranks failed:\n{per_rank}")
    out = []
    for rank, results in enumerate(per_rank):
        phases = results[backend][mode]
        if cache not in phases:
            pytest.fail(f"rank {rank}: {backend}/{mode}/{cache} did not run (an earlier phase failed); "
                        f"phases of this combination: {phases}")
        res = phases[cache]
        if res["error"] is not None:
            pytest.fail(f"rank {rank}, {backend}/{mode}/{cache} raised:\n{res['error']}")
        out.append(res)
    return out


COMBOS = [
    pytest.param(b, m, c, id=f"{b}-{m}-{c}", marks=() if c in caches_for(b) else pytest.mark.slow)
    for b in BACKENDS for m in MODES for c in CACHES
]


@pytest.mark.parametrize("backend,mode,cache", COMBOS)
def test_no_graph_breaks(backend, mode, cache):
    # fullgraph=True already raises on a break (reported above as the phase's error).
    for rank, res in enumerate(_phase(backend, mode, cache)):
        assert res["graph_breaks"] == {}, f"rank {rank}: graph breaks {res['graph_breaks']}"


@pytest.mark.parametrize("backend,mode,cache", COMBOS)
def test_no_recompiles(backend, mode, cache):
    for rank, res in enumerate(_phase(backend, mode, cache)):
        print(  # shown with pytest -rP
            f"SUMMARY {backend}/{mode}/{cache} rank {rank}: {res['frame_count']} frames (new at T={res['frame_ts']}) "
            f"over {res['num_steps']} T ({'full 1..1024' if res['full_sweep'] else 'sample'}, {tiers.describe()}); "
            f"first 2 calls {res['t_compile_s']:.1f}s, phase {res['t_total_s']:.1f}s ({res['cpu_total_s']:.1f} CPU-s), dense answers "
            f"{res['t_dense_s']:.1f}s, eager answers {res['t_eager_s']:.1f}s; max err eager {res['eager_err']:.4f} "
            f"dense {res['dense_err']:.4f}; caches {res['inductor']} {res['aot_autograd']}"
        )
        assert res["num_steps"] == len(sweep_for(backend, mode, cache))
        assert 1 <= res["frame_count"] <= MAX_FRAMES, (
            f"rank {rank}: {res['frame_count']} frames over {res['num_steps']} values of T, "
            f"new frames at T={res['frame_ts']}; recompile reasons:\n" + "\n".join(res["recompile_reasons"])
        )


@pytest.mark.parametrize("backend,mode,cache", COMBOS)
def test_matches_eager(backend, mode, cache):
    """Compiled == eager (bf16 tolerance), and the eager answer itself == the dense reference."""
    for rank, res in enumerate(_phase(backend, mode, cache)):
        assert res["checked_tokens"] > 0
        assert res["skipped_tokens"] <= 1e-3 * res["checked_tokens"], res["skipped_tokens"]
        assert not res["eager_vs_dense_bad"], (
            f"rank {rank}: the eager layer != dense reference at (T, #elements) {res['eager_vs_dense_bad'][:10]}"
        )
        assert not res["eager_bad"], (
            f"rank {rank}: compiled != eager at (T, #elements, max err) {res['eager_bad'][:10]} "
            f"(atol={EAGER_ATOL}, rtol={EAGER_RTOL})"
        )


@pytest.mark.parametrize("backend,mode,cache", COMBOS)
def test_matches_dense(backend, mode, cache):
    for rank, res in enumerate(_phase(backend, mode, cache)):
        assert res["checked_tokens"] > 0
        assert not res["bad_shape_ts"], f"rank {rank}: wrong output shape/dtype at {res['bad_shape_ts'][:10]}"
        assert not res["nonfinite_ts"], (
            f"rank {rank}: non-finite outputs (expert garbage leaked) at T={res['nonfinite_ts'][:20]}"
        )
        assert not res["dense_bad"], (
            f"rank {rank}: compiled != dense reference at (T, #elements, max err) {res['dense_bad'][:10]} "
            f"(atol={DENSE_ATOL}, rtol={DENSE_RTOL})"
        )


@pytest.mark.parametrize("mode", MODES)
def test_inductor_warm_cache_hit(mode):
    cold = _phase("inductor", mode, "cold")
    warm = _phase("inductor", mode, "warm")
    for rank, (c, w) in enumerate(zip(cold, warm)):
        assert c["inductor"].get("fxgraph_cache_hit", 0) == 0, f"rank {rank}: cold run hit the cache: {c['inductor']}"
        assert c["inductor"].get("fxgraph_cache_miss", 0) >= 1, f"rank {rank}: cold run: {c['inductor']}"
        hits = w["inductor"].get("fxgraph_cache_hit", 0) + w["aot_autograd"].get("autograd_cache_hit", 0)
        assert hits > 0, f"rank {rank}: warm run did not hit the caches: {w['inductor']} {w['aot_autograd']}"
        # Every frame compiled in the warm run came from the cache, none was rebuilt.
        assert w["inductor"].get("fxgraph_cache_miss", 0) == 0, f"rank {rank}: warm run missed: {w['inductor']}"


# ---------------------------------------------------------------------------- bucket values
def test_bucket_values_bounded():
    """Decode with the in-graph bucket hands the buffer at most 14 distinct M over T = 1..8192.

    World size 1 (group=None), capacity 8192, compiled with aot_eager (which M the
    buffer receives is decided by the ``token_bucket`` op at run time, not by
    the backend). T: every power of two and its ±1 neighbours, then random T
    drawn log-uniformly from [1, 8192] (every bucket gets hit; uniform draws would
    mostly land in the top bucket, at ~0.7 s per step): 100 in the exhaustive
    tier, 12 by default (seeded: ``tests/tiers.py``).
    """
    import deepep_ops as D
    from deepep_ops.moe import MoELayer, make_moe_weights
    from deepep_ops.prepare_finalize import DeepEPPrepareFinalize
    from torch._dynamo.testing import CompileCounterWithBackend

    cap = 8192

    class RecordingBuffer(D.ReferenceElasticBuffer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen_m: List[int] = []

        def dispatch(self, *args, **kwargs):
            self.seen_m.append(kwargs["num_max_tokens_per_rank"])
            return super().dispatch(*args, **kwargs)

    rec = RecordingBuffer(None, num_max_tokens_per_rank=cap, hidden=H, num_topk=K)
    # Two experts: the experts do not matter here, and each costs ~0.25 s per step at M=8192.
    W = make_moe_weights(2, H, 16, seed=2)
    layer = MoELayer(W, DeepEPPrepareFinalize(D.EPOpsBuffer(rec), 2, K, decode=True))
    layer.experts = GarbageExperts(layer.experts, decode=True)
    g = torch.Generator().manual_seed(0)
    ts = sorted({2**k + d for k in range(14) for d in (-1, 0, 1) if 1 <= 2**k + d <= cap})
    if tiers.exhaustive():
        ts += torch.exp2(torch.rand(100, generator=g, dtype=torch.float64) * 13).round().long().tolist()
    else:
        r = torch.Generator().manual_seed(tiers.sample_seed())
        ts += torch.exp2(torch.rand(12, generator=r, dtype=torch.float64) * 13).round().long().tolist()

    torch._dynamo.reset()
    try:
        cnt = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(layer, backend=cnt, fullgraph=True, dynamic=True)
        for T in ts:
            x = torch.randn(T, H, generator=g).bfloat16()
            y = compiled(x)
            assert y.shape == (T, H)
            want, mag, near_tie = ref.dense_moe_layer(x, *W, K, near_tie=NEAR_TIE)  # K = E = 2: no ties
            _, bad = _violations(y, want, mag, ~near_tie, DENSE_ATOL, DENSE_RTOL)
            assert bad == 0, f"T={T}: {bad} elements off the dense reference"
    finally:
        torch._dynamo.reset()

    assert len(rec.seen_m) == len(ts)
    pow2 = {2**k for k in range(14)}  # 1 .. 8192
    seen = set(rec.seen_m)
    assert seen <= pow2, f"non-power-of-two M: {sorted(seen - pow2)}"
    assert len(seen) <= 14, sorted(seen)
    for T, m in zip(ts, rec.seen_m):
        assert m >= T and (m == 1 or m < 2 * T), f"T={T} got M={m}, not the smallest power of two >= T"
    assert cnt.frame_count <= MAX_FRAMES, cnt.frame_count


# ---------------------------------------------------------------------------- empty prefill rank
def test_prefill_rank_receiving_no_tokens():
    """Prefill on a rank that receives no rows (X = 0) works compiled, without a recompile.

    Regression: ``weight_and_reduce`` used ``view(rows, k, -1)``, which raises for
    rows == 0 and put a ``Ne(u1, 0)`` runtime assert into the prefill graph.
    World size 1, aot_eager; topk ids all −1 gives X = 0.
    """
    import deepep_ops as D
    from deepep_ops.prepare_finalize import DeepEPPrepareFinalize
    from torch._dynamo.testing import CompileCounterWithBackend

    pf = DeepEPPrepareFinalize(
        D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=64, hidden=H, num_topk=K)),
        E, K, decode=False, expert_alignment=4,
    )

    def step(a1, topk_weights, topk_ids):
        p = pf.prepare(a1, topk_weights, topk_ids)
        # Every expert doubles; alignment-padding rows (all zero) get NaN, which combine must not read.
        padding_row = (p.expert_x == 0).all(dim=1, keepdim=True)
        y = torch.where(padding_row, float("nan"), p.expert_x * 2).unsqueeze(1)
        out = torch.empty_like(a1)
        pf.finalize(out, y, p.topk_weights, p.topk_ids, p.handle)
        return out

    def expected(a1, topk_weights, topk_ids):  # independent: Σ_k w_k · 2·x over routed lanes
        w = torch.where(topk_ids >= 0, topk_weights, 0.0).sum(dim=1, keepdim=True)
        return w * 2 * a1.float()

    g = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    try:
        cnt = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(step, backend=cnt, fullgraph=True, dynamic=True)
        for T, routed in ((3, True), (5, False), (4, True), (6, False)):
            a1 = torch.randn(T, H, generator=g).bfloat16()
            w = torch.rand(T, K, generator=g)
            ids = torch.randint(0, E, (T, K), generator=g) if routed else torch.full((T, K), -1)
            ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 1) % E, ids[:, 1]) if routed else -1
            out = compiled(a1, w, ids)
            torch.testing.assert_close(out, step(a1, w, ids), atol=0, rtol=0)
            # bf16: each lane rounded, the sum rounded once more.
            torch.testing.assert_close(out.float(), expected(a1, w, ids), atol=1e-2, rtol=1.6e-2)
            if not routed:
                assert torch.equal(out, torch.zeros_like(out))
        assert cnt.frame_count == 1, cnt.frame_count
    finally:
        torch._dynamo.reset()
