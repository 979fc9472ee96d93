"""An independent, single-process dense MoE reference (no deepep_ops imports).

Every rank calls these functions with the same seed and gets the SAME global
inputs (all ranks' x, scales, routing and weights), so each rank computes the
expected result for its own tokens, and the expected received rows, without
communication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_BLOCK = 128


def align_up(v: int, a: int) -> int:
    return (v + a - 1) // a * a


@dataclass
class RankInputs:
    x: torch.Tensor  # [T, H] bf16 or fp8
    x_scales: Optional[torch.Tensor]  # [T, P] f32 (fp8 only)
    topk_idx: torch.Tensor  # [T, K] int64, -1 = empty
    topk_weights: torch.Tensor  # [T, K] f32

    def x_float(self) -> torch.Tensor:
        """x as fp32 (dequantised for fp8)."""
        return dequant(self.x, self.x_scales)


def dequant(x: torch.Tensor, scales: Optional[torch.Tensor]) -> torch.Tensor:
    if scales is None:
        return x.float()
    H = x.shape[1]
    return x.float() * scales.repeat_interleave(SCALE_BLOCK, dim=1)[:, :H]


def quant_fp8(xf: torch.Tensor):
    """Per-token, per-128-channel-block fp8 quantisation: (x fp8 [T,H], scales f32 [T, ceil(H/128)])."""
    T, H = xf.shape
    P = math.ceil(H / SCALE_BLOCK)
    pad = torch.zeros(T, P * SCALE_BLOCK - H)
    blocks = torch.cat([xf, pad], dim=1).reshape(T, P, SCALE_BLOCK)
    scales = (blocks.abs().amax(dim=2) / FP8_MAX).clamp(min=1e-4)
    q = (xf / scales.repeat_interleave(SCALE_BLOCK, dim=1)[:, :H]).to(FP8)
    return q.contiguous(), scales.float().contiguous()


def make_routing(g: torch.Generator, T: int, K: int, E: int, *, neg_frac: float = 0.0,
                 experts: Optional[Sequence[int]] = None) -> torch.Tensor:
    """[T, K] int64: K distinct experts per row (from ``experts`` or range(E)), some slots -1."""
    pool = torch.arange(E) if experts is None else torch.tensor(list(experts), dtype=torch.int64)
    assert K <= pool.numel()
    order = torch.rand(T, pool.numel(), generator=g).argsort(dim=1)[:, :K]
    idx = pool[order].to(torch.int64)
    if neg_frac > 0:
        drop = torch.rand(T, K, generator=g) < neg_frac
        idx = torch.where(drop, torch.full_like(idx, -1), idx)
    return idx.contiguous()


def make_global_inputs(seed: int, Ts: Sequence[int], H: int, K: int, E: int, *, fp8: bool = False,
                       neg_frac: float = 0.0, experts: Optional[Sequence[int]] = None,
                       empty_rows: int = 0, small_ints: bool = False) -> List[RankInputs]:
    """Inputs of every rank, from one seed. ``empty_rows``: that many leading rows of each
    rank route nowhere (all -1). ``small_ints``: x holds small dyadic values (exact arithmetic)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for T in Ts:
        if small_ints:
            xf = torch.randint(-8, 9, (T, H), generator=g).float() / 4
        else:
            xf = torch.randn(T, H, generator=g)
        idx = make_routing(g, T, K, E, neg_frac=neg_frac, experts=experts)
        if empty_rows:
            idx[: min(empty_rows, T)] = -1
        w = torch.rand(T, K, generator=g).float()
        if fp8:
            q, s = quant_fp8(xf)
            out.append(RankInputs(q, s, idx, w.contiguous()))
        else:
            out.append(RankInputs(xf.bfloat16().contiguous(), None, idx, w.contiguous()))
    return out


# ----------------------------------------------------------------------------- experts
class Experts:
    """Deterministic per-global-expert functions known to every rank.

    ``kind='matrix'``: expert e is x @ W_e (W_e [H, H] ~ N(0, 1/H)).
    ``kind='diag'``: expert e is x * s_e (elementwise; bitwise reproducible, so
    docs/deepep_contract.md §4's rounding can be emulated exactly).
    ``kind='identity'``: expert e is x.
    """

    def __init__(self, seed: int, E: int, H: int, kind: str):
        self.kind = kind
        g = torch.Generator().manual_seed(seed + 7919)
        if kind == "matrix":
            self.W = torch.randn(E, H, H, generator=g) / math.sqrt(H)
        elif kind == "diag":
            self.s = torch.rand(E, H, generator=g) * 1.5 + 0.25
        elif kind != "identity":
            raise ValueError(kind)

    def __call__(self, e: int, xf: torch.Tensor) -> torch.Tensor:
        """fp32 [n, H] -> fp32 [n, H] for global expert e."""
        if self.kind == "matrix":
            return xf @ self.W[e]
        if self.kind == "diag":
            return xf * self.s[e]
        return xf.clone()


