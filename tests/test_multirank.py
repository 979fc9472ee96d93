"""dispatch → per-expert compute → combine on 1, 2 and 4 gloo ranks vs an independent dense MoE.

Every scenario runs on every rank with the SAME global inputs (shared seed);
each rank checks its own tokens against :mod:`dense_reference`, plus the
layout facts of docs/deepep_contract.md §2/§3 for what it received. World size 1 runs in-process
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
    """Contract §3 direct mode: at the highest lane per destination rank, my_rank·M + slot; else −1.
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


def check_decode_layout(r, inputs, me, R, E, M, A, hybrid=False) -> int:
    """Contract §2/§3 decode-mode (no expand, no CPU sync) facts. Returns the real N.
    ``hybrid``: only those hybrid mode keeps (the psum, column 1 and the slot index
    differ: :func:`check_hybrid_destination`, :func:`check_hybrid_forwarder`)."""
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
    assert psum.dtype == torch.int32 and psum[-1] == N
    if not hybrid:
        assert psum.tolist() == _cumsum(counts), (psum.tolist(), counts)
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
    if not hybrid:
        assert meta[:N, 1].tolist() == exp_col1, "recv_src_metadata col 1 must be src_rank*K + highest local lane"
    assert r.recv_topk_idx[:N].tolist() == exp_local_idx, "recv_topk_idx must hold local ids, -1 elsewhere"
    _check_rows_match_sources(r.recv_x, r.recv_x_scales, list(range(N)), [(s, t) for s, t, _ in rows], inputs)
    c = ref.local_expert_counts(inputs, me, EL)
    assert h.num_unaligned_recv_tokens_per_expert.tolist() == c
    assert h.psum_num_recv_tokens_per_expert.dtype == torch.int32
    assert h.psum_num_recv_tokens_per_expert.tolist() == _cumsum([ref.align_up(v, A) for v in c])
    assert h.num_expanded_tokens == ref.align_up(R * M * min(K, EL) + (A - 1) * EL, A)
    assert h.decode is True and h.num_experts == E and h.num_max_tokens_per_rank == M
    assert torch.equal(h.topk_idx, inp.topk_idx)
    if not hybrid:
        check_dst_slots(h.dst_buffer_slot_idx, inp.topk_idx, me, EL, M)
        assert h.token_metadata_at_forward is None and h.channel_linked_list is None
    return N


def check_prefill_layout(res, inputs, me, R, E, M, A, hybrid=False):
    """Contract §2/§3 prefill-mode (expand + CPU sync) facts. Returns (S_e list, c_e list)."""
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
    if not hybrid:
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
        kmax = max(k for k in range(K) if local[k])
        assert meta[i, 1].item() % K == kmax
        if not hybrid:
            assert meta[i, 1].item() == src * K + kmax
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
    assert h.decode is False and h.num_expanded_tokens == X
    if not hybrid:
        check_dst_slots(h.dst_buffer_slot_idx, inp.topk_idx, me, EL, M)
    return S, c


# ----------------------------------------------------------------------------- hybrid mode (contract §9)
#: A forwarder takes at most 6 scale-out slots of one source node per visit (DeepEP's
#: kNumSlotsPerForwardChunk, hybrid_dispatch.cuh).
FORWARD_CHUNK = 6


