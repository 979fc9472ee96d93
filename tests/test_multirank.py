"""dispatch → per-expert compute → combine on 1, 2 and 4 gloo ranks vs an independent dense MoE.

Every scenario runs on every rank with the SAME global inputs (shared seed);
each rank checks its own tokens against :mod:`dense_reference`, plus the
layout facts of spec §2/§3 for what it received. World size 1 runs in-process
(``group=None``); 2 and 4 run all scenarios in one spawn per world size.
"""

from __future__ import annotations

import traceback
from collections import defaultdict
from typing import List

import pytest
import torch

import dense_reference as ref
from _dist import assert_scenario_passed

H = 256
CAPACITY = 32  # buffer capacity; prefill uses M = CAPACITY
BF16 = torch.bfloat16


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _cumsum(xs: List[int]) -> List[int]:
    out, s = [], 0
    for v in xs:
        s += v
        out.append(s)
    return out


# ----------------------------------------------------------------------------- layout checks
def check_dst_slots(dst: torch.Tensor, idx: torch.Tensor, me: int, EL: int, M: int) -> None:
    """Spec §3 direct mode: at the highest lane per destination rank, my_rank·M + slot; else −1.
    The slots of the tokens going to one destination are a permutation of 0..count-1."""
    T, K = idx.shape
    assert dst.shape == (T, K) and dst.dtype == torch.int32, (dst.shape, dst.dtype)
    slots = defaultdict(list)
    for t, row in enumerate(idx.tolist()):
        last = ref.last_lane_of_rank(row, EL)
        for k, e in enumerate(row):
            v = int(dst[t, k])
            if e >= 0 and last[e // EL] == k:
                assert v >= 0 and v // M == me, f"dst_buffer_slot_idx[{t},{k}]={v}, expected {me}*{M}+slot"
                slots[e // EL].append(v - me * M)
            else:
                assert v == -1, f"dst_buffer_slot_idx[{t},{k}]={v}, expected -1 (not the last lane of its rank)"
    for d, s in slots.items():
        assert sorted(s) == list(range(len(s))), f"slots towards rank {d} are not a permutation: {s}"


def _check_rows_match_sources(recv_x, recv_sf, rows_idx, srcs, inputs):
    """recv_x[rows_idx[j]] (and scales) equal the sender's x[t] bitwise for srcs[j] = (src, t)."""
    if not srcs:
        return
    exp_x = torch.stack([inputs[s].x[t] for s, t in srcs])
    got_x = recv_x[torch.tensor(rows_idx, dtype=torch.int64)]
    assert torch.equal(_bytes(got_x), _bytes(exp_x)), "received x rows differ from the senders' rows"
    if inputs[0].x_scales is not None:
        exp_sf = torch.stack([inputs[s].x_scales[t] for s, t in srcs])
        got_sf = recv_sf[torch.tensor(rows_idx, dtype=torch.int64)]
        assert torch.equal(_bytes(got_sf), _bytes(exp_sf)), "received scales did not move with their tokens"


def check_decode_layout(r, inputs, me, R, E, M, A) -> int:
    """Spec §2/§3 decode-mode (no expand, no CPU sync) facts. Returns the real N."""
    EL = E // R
    inp = inputs[me]
    T, K = inp.topk_idx.shape
    rows, counts = ref.expected_received(inputs, me, EL, M)
    N = len(rows)
    h = r.handle
    assert r.recv_x.shape == (R * M, H) and r.recv_x.dtype == inp.x.dtype
    assert r.recv_topk_idx.shape == (R * M, K) and r.recv_topk_idx.dtype == torch.int64
    assert r.recv_topk_weights.shape == (R * M, K) and r.recv_topk_weights.dtype == torch.float32
    if inp.x_scales is None:
        assert r.recv_x_scales is None
    else:
        assert r.recv_x_scales.shape == (R * M, inp.x_scales.shape[1])
        assert r.recv_x_scales.dtype == torch.float32
    psum = h.psum_num_recv_tokens_per_scaleup_rank
    assert psum.dtype == torch.int32 and psum.tolist() == _cumsum(counts), (psum.tolist(), counts)
    meta = h.recv_src_metadata
    assert meta.shape == (R * M, K + 2) and meta.dtype == torch.int32
    # grouped by source rank, then ascending source token (deterministic order)
    assert meta[:N, 0].tolist() == [gid for _s, _t, gid in rows]
    exp_local_idx, exp_col1 = [], []
    for src, t, _gid in rows:
        row = inputs[src].topk_idx[t].tolist()
        local = [e >= 0 and e // EL == me for e in row]
        exp_col1.append(src * K + max(k for k in range(K) if local[k]))
        exp_local_idx.append([e - me * EL if loc else -1 for e, loc in zip(row, local)])
        for k in range(K):
            if local[k]:
                assert r.recv_topk_weights[len(exp_col1) - 1, k].item() == inputs[src].topk_weights[t, k].item()
    assert meta[:N, 1].tolist() == exp_col1, "recv_src_metadata col 1 must be src_rank*K + highest local lane"
    assert r.recv_topk_idx[:N].tolist() == exp_local_idx, "recv_topk_idx must hold local ids, -1 elsewhere"
    _check_rows_match_sources(r.recv_x, r.recv_x_scales, list(range(N)), [(s, t) for s, t, _ in rows], inputs)
    c = ref.local_expert_counts(inputs, me, EL)
    assert h.num_unaligned_recv_tokens_per_expert.tolist() == c
    assert h.psum_num_recv_tokens_per_expert.dtype == torch.int32
    assert h.psum_num_recv_tokens_per_expert.tolist() == _cumsum([ref.align_up(v, A) for v in c])
    assert h.num_expanded_tokens == ref.align_up(R * M * min(K, EL) + (A - 1) * EL, A)
    assert h.do_expand is False and h.num_experts == E and h.num_max_tokens_per_rank == M
    assert torch.equal(h.topk_idx, inp.topk_idx)
    check_dst_slots(h.dst_buffer_slot_idx, inp.topk_idx, me, EL, M)
    return N


def check_prefill_layout(res, inputs, me, R, E, M, A):
    """Spec §2/§3 prefill-mode (expand + CPU sync) facts. Returns (S_e list, c_e list)."""
    EL = E // R
    inp = inputs[me]
    T, K = inp.topk_idx.shape
    rows, counts = ref.expected_received(inputs, me, EL, M)
    c = ref.local_expert_counts(inputs, me, EL)
    aligned = [ref.align_up(v, A) for v in c]
    S = [a - b for a, b in zip(_cumsum(aligned), aligned)]
    X = sum(aligned)
    h = res.handle
    assert res.recv_x.shape == (X, H) and res.recv_x.dtype == inp.x.dtype
    assert res.recv_topk_weights.shape == (X,) and res.recv_topk_weights.dtype == torch.float32
    if inp.x_scales is None:
        assert res.recv_x_scales is None
    else:
        assert res.recv_x_scales.shape == (X, inp.x_scales.shape[1])
    n = res.num_recv_tokens_per_expert
    assert n.dtype == torch.int32 and n.tolist() == aligned, (n.tolist(), aligned)
    assert h.psum_num_recv_tokens_per_expert.tolist() == [s + v for s, v in zip(S, c)], "expand psum = S_e + c_e"
    assert h.num_unaligned_recv_tokens_per_expert.tolist() == c
    assert h.psum_num_recv_tokens_per_scaleup_rank.tolist() == _cumsum(counts)
    meta = h.recv_src_metadata
    assert meta.shape == (len(rows), K + 2) and meta.dtype == torch.int32
    gids = meta[:, 0].tolist()
    assert sorted(gids) == sorted(gid for _s, _t, gid in rows)
    owner = {}
    src_rows, srcs = [], []
    for i, gid in enumerate(gids):
        src, t = divmod(gid, M)
        row = inputs[src].topk_idx[t].tolist()
        local = [e >= 0 and e // EL == me for e in row]
        assert meta[i, 1].item() == src * K + max(k for k in range(K) if local[k])
        for k in range(K):
            s = meta[i, 2 + k].item()
            if not local[k]:
                assert s == -1, f"metadata[{i},{2 + k}] = {s} for a non-local lane"
                continue
            el = row[k] - me * EL
            assert S[el] <= s < S[el] + c[el], f"slot {s} of expert {el} outside [{S[el]}, {S[el] + c[el]})"
            assert s not in owner, f"slot {s} used twice"
            owner[s] = gid
            assert res.recv_topk_weights[s].item() == inputs[src].topk_weights[t, k].item()
            src_rows.append(s)
            srcs.append((src, t))
    assert len(owner) == sum(c)
    _check_rows_match_sources(res.recv_x, res.recv_x_scales, src_rows, srcs, inputs)
    for el in range(EL):
        in_expert = [owner[s] for s in range(S[el], S[el] + c[el])]
        assert in_expert == sorted(in_expert), f"expert {el}: rows not in (src_rank, token) order"
        pad = slice(S[el] + c[el], S[el] + aligned[el])
        assert not _bytes(res.recv_x[pad]).any(), f"expert {el}: padding rows of recv_x not zero"
        assert not res.recv_topk_weights[pad].any(), f"expert {el}: padding weights not zero"
        if res.recv_x_scales is not None:
            assert not res.recv_x_scales[pad].any(), f"expert {el}: padding scales not zero"
    assert h.do_expand is True and h.num_expanded_tokens == X
    check_dst_slots(h.dst_buffer_slot_idx, inp.topk_idx, me, EL, M)
    return S, c


# ----------------------------------------------------------------------------- expert compute
def decode_expert_rows(r, me, EL, experts, weighted):
    """out_row = Σ_{local lanes k} w[i,k]·expert(recv_x[i]) in fp32 → bf16, rows < psum[-1];
    padding rows are NaN (combine must never read them)."""
    n = int(r.handle.psum_num_recv_tokens_per_scaleup_rank[-1])
    rows, Hh = r.recv_x.shape
    K = r.recv_topk_idx.shape[1]
    sf = None if r.recv_x_scales is None else r.recv_x_scales[:n]
    xf = ref.dequant(r.recv_x[:n], sf)
    outs = torch.stack([experts(me * EL + e, xf) for e in range(EL)])  # [EL, n, H]
    idx, w = r.recv_topk_idx[:n], r.recv_topk_weights[:n]
    acc = torch.zeros(n, Hh)
    ar = torch.arange(n)
    for k in range(K):
        term = outs[idx[:, k].clamp(min=0), ar]
        if weighted:
            term = w[:, k, None] * term
        acc += torch.where((idx[:, k] >= 0)[:, None], term, 0.0)
    y = torch.full((rows, Hh), float("nan"), dtype=BF16)
    y[:n] = acc.to(BF16)
    return y


def prefill_expert_rows(res, me, EL, experts, weighted, S, c):
    """Rows grouped per local expert by num_recv_tokens_per_expert; row·weight; bf16.
    Padding rows are NaN (combine must never read them)."""
    X, Hh = res.recv_x.shape
    xf = ref.dequant(res.recv_x, res.recv_x_scales)
    y = torch.empty(X, Hh, dtype=BF16)
    start = 0
    for el, cnt in enumerate(res.num_recv_tokens_per_expert.tolist()):
        rows = slice(start, start + cnt)
        out = experts(me * EL + el, xf[rows])
        if weighted:
            out = out * res.recv_topk_weights[rows, None]
        y[rows] = out.to(BF16)
        start += cnt
    assert start == X
    for el in range(EL):
        y[S[el] + c[el] : start if el == EL - 1 else S[el + 1]] = float("nan")
    return y


# ----------------------------------------------------------------------------- one MoE scenario
class SoftChecks:
    """Collects check failures instead of raising at once, so that a rank whose check fails
    still takes part in every later collective of the scenario (ranks stay in step and a
    failure is reported without waiting for the collective timeout)."""

    def __init__(self):
        self.failures = []

    def __call__(self, what, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001
            self.failures.append(f"[{what}]\n{traceback.format_exc()}")
            return None

    def raise_if_any(self):
        if self.failures:
            raise AssertionError(f"{len(self.failures)} check(s) failed:\n" + "\n".join(self.failures))


def _compare(out, expected_fn, kind, mode, T):
    assert out.shape == (T, H) and out.dtype == BF16, (out.shape, out.dtype)
    exp = expected_fn()
    if kind == "matrix":  # vs the float64 dense MoE, bf16 tolerance
        torch.testing.assert_close(out.float(), exp.float(), rtol=2e-2, atol=2e-2)
    else:  # elementwise experts: spec §4's rounding emulated exactly
        assert torch.equal(out, exp), f"{mode} {kind}: not bitwise spec §4, max err {(out.float() - exp.float()).abs().max()}"


def run_moe(rank, world, *, seed, Ts, K, E, A=1, fp8=False, neg_frac=0.25, experts_pool=None,
            empty_rows=0, small_ints=False):
    import torch.distributed as dist

    import deepep_ops as D

    group = dist.group.WORLD if dist.is_initialized() else None
    R, me = world, rank
    EL = E // R
    buf = D.EPBuffer(D.ReferenceElasticBuffer(group, num_max_tokens_per_rank=CAPACITY, hidden=H, num_topk=K))
    inputs = ref.make_global_inputs(seed, Ts, H, K, E, fp8=fp8, neg_frac=neg_frac, experts=experts_pool,
                                    empty_rows=empty_rows, small_ints=small_ints)
    inp = inputs[me]
    T = inp.x.shape[0]
    M = _next_pow2(max(Ts))
    kinds = {k: ref.Experts(seed, E, H, k) for k in ("matrix", "diag", "identity")}
    check = SoftChecks()
    # expected per-expert counts and aligned starts (independent of the code under test)
    c = ref.local_expert_counts(inputs, me, EL)
    aligned = [ref.align_up(v, A) for v in c]
    S = [a - b for a, b in zip(_cumsum(aligned), aligned)]

    def check_combines(mode, result, expert_rows, *extra):
        """Each expert kind's rows through combine, against the dense MoE or spec §4's rounding."""
        for kind, ex in kinds.items():
            weighted = kind != "identity"
            rows = check(f"{mode} {kind} expert rows", expert_rows, result, me, EL, ex, weighted, *extra)
            if rows is None:
                rows = torch.zeros(result.recv_x.shape, dtype=BF16)
            out = D.combine(rows, result.handle, buf)
            expected = (lambda ex=ex: ref.dense_moe(inp, ex)) if kind == "matrix" else (
                lambda ex=ex, weighted=weighted: ref.spec_combine(inp, ex, EL, weighted, expand=mode == "prefill"))
            check(f"{mode} {kind} combine", _compare, out, expected, kind, mode, T)

    # ---------------- decode
    r = D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E, num_max_tokens_per_rank=M,
                   expert_alignment=A, x_scales=inp.x_scales)
    check("decode layout", check_decode_layout, r, inputs, me, R, E, M, A)
    check_combines("decode", r, decode_expert_rows)
    if not fp8:
        # spec §8: combine of the received rows themselves = x·(#distinct destination ranks), bitwise
        # (x·n is exact in fp32 and rounded once). Padding rows are NaN: combine must not read them.
        n = int(r.handle.psum_num_recv_tokens_per_scaleup_rank[-1])
        y = r.recv_x.clone()
        y[n:] = float("nan")
        out = D.combine(y, r.handle, buf)
        nranks = torch.stack([(ref.rank_of(inp.topk_idx, EL) == d).any(1) for d in range(R)], 1).sum(1)
        check("decode identity = x·#ranks", lambda: torch.testing.assert_close(
            out, (inp.x.float() * nranks[:, None]).to(BF16), rtol=0, atol=0))

    # ---------------- prefill
    res = D.dispatch_exact(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E,
                           num_max_tokens_per_rank=CAPACITY, expert_alignment=A, x_scales=inp.x_scales)
    check("prefill layout", check_prefill_layout, res, inputs, me, R, E, CAPACITY, A)
    check_combines("prefill", res, prefill_expert_rows, S, c)
    if small_ints and not fp8:
        # spec §8: combine of the expanded rows themselves = x·(#valid lanes), bitwise. Exactly
        # representable data, so spec §4's per-rank bf16 rounding cannot change the result.
        y = res.recv_x.clone()
        for el in range(EL):
            y[S[el] + c[el] : S[el] + aligned[el]] = float("nan")
        out = D.combine(y, res.handle, buf)
        nlanes = (inp.topk_idx >= 0).sum(1)
        check("prefill identity = x·#lanes", lambda: torch.testing.assert_close(
            out, (inp.x.float() * nlanes[:, None]).to(BF16), rtol=0, atol=0))
    check.raise_if_any()


def _ts(world, base):
    return [base[r % len(base)] + r for r in range(world)]


SCENARIOS = {
    # random routing with −1 slots and a row that routes nowhere
    "random": lambda rank, world: run_moe(rank, world, seed=11, Ts=_ts(world, [6, 9]), K=4, E=4 * world,
                                          neg_frac=0.25, empty_rows=1),
    # expert_alignment 4: padded groups in prefill, aligned psum in decode
    "align4": lambda rank, world: run_moe(rank, world, seed=12, Ts=_ts(world, [7, 5]), K=3, E=4 * world, A=4),
    # rank 1 (rank 0 at world size 1) has no tokens
    "zero_tokens": lambda rank, world: run_moe(
        rank, world, seed=13, Ts=[0 if r == min(1, world - 1) else 5 + r for r in range(world)], K=2, E=2 * world),
    # every expert of every token lives on rank 0
    "all_on_rank0": lambda rank, world: run_moe(rank, world, seed=14, Ts=_ts(world, [4, 6]), K=3, E=4 * world,
                                                experts_pool=range(4), neg_frac=0.1),
    # fp8 payload + float32 scales [T, ceil(H/128)]
    "fp8": lambda rank, world: run_moe(rank, world, seed=15, Ts=_ts(world, [5, 8]), K=4, E=4 * world, A=2,
                                       fp8=True, neg_frac=0.2),
    # one expert per rank, K = 1
    "k1": lambda rank, world: run_moe(rank, world, seed=16, Ts=_ts(world, [3, 8]), K=1, E=world, neg_frac=0.2),
    # exactly representable data: identity combine = x·#ranks (decode), x·#lanes (prefill), spec §8
    "identity_exact": lambda rank, world: run_moe(rank, world, seed=17, Ts=_ts(world, [8, 6]), K=4, E=max(4, 2 * world),
                                                  neg_frac=0.3, small_ints=True),
}
NAMES = tuple(SCENARIOS)


@pytest.mark.parametrize("name", NAMES)
def test_world1_in_process(name):
    SCENARIOS[name](0, 1)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", NAMES)
def test_multirank(world, name):
    assert_scenario_passed(__name__, NAMES, world, name)


# ----------------------------------------------------------------------------- the harness itself
def _rank1_fails(rank, world):
    import torch.distributed as dist

    t = torch.tensor([rank + 1])
    dist.all_reduce(t)  # the group works
    assert rank != 1, f"deliberate failure on rank {rank}, sum={int(t)}"
    return int(t)


def test_harness_reports_child_failures():
    """A failing rank's assertion and traceback reach pytest (so the spawned tests cannot pass vacuously)."""
    from _dist import DistributedError, run_distributed

    with pytest.raises(DistributedError) as info:
        run_distributed(_rank1_fails, 2)
    msg = str(info.value)
    assert "failed on 1/2 ranks" in msg and "--- rank 1 ---" in msg and "--- rank 0 ---" not in msg
    assert "deliberate failure on rank 1, sum=3" in msg and "Traceback" in msg


def _rank1_hangs(rank, world):
    import time

    import torch.distributed as dist

    if rank == 1:
        time.sleep(3600)  # a hang: uses no CPU
    dist.barrier()  # rank 0 waits here, also without CPU


def test_harness_reports_a_hang_with_stacks():
    """Ranks that all stop using CPU fail after the stall limit (not the collective timeout), with their stacks."""
    import time

    from _dist import DistributedError, run_distributed

    t0 = time.monotonic()
    with pytest.raises(DistributedError) as info:
        run_distributed(_rank1_hangs, 2, stall_s=3, gloo_timeout_s=600)
    msg = str(info.value)
    assert time.monotonic() - t0 < 300, "the hang was not caught before the collective timeout"
    assert "failed on 2/2 ranks" in msg and "hung: no CPU progress" in msg, msg
    assert "in _rank1_hangs" in msg, msg  # rank 1's stack, dumped before the kill


def test_progress_watch_tells_slow_from_hung():
    """Progress is CPU gained by any process tree since the last check: a group that keeps
    computing is never hung however long it takes; one that stops is, after stall_s; a
    process that exits (its CPU gone from /proc) costs the others nothing."""
    from _dist import ProgressWatch

    now, cpu = [0.0], {}
    watch = ProgressWatch(lambda: list(cpu), stall_s=10, clock=lambda: now[0], cpu_by_root=lambda pids: dict(cpu))

    def at(t, **trees):
        now[0] = t
        cpu.clear()
        cpu.update({int(k[1:]): v for k, v in trees.items()})
        return watch.check()

    assert at(0, p1=0.1, p2=0.1) is None
    for t in range(5, 300, 5):  # rank 1 computes slowly (0.05 core), rank 2 waits: 5 minutes, never hung
        assert at(t, p1=0.1 + 0.05 * t, p2=0.1) is None, t
    assert at(300, p2=0.1) is None  # rank 1 exited (its 15 CPU-s left /proc): not a step back
    assert at(305, p2=0.5) is None  # rank 2 goes on
    assert at(314, p2=0.5) is None  # idle for 9 s < 10
    why = at(316, p2=0.55)  # 11 s with 0.05 CPU-s: hung
    assert why is not None and why.startswith("hung: no CPU progress for 11 s"), why
    now[0] = 0.0  # a run that keeps computing past an explicit hard limit
    capped = ProgressWatch(lambda: [1], stall_s=10, hard_s=60, clock=lambda: now[0], cpu_by_root=lambda p: {1: now[0]})
    assert capped.check() is None
    now[0] = 61
    assert "hard limit" in capped.check()