# ----------------------------------------------------------------------------- routing facts
def rank_of(idx: torch.Tensor, EL: int) -> torch.Tensor:
    return torch.where(idx >= 0, idx // EL, torch.full_like(idx, -1))


def last_lane_of_rank(idx_row: Sequence[int], EL: int) -> dict:
    """{rank: highest lane k whose expert lives on rank} for one routing row."""
    out = {}
    for k, e in enumerate(idx_row):
        if e >= 0:
            out[e // EL] = k
    return out


def expected_received(inputs: List[RankInputs], me: int, EL: int, M: int):
    """Tokens rank ``me`` receives in decode mode, grouped by source rank then ascending token.

    Returns a list of (src_rank, t, global_id = src*M + t) and the per-source counts.
    """
    rows, counts = [], []
    for src, inp in enumerate(inputs):
        c = 0
        for t, row in enumerate(inp.topk_idx.tolist()):
            if any(e >= 0 and e // EL == me for e in row):
                rows.append((src, t, src * M + t))
                c += 1
        counts.append(c)
    return rows, counts


def local_expert_counts(inputs: List[RankInputs], me: int, EL: int) -> List[int]:
    """c_e: (token, lane) pairs routed to each local expert of rank ``me``."""
    c = [0] * EL
    for inp in inputs:
        for row in inp.topk_idx.tolist():
            for e in row:
                if e >= 0 and e // EL == me:
                    c[e - me * EL] += 1
    return c


# ----------------------------------------------------------------------------- dense MoE
def dense_moe(inp: RankInputs, experts: Experts, weighted: bool = True) -> torch.Tensor:
    """y[t] = Σ_k w[t,k]·expert_{idx[t,k]}(x[t]) in float64 (the ideal answer), [T, H]."""
    xf = inp.x_float().double()
    T, H = xf.shape
    y = torch.zeros(T, H, dtype=torch.float64)
    for t, row in enumerate(inp.topk_idx.tolist()):
        for k, e in enumerate(row):
            if e < 0:
                continue
            w = float(inp.topk_weights[t, k]) if weighted else 1.0
            if experts.kind == "matrix":
                out = xf[t : t + 1] @ experts.W[e].double()
            elif experts.kind == "diag":
                out = xf[t : t + 1] * experts.s[e].double()
            else:
                out = xf[t : t + 1]
            y[t] += w * out[0]
    return y


def spec_combine(inp: RankInputs, experts: Experts, EL: int, weighted: bool = True, *, expand: bool) -> torch.Tensor:
    """Bit-exact expected combine result (contract §4) for elementwise experts.

    Per token, each destination rank r contributes one fp32 partial over its
    lanes in ascending lane order, rounded once to bf16; combine sums those in
    fp32 over ranks ordered by each rank's last lane and rounds once to bf16.
    The modes differ in what a lane adds (what the test's receiving side computes):

    - decode (``expand=False``, non-expand): w[t,k]·expert(x[t]) in fp32;
    - prefill (``expand=True``, allow_multiple_reduction=True): each expanded
      row is already bf16(expert(x[t])·w[t,k]).
    """
    xf = inp.x_float()
    T, H = xf.shape
    out = torch.zeros(T, H, dtype=torch.bfloat16)
    for t, row in enumerate(inp.topk_idx.tolist()):
        partial = {}
        for k, e in enumerate(row):
            if e < 0:
                continue
            r = e // EL
            w = inp.topk_weights[t, k] if weighted else torch.tensor(1.0)
            y = experts(e, xf[t : t + 1])[0] * w
            if expand:
                y = y.bfloat16().float()
            partial[r] = partial.get(r, torch.zeros(H)) + y
        acc = torch.zeros(H)
        for r, _k in sorted(last_lane_of_rank(row, EL).items(), key=lambda kv: kv[1]):
            acc = acc + partial[r].bfloat16().float()
        out[t] = acc.bfloat16()
    return out


def refs_combine(y: torch.Tensor, topk_idx: torch.Tensor, num_scaleout_ranks: int, num_scaleup_ranks: int,
                 num_experts: int, *, reduce_in_local: bool, reduce_in_scaleup: bool) -> torch.Tensor:
    """DeepEP's ``refs.combine`` recipe (deep_ep/utils/refs.py, dd758ca), written out per token.

    ``y`` [T, K, H] float32: each lane's value (0 at −1 lanes). Groups of lanes
    are reduced in ascending lane order in fp32 and stored, rounded to bf16, at
    the group's LAST lane (0 at its other lanes): first per destination rank
    (``reduce_in_local``), then per scale-up group, i.e. node
    (``reduce_in_scaleup``); finally every lane is added in lane order in fp32 and
    rounded once. ``(True, True)``: hybrid combine; ``(True, False)``: direct;
    ``(False, False)``: no multiple reduction (every lane rounded to bf16 alone).
    """
    T, K, H = y.shape
    R = num_scaleout_ranks * num_scaleup_ranks
    EL = num_experts // R
    out = torch.zeros(T, H, dtype=torch.bfloat16)

    def grouped(vals, groups):
        new = [torch.zeros(H) for _ in range(K)]
        last = {}
        for k, g in enumerate(groups):
            last[g] = k
        for g, k_last in last.items():
            acc = torch.zeros(H)
            for k in range(K):
                if groups[k] == g:
                    acc = acc + vals[k]
            new[k_last] = acc.bfloat16().float()
        return new

    for t in range(T):
        row = topk_idx[t].tolist()
        vals = [y[t, k].float() if row[k] >= 0 else torch.zeros(H) for k in range(K)]
        ranks = [e // EL if e >= 0 else -1 for e in row]
        if reduce_in_local:
            vals = grouped(vals, ranks)
        else:
            vals = [v.bfloat16().float() for v in vals]
        if reduce_in_scaleup:
            vals = grouped(vals, [r // num_scaleup_ranks if r >= 0 else -1 for r in ranks])
        acc = torch.zeros(H)
        for v in vals:
            acc = acc + v
        out[t] = acc.bfloat16()
    return out


def lane_values(inp: RankInputs, experts: Experts, weighted: bool, *, expand: bool) -> torch.Tensor:
    """[T, K, H] float32: what each lane of each token adds in combine (see :func:`spec_combine`)."""
    xf = inp.x_float()
    T, H = xf.shape
    K = inp.topk_idx.shape[1]
    y = torch.zeros(T, K, H)
    for t, row in enumerate(inp.topk_idx.tolist()):
        for k, e in enumerate(row):
            if e < 0:
                continue
            w = inp.topk_weights[t, k] if weighted else torch.tensor(1.0)
            v = experts(e, xf[t : t + 1])[0] * w
            y[t, k] = v.bfloat16().float() if expand else v
    return y


def hybrid_spec_combine(inp: RankInputs, experts: Experts, E: int, S: int, U: int, weighted: bool = True, *,
                        expand: bool) -> torch.Tensor:
    """Bit-exact expected hybrid combine (allow_multiple_reduction): :func:`refs_combine`
    ``(True, True)`` of the mode's lane values (as :func:`spec_combine`)."""
    return refs_combine(lane_values(inp, experts, weighted, expand=expand), inp.topk_idx, S, U, E,
                        reduce_in_local=True, reduce_in_scaleup=True)


# ----------------------------------------------------------------------------- dense MoE layer
def dense_moe_layer(x: torch.Tensor, router: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                    w_down: torch.Tensor, num_topk: int, near_tie: float = 1e-5):
    """The MoE layer of ``deepep_ops.moe.MoELayer`` computed directly, without deepep_ops code.

    Routing in float64: softmax over ``x @ router``, top-k, renormalised. Expert
    e is ``(silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]`` in float32 on the
    bf16 input (on the CPU, whatever device x is on). Returns ``(y, mag, near_tie)``:
    ``y`` [T, H] and ``mag`` [T, H] = Σ_k w_k·|expert_k(x)| (the scale bf16
    roundings are relative to) in float64, and ``near_tie`` [T] bool marking
    tokens whose K-th and (K+1)-th probabilities are closer than ``near_tie``
    (another fp32 summation order may route those differently).
    """
    x, router, w_gate, w_up, w_down = (t.cpu() for t in (x, router, w_gate, w_up, w_down))
    probs = torch.softmax(x.double() @ router.double(), dim=-1)
    top = probs.topk(min(num_topk + 1, router.shape[1]), dim=-1)
    if top.values.shape[1] > num_topk:
        tie = (top.values[:, num_topk - 1] - top.values[:, num_topk]) < near_tie
    else:
        tie = torch.zeros(x.shape[0], dtype=torch.bool)
    weights = top.values[:, :num_topk]
    weights = weights / weights.sum(dim=-1, keepdim=True)
    ids = top.indices[:, :num_topk]
    xf = x.float()
    y = torch.zeros(x.shape, dtype=torch.float64)
    mag = torch.zeros(x.shape, dtype=torch.float64)
    for e in range(router.shape[1]):
        rows, lanes = (ids == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        h = xf[rows]
        out = (torch.nn.functional.silu(h @ w_gate[e]) * (h @ w_up[e])) @ w_down[e]
        term = weights[rows, lanes].unsqueeze(1) * out.double()
        y.index_add_(0, rows, term)
        mag.index_add_(0, rows, term.abs())
    return y, mag, tie