def _nodes(row, E, S):
    return {e // (E // S) for e in row if e >= 0}


def expected_forwarding(inputs, me, S, U, C, E):
    """What rank ``me`` forwards (DeepEP's hybrid dispatch, independent of the code under test):
    {channel c: [(j, so_slot, src, t, chunk_end), ...] in forward order}.

    Forwarder (d, u) = rank me, d = me // U, u = me % U, handles in channel c the tokens t ≡ c
    (mod C) of the ranks src = j·U + u that have an expert in node d. Its scale-out slot is the
    token's rank among them in its source's channel-c queue; sources are visited cyclically
    starting at (c % S + 1) % S, up to 6 slots per visit, so the order sorts by (visit round
    = slot // 6, (j − start) mod S, slot).
    """
    d, u = divmod(me, U)
    out = {}
    for c in range(C):
        start = (c % S + 1) % S
        entries = []
        for j in range(S):
            src = j * U + u
            queue = [t for t, row in enumerate(inputs[src].topk_idx.tolist()) if t % C == c and d in _nodes(row, E, S)]
            for slot, t in enumerate(queue):
                end = slot % FORWARD_CHUNK == FORWARD_CHUNK - 1 or slot == len(queue) - 1
                entries.append(((slot // FORWARD_CHUNK, (j - start) % S, slot), (j, slot, src, t, end)))
        out[c] = [e for _key, e in sorted(entries)]
    return out


def check_hybrid_forwarder(h, inputs, me, S, U, C, E, M):
    """The forwarder's tensors of rank ``me``: token_metadata_at_forward and dst_buffer_slot_idx.
    Returns {(gid, v): scale-up slot} (what this forwarder told destination (d, v))."""
    R = S * U
    EL = E // R
    K = inputs[0].topk_idx.shape[1]
    mtpc = -(-M // C)
    L = S * mtpc + 1
    d = me // U
    meta, dst = h.token_metadata_at_forward, h.dst_buffer_slot_idx
    assert meta.shape == (C, L, 2 + 2 * K) and meta.dtype == torch.int32, (meta.shape, meta.dtype)
    assert dst.shape == (C, S, mtpc, K) and dst.dtype == torch.int32, (dst.shape, dst.dtype)
    seen_dst = torch.zeros(C, S, mtpc, dtype=torch.bool)
    told = {}
    slots_per_v = defaultdict(list)
    for c, entries in expected_forwarding(inputs, me, S, U, C, E).items():
        n_rows = len(entries)
        assert n_rows < L
        assert meta[c, n_rows, 0] == -1, f"channel {c}: no terminator after {n_rows} forwarded tokens"
        # Cells DeepEP leaves unwritten hold -1 in the reference (its documented model).
        assert bool((meta[c, n_rows + 1 :] == -1).all()) and bool((meta[c, n_rows, 1:] == -1).all())
        last_slot = {}
        for n, (j, slot, src, t, end) in enumerate(entries):
            row = inputs[src].topk_idx[t].tolist()
            got = meta[c, n].tolist()
            assert got[0] == src * M + t, f"channel {c} row {n}: token {got[0]}, expected {src * M + t} (order)"
            assert got[1] == int(end), f"channel {c} row {n}: chunk-end flag {got[1]}"
            dest = [(e - d * (E // S)) // EL if e >= 0 and e // (E // S) == d else -1 for e in row]
            assert got[2 : 2 + K] == dest, f"channel {c} row {n}: scale-up destinations {got[2:2 + K]} != {dest}"
            highest = {v: k for k, v in enumerate(dest) if v >= 0}
            for k in range(K):
                s_k = got[2 + K + k]
                if dest[k] >= 0 and highest[dest[k]] == k:
                    assert s_k >= 0, f"channel {c} row {n} lane {k}: no scale-up slot"
                    told[src * M + t, dest[k]] = s_k
                    slots_per_v[dest[k]].append(s_k)
                    # Within one channel the forwarder hands out a destination's slots in forward order.
                    assert s_k > last_slot.get(dest[k], -1), f"channel {c}: slots to {dest[k]} not increasing"
                    last_slot[dest[k]] = s_k
                else:
                    assert s_k == -1, f"channel {c} row {n} lane {k}: slot {s_k} on a lane that is not the highest"
            assert dst[c, j, slot].tolist() == got[2 + K :], "dst_buffer_slot_idx differs from the metadata's slots"
            seen_dst[c, j, slot] = True
    assert bool((dst[~seen_dst] == -1).all()), "dst_buffer_slot_idx cells no token used must hold -1 (our fill)"
    for v, slots in slots_per_v.items():
        assert sorted(slots) == list(range(len(slots))), f"slots towards scale-up rank {v}: {sorted(slots)}"
    return told


def check_hybrid_destination(h, inputs, me, S, U, C, E, M, decode, told_by_rank):
    """Rank ``me`` as a destination: psum per scale-up peer, recv_src_metadata column 1, the row
    order (decode: sorted by source token; prefill: peer segments in slot order) and
    channel_linked_list, against the forwarders' metadata (``told_by_rank``: every rank's
    :func:`check_hybrid_forwarder` result)."""
    R = S * U
    EL = E // R
    K = inputs[0].topk_idx.shape[1]
    mtpc = -(-M // C)
    L = S * mtpc + 1
    rows, counts = ref.expected_received(inputs, me, EL, M)
    per_peer = [sum(counts[u::U]) for u in range(U)]
    psum = h.psum_num_recv_tokens_per_scaleup_rank
    assert psum.shape == (U,) and psum.tolist() == _cumsum(per_peer), (psum.tolist(), per_peer)
    N = len(rows)
    meta = h.recv_src_metadata[:N].tolist()
    starts = [a - b for a, b in zip(_cumsum(per_peer), per_peer)]
    node, v = divmod(me, U)
    row_of = {}
    for i, (gid, col1, *_slots) in enumerate(meta):
        src, t = divmod(gid, M)
        u = src % U
        row = inputs[src].topk_idx[t].tolist()
        kmax = max(k for k, e in enumerate(row) if e >= 0 and e // EL == me)
        slot = told_by_rank[node * U + u].get((gid, v))
        assert slot is not None, f"row {i}: token {gid} was not forwarded to this rank by peer {u}"
        assert col1 == slot * K + kmax, f"row {i}: column 1 {col1} != slot {slot} * K + kmax {kmax}"
        if not decode:  # DeepEP keeps recv_src_metadata in peer segments, in slot order, when expanding
            assert i == starts[u] + slot, f"row {i}: token of peer {u} with slot {slot} outside its segment place"
        row_of[gid] = i
    assert sorted(row_of) == sorted(g for _s, _t, g in rows)
    if decode:
        assert [m[0] for m in meta] == [g for _s, _t, g in rows], "decode rows must be sorted by source token"
    links = h.channel_linked_list
    assert links.shape == (C, L, U) and links.dtype == torch.int32, (links.shape, links.dtype)
    visited = []
    for u in range(U):
        for c, entries in expected_forwarding(inputs, node * U + u, S, U, C, E).items():
            want = [row_of[src * M + t] for _j, _s, src, t, _e in entries if (src * M + t) in row_of]
            got = links[c, :, u].tolist()
            assert got[: len(want)] == want and got[len(want)] == -1, (
                f"channel_linked_list[{c}, :, {u}] = {got}, expected {want} then -1")
            assert all(x == -1 for x in got[len(want):]), "cells after the terminator must hold -1 (our fill)"
            visited += want
    assert sorted(visited) == list(range(N)), "the linked lists must visit every received row once"


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
    else:  # elementwise experts: contract §4's rounding emulated exactly
        assert torch.equal(out, exp), (
            f"{mode} {kind}: not bitwise the rounding of contract §4 (§9 in hybrid mode), "
            f"max err {(out.float() - exp.float()).abs().max()}")


def run_moe(rank, world, *, seed, Ts, K, E, A=1, fp8=False, neg_frac=0.25, experts_pool=None,
            empty_rows=0, small_ints=False, S=1, C=2, multi_reduction=True):
    """One MoE scenario; ``S > 1``: hybrid mode with S nodes of R/S ranks and C channels."""
    import torch.distributed as dist

    import deepep_ops as D

    group = dist.group.WORLD if dist.is_initialized() else None
    R, me = world, rank
    EL = E // R
    U = R // S
    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(group, num_max_tokens_per_rank=CAPACITY, hidden=H, num_topk=K,
                                              num_scaleout_ranks=S, num_channels=C,
                                              allow_multiple_reduction=multi_reduction))
    assert (buf.num_scaleout_ranks, buf.num_scaleup_ranks) == (S, U)
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
    starts = [a - b for a, b in zip(_cumsum(aligned), aligned)]

    def exact_combine(ex, weighted, expand):
        """Contract §4's rounding (direct), or §9's (hybrid with multiple reduction), or every lane
        rounded alone (expand without multiple reduction): DeepEP's refs.combine recipes."""
        if S > 1 and multi_reduction:
            return ref.hybrid_spec_combine(inp, ex, E, S, U, weighted, expand=expand)
        if expand and not multi_reduction:
            return ref.refs_combine(ref.lane_values(inp, ex, weighted, expand=True), inp.topk_idx, S, U, E,
                                    reduce_in_local=False, reduce_in_scaleup=False)
        return ref.spec_combine(inp, ex, EL, weighted, expand=expand)

    def check_combines(mode, result, expert_rows, *extra):
        """Each expert kind's rows through combine, against the dense MoE or the exact rounding."""
        for kind, ex in kinds.items():
            weighted = kind != "identity"
            rows = check(f"{mode} {kind} expert rows", expert_rows, result, me, EL, ex, weighted, *extra)
            if rows is None:
                rows = torch.zeros(result.recv_x.shape, dtype=BF16)
            out = D.combine(rows, result.handle, buf)
            expected = (lambda ex=ex: ref.dense_moe(inp, ex)) if kind == "matrix" else (
                lambda ex=ex, weighted=weighted: exact_combine(ex, weighted, mode == "prefill"))
            check(f"{mode} {kind} combine", _compare, out, expected, kind, mode, T)

    def check_hybrid(mode, h):
        """Hybrid handle facts; every rank's forwarder view is all-gathered (outside ``check``:
        the ranks stay in step whatever fails)."""
        told = check(f"{mode} hybrid forwarder", check_hybrid_forwarder, h, inputs, me, S, U, C, E,
                     M if mode == "decode" else CAPACITY)
        told_by_rank = [None] * R
        dist.all_gather_object(told_by_rank, told or {})
        check(f"{mode} hybrid destination", check_hybrid_destination, h, inputs, me, S, U, C, E,
              M if mode == "decode" else CAPACITY, mode == "decode", told_by_rank)

    # ---------------- decode
    r = D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E, num_max_tokens_per_rank=M,
                   expert_alignment=A, x_scales=inp.x_scales)
    if S == 1:
        check("decode layout", check_decode_layout, r, inputs, me, R, E, M, A)
    else:
        check("decode layout (direct facts)", check_decode_layout, r, inputs, me, R, E, M, A, hybrid=True)
        check_hybrid("decode", r.handle)
    check_combines("decode", r, decode_expert_rows)
    if not fp8 and (S == 1 or small_ints):
        # contract §8: combine of the received rows themselves = x·(#distinct destination ranks), bitwise
        # (x·n is exact in fp32 and rounded once; hybrid mode rounds per node too, so there only
        # exactly representable data qualifies). Padding rows are NaN: combine must not read them.
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
    check("prefill layout", check_prefill_layout, res, inputs, me, R, E, CAPACITY, A, hybrid=S > 1)
    if S > 1:
        check_hybrid("prefill", res.handle)
    check_combines("prefill", res, prefill_expert_rows, starts, c)
    if small_ints and not fp8:
        # contract §8: combine of the expanded rows themselves = x·(#valid lanes), bitwise. Exactly
        # representable data, so contract §4's per-rank bf16 rounding cannot change the result.
        y = res.recv_x.clone()
        for el in range(EL):
            y[starts[el] + c[el] : starts[el] + aligned[el]] = float("nan")
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
    # exactly representable data: identity combine = x·#ranks (decode), x·#lanes (prefill), contract §8
    "identity_exact": lambda rank, world: run_moe(rank, world, seed=17, Ts=_ts(world, [8, 6]), K=4, E=max(4, 2 * world),
                                                  neg_frac=0.3, small_ints=True),
}
NAMES = tuple(SCENARIOS)


def run_rounding_example(rank, world):
    """Contract §9's rounding on one token (the research note's worked example): K = 4, E = 8 over
    2 nodes x 2 ranks, routing [5, 0, 4, 2] on rank 0, lane values 1.0, 1.0, 2^-7·0.75, 2^-6·0.75.
    Hybrid: rank 2 sums its two lanes (1.0078125), node 0 sums ranks 0 and 1 (1.01171875, a tie:
    1.015625), then the nodes (2.0234375, a tie: 2.03125). Direct: one sum over the ranks, 2.015625.
    Both layouts (prefill: the kernel sums a rank's lanes; decode: the caller does), both domains."""
    import torch.distributed as dist

    import deepep_ops as D

    assert world == 4
    value = {5: 1.0, 0: 1.0, 4: 0.005859375, 2: 0.01171875}
    idx = torch.tensor([[5, 0, 4, 2]] if rank == 0 else [], dtype=torch.int64).reshape(-1, 4)
    T = idx.shape[0]
    x = torch.ones(T, H, dtype=BF16)
    w = torch.ones(T, 4)
    EL = 2
    failures = []
    for S, want in ((2, 2.03125), (1, 2.015625)):
        buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=4, hidden=H, num_topk=4,
                                                  num_scaleout_ranks=S, num_channels=2))
        res = D.dispatch_exact(x, idx, w, buf, num_experts=8, num_max_tokens_per_rank=4)
        rows = torch.zeros(res.recv_x.shape, dtype=BF16)
        start = 0
        for el, cnt in enumerate(res.num_recv_tokens_per_expert.tolist()):
            rows[start : start + cnt] = value.get(rank * EL + el, 0.0)
            start += cnt
        prefill = D.combine(rows, res.handle, buf)
        r = D.dispatch(x, idx, w, buf, num_experts=8, num_max_tokens_per_rank=4)
        n = int(r.handle.psum_num_recv_tokens_per_scaleup_rank[-1])
        rows = torch.zeros(r.recv_x.shape, dtype=BF16)
        for i in range(n):  # the caller's own per-rank reduction, fp32 in lane order, one rounding
            acc = torch.zeros(())
            for k, e in enumerate(r.recv_topk_idx[i].tolist()):
                if e >= 0:
                    acc = acc + value[rank * EL + e]
            rows[i] = acc.to(BF16)
        decode = D.combine(rows, r.handle, buf)
        for name, out in (("prefill", prefill), ("decode", decode)):
            if T and not bool((out.float() == want).all()):
                failures.append(f"S={S} {name}: {out[0, 0].item()} != {want}")
    assert not failures, failures


#: The research note's hand-derived hybrid handles (2 nodes x 2 ranks, E = 4, K = 2, M = 4, C = 2):
#: rank 0 routes t0 -> [2, 0], t1 -> [1, 3], t2 -> [3, -1]; rank 2 t0 -> [0, 1], t1 -> [2, 3].
TOY_ROUTING = {0: [[2, 0], [1, 3], [3, -1]], 2: [[0, 1], [2, 3]]}
#: Forwarder tensors: {rank: {(c, n): token_metadata_at_forward row}} (other rows: col 0 = -1
#: terminator right after the last), and {rank: {(c, j, slot): dst_buffer_slot_idx lanes}} (the
#: note lists rank 0's; rank 2's are its metadata rows' slot columns, at each token's scale-out slot).
TOY_FORWARD = {
    0: {(0, 0): [8, 1, 0, 1, 0, 0], (0, 1): [0, 1, -1, 0, -1, 1], (1, 0): [1, 1, 1, -1, 1, -1]},
    2: {(0, 0): [0, 0, 0, -1, 0, -1], (0, 1): [2, 1, 1, -1, 0, -1], (1, 0): [1, 1, -1, 1, -1, 1],
        (1, 1): [9, 1, 0, 1, 1, 2]},
}
TOY_DST_SLOTS = {0: {(0, 1, 0): [0, 0], (0, 0, 0): [-1, 1], (1, 0, 0): [1, -1]},
                 2: {(0, 0, 0): [0, -1], (0, 0, 1): [0, -1], (1, 0, 0): [-1, 1], (1, 1, 0): [1, 2]}}
#: Destinations, peer-segment order (what the prefill handle keeps): psum, (gid, col 1) per row,
#: {(c, n, u): row} of channel_linked_list (every other cell of the list up to its terminator: -1).
TOY_DEST = {
    0: ([2, 2], [(8, 0), (0, 3)], {(0, 0, 0): 0, (0, 1, 0): 1}),
    1: ([2, 2], [(8, 1), (1, 2)], {(0, 0, 0): 0, (1, 0, 0): 1}),
    2: ([2, 2], [(0, 0), (9, 2)], {(0, 0, 0): 0, (1, 0, 0): 1}),
    3: ([3, 3], [(2, 0), (1, 3), (9, 5)], {(0, 0, 0): 0, (1, 0, 0): 1, (1, 1, 0): 2}),
}


def run_toy_example(rank, world):
    """The research note's worked hybrid example, cell by cell: forwarder tensors, psum, column 1,
    row order (decode: DeepEP's deterministic sort by source token, the linked list remapped;
    prefill: peer segments) and the linked lists."""
    import torch.distributed as dist

    import deepep_ops as D

    assert world == 4
    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=4, hidden=H, num_topk=2,
                                              num_scaleout_ranks=2, num_channels=2))
    idx = torch.tensor(TOY_ROUTING.get(rank, []), dtype=torch.int64).reshape(-1, 2)
    x = torch.ones(idx.shape[0], H, dtype=BF16)
    w = torch.ones(idx.shape[0], 2)
    decode = D.dispatch(x, idx, w, buf, num_experts=4, num_max_tokens_per_rank=4).handle
    prefill = D.dispatch_exact(x, idx, w, buf, num_experts=4, num_max_tokens_per_rank=4).handle
    psum, rows, links = TOY_DEST[rank]
    for h, sort in ((decode, True), (prefill, False)):
        meta, dst = h.token_metadata_at_forward, h.dst_buffer_slot_idx
        assert meta.shape == (2, 5, 6) and dst.shape == (2, 2, 2, 2) and h.channel_linked_list.shape == (2, 5, 2)
        forward = TOY_FORWARD.get(rank, {})
        for c in range(2):
            n_rows = sum(1 for (cc, _n) in forward if cc == c)
            for n in range(n_rows):
                assert meta[c, n].tolist() == forward[c, n], (c, n, meta[c, n].tolist(), forward[c, n])
            assert meta[c, n_rows, 0] == -1, (c, meta[c].tolist())
        for key, lanes in TOY_DST_SLOTS.get(rank, {}).items():
            assert dst[key].tolist() == lanes, (key, dst[key].tolist(), lanes)
        assert h.psum_num_recv_tokens_per_scaleup_rank.tolist() == psum
        want = sorted(rows) if sort else rows
        got = [tuple(r[:2]) for r in h.recv_src_metadata[: len(rows)].tolist()]
        assert got == want, (sort, got, want)
        new_row = {seg: want.index(r) for seg, r in enumerate(rows)}  # DeepEP's remap after its sort
        for c in range(2):
            for u in range(2):
                expected = [new_row[links[c, n, u]] for n in range(len(rows)) if (c, n, u) in links]
                got_list = h.channel_linked_list[c, : len(expected) + 1, u].tolist()
                assert got_list == expected + [-1], (sort, c, u, got_list, expected)


def run_hybrid_compiled(rank, world):
    """dispatch -> elementwise experts -> combine, decode and prefill, under
    ``torch.compile(fullgraph=True, dynamic=True)`` (aot_eager) in hybrid mode: no graph break, at
    most 2 frames over T = 1..4 (T = 1's specialisation, then one dynamic graph: as direct mode),
    results bitwise equal to eager, and the hybrid-only handle tensors flow from dispatch into
    combine inside the graph (the combine nodes take all 15 handle arguments)."""
    import torch.distributed as dist
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    import deepep_ops as D

    E, K = 8, 2
    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=CAPACITY, hidden=H,
                                              num_topk=K, num_scaleout_ranks=2, num_channels=3))

    def step(x, idx, w, M):
        r = D.dispatch(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=M)
        dec = D.combine((r.recv_x.float() * 3).to(BF16), r.handle, buf)
        ex = D.dispatch_exact(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=CAPACITY, expert_alignment=2)
        pre = D.combine((ex.recv_x.float() * ex.recv_topk_weights[:, None]).to(BF16), ex.handle, buf)
        return dec, pre

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    cnt = CompileCounterWithBackend(lambda gm, ex: record(gm, ex))
    compiled = torch.compile(step, backend=cnt, fullgraph=True, dynamic=True)
    try:
        for T in range(1, 5):
            inp = ref.make_global_inputs(40 + T, [T] * world, H, K, E, neg_frac=0.2)[rank]
            M = _next_pow2(T)
            got = compiled(inp.x, inp.topk_idx, inp.topk_weights, M)
            want = step(inp.x, inp.topk_idx, inp.topk_weights, M)
            assert all(torch.equal(g, e) for g, e in zip(got, want)), f"T={T}: compiled != eager"
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert 1 <= cnt.frame_count <= 2, cnt.frame_count
        for gm in graphs:
            combines = [n for n in gm.graph.nodes if n.target is torch.ops.deepep_ops.combine]
            assert len(combines) == 2 and all(len(n.args) == 2 + 13 for n in combines), [
                len(n.args) for n in combines]
    finally:
        torch._dynamo.reset()


#: Hybrid mode (contract §9) on 4 ranks: 2 nodes x 2 scale-up ranks, C channels (the reference's
#: simulated count). Each checks the direct-mode facts hybrid mode keeps, the hybrid handle
#: (forwarder tensors, destination psum / column 1 / row order / linked list, across ranks), the
#: dense MoE, and combine's rounding bitwise against DeepEP's refs.combine recipe.
HYBRID_SCENARIOS = {
    "hybrid_random": lambda rank, world: run_moe(rank, world, seed=21, Ts=[6, 9, 7, 10], K=4, E=16,
                                                 neg_frac=0.25, empty_rows=1, S=2, C=2),
    # M = 8 in decode is not a multiple of C = 3; expert_alignment 4
    "hybrid_align4_c3": lambda rank, world: run_moe(rank, world, seed=22, Ts=[7, 5, 8, 6], K=3, E=16, A=4,
                                                    S=2, C=3),
    "hybrid_fp8": lambda rank, world: run_moe(rank, world, seed=23, Ts=[5, 8, 6, 3], K=4, E=16, A=2, fp8=True,
                                              neg_frac=0.2, S=2, C=4),
    # one channel, up to 20 tokens per source: the forwarder alternates 6-slot chunks of both nodes
    "hybrid_long_queues": lambda rank, world: run_moe(rank, world, seed=24, Ts=[20, 17, 0, 19], K=2, E=8,
                                                      neg_frac=0.1, S=2, C=1),
    "hybrid_identity_exact": lambda rank, world: run_moe(rank, world, seed=25, Ts=[8, 6, 9, 7], K=4, E=8,
                                                         neg_frac=0.3, small_ints=True, S=2, C=2),
    # allow_multiple_reduction=False: DeepEP's hybrid combine rounds as direct mode does
    "hybrid_no_multi_reduction": lambda rank, world: run_moe(rank, world, seed=26, Ts=[6, 9, 5, 8], K=4, E=16,
                                                             S=2, C=2, multi_reduction=False),
    "hybrid_rounding_example": run_rounding_example,
    "hybrid_toy_example": run_toy_example,
    "hybrid_compiled": run_hybrid_compiled,
}
SCENARIOS.update(HYBRID_SCENARIOS)
HYBRID_NAMES = tuple(HYBRID_SCENARIOS)
#: The scenarios of each spawned world size (one spawn each).
WORLD_NAMES = {2: NAMES, 4: NAMES + HYBRID_NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_world1_in_process(name):
    SCENARIOS[name](0, 1)


@pytest.mark.parametrize("world,name", [(w, n) for w, names in WORLD_NAMES.items() for n in names])
def test_multirank(world, name):
    assert_scenario_passed(__name__, WORLD_NAMES[world], world, name)


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
