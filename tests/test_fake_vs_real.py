"""Fake kernels vs the real ops on randomized configs (seeded).

For every config the real ops run eagerly (world size 1 in-process; world size
2 in ONE gloo spawn for all R=2 configs; hybrid mode, 2 nodes x 2 ranks, in one
4-rank spawn) and the fake kernels run under
``FakeTensorMode`` with a ``ShapeEnv`` (symbolic T and H). Every output's shape,
dtype, significant strides and storage offset must agree once the symbols are
replaced by the real values; for dispatch_exact the unbacked sizes (N = rows of
recv_src_metadata, X = rows of recv_x) come from the real run and must satisfy
the ranges and runtime asserts the fake declares. The async pairs (a start, then
its wait) are checked the same way. A few torch.compile traces check the same
through Dynamo's recorded example values.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Tuple

import pytest
import sympy
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv, free_unbacked_symbols

import deepep_ops as D
import dense_reference as ref
from _dist import run_distributed

CAP = 64


@dataclass(frozen=True)
class Config:
    seed: int
    R: int
    Ts: Tuple[int, ...]
    H: int
    K: int
    E: int
    A: int
    M: int
    fp8: bool
    neg_frac: float
    S: int = 1  # scale-out ranks (hybrid mode when > 1)
    C: int = 2  # the reference's simulated channels (hybrid mode)

    @property
    def id(self) -> str:
        hybrid = f"-S{self.S}C{self.C}" if self.S > 1 else ""
        return (f"R{self.R}{hybrid}-T{'_'.join(map(str, self.Ts))}-H{self.H}-K{self.K}-E{self.E}-A{self.A}-M{self.M}"
                f"-{'fp8' if self.fp8 else 'bf16'}-neg{self.neg_frac}")

    def buffer(self, group):
        return D.ReferenceElasticBuffer(group, num_max_tokens_per_rank=CAP, hidden=self.H, num_topk=self.K,
                                        num_scaleout_ranks=self.S, num_channels=self.C)

    def inputs(self):
        return ref.make_global_inputs(self.seed, self.Ts, self.H, self.K, self.E, fp8=self.fp8,
                                      neg_frac=self.neg_frac)


def _make_configs(n_r1: int = 12, n_r2: int = 6) -> List[Config]:
    rng = random.Random(20260723)
    out = []
    for i in range(n_r1 + n_r2):
        R = 1 if i < n_r1 else 2
        EL = rng.choice([1, 2, 4, 8])
        E = EL * R
        K = rng.randint(1, min(4, E))
        M = rng.choice([1, 2, 4, 8, 16, 32, 64, 5, 24, 48])
        Ts = tuple(rng.randint(0, M) for _ in range(R))
        out.append(Config(seed=1000 + i, R=R, Ts=Ts, H=rng.choice([256, 512]), K=K, E=E,
                          A=rng.choice([1, 2, 4, 8]), M=M, fp8=rng.random() < 0.4,
                          neg_frac=rng.choice([0.0, 0.3, 1.0 if rng.random() < 0.1 else 0.3])))
    # fixed edge cases: no tokens; every slot empty
    out.append(Config(seed=1900, R=1, Ts=(0,), H=256, K=2, E=4, A=4, M=1, fp8=False, neg_frac=0.0))
    out.append(Config(seed=1901, R=2, Ts=(3, 0), H=256, K=2, E=4, A=2, M=4, fp8=True, neg_frac=1.0))
    return out


CONFIGS = _make_configs()
R1 = [c for c in CONFIGS if c.R == 1]
R2 = [c for c in CONFIGS if c.R == 2]
#: Hybrid mode, 2 nodes x 2 ranks: C dividing M, C larger than M, M not a multiple of C, fp8, no tokens.
HYBRID = [
    Config(seed=2000, R=4, Ts=(5, 8, 0, 3), H=256, K=3, E=8, A=2, M=8, fp8=False, neg_frac=0.2, S=2, C=2),
    Config(seed=2001, R=4, Ts=(2, 1, 3, 0), H=512, K=2, E=16, A=1, M=3, fp8=True, neg_frac=0.3, S=2, C=4),
    Config(seed=2002, R=4, Ts=(7, 4, 6, 7), H=256, K=4, E=4, A=4, M=7, fp8=False, neg_frac=0.0, S=2, C=3),
    Config(seed=2003, R=4, Ts=(0, 0, 0, 0), H=256, K=2, E=8, A=1, M=1, fp8=True, neg_frac=0.3, S=2, C=2),
]


class _StubGroup:
    """Only for the fake kernels, which read nothing but the group size."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def _meta(t: Optional[torch.Tensor]):
    """An output's metadata; None for an absent one (no scales, direct mode's hybrid tensors)."""
    return None if t is None else (tuple(t.shape), str(t.dtype), tuple(t.stride()), t.storage_offset())


def _combine_args(x, outputs, topk_idx, buf, c: Config, M, decode, num_expanded):
    # The combine schema: rows, buffer, then the handle's fields (DispatchHandle order):
    # the five handle tensors are outputs[4:9] of both dispatch ops (after their first four
    # outputs), the two hybrid-only ones outputs[9:11] (None and left out in direct mode).
    hybrid = tuple(outputs[9:11]) if c.S > 1 else ()
    return (x, buf, topk_idx, *outputs[4:9], c.E, M, c.A, decode, num_expanded, *hybrid)


def real_metas(c: Config, rank: int, buf) -> dict:
    """Run the real ops for rank ``rank`` of config ``c``; metadata of every output."""
    inp = c.inputs()[rank]
    args = (inp.x, inp.x_scales, inp.topk_idx, inp.topk_weights, buf, c.E, c.M, c.A)
    dec = torch.ops.deepep_ops.dispatch(*args)
    N, X, *ex = torch.ops.deepep_ops.dispatch_exact(*args)
    # the sizes dispatch_exact returns are those of its tensors (X rows of recv_x, N of recv_src_metadata)
    assert (N, X) == (ex[7].shape[0], ex[0].shape[0]), (N, X, ex[7].shape, ex[0].shape)
    assert len(dec) == len(ex) == 11, (len(dec), len(ex))
    dec_comb = torch.ops.deepep_ops.combine(*_combine_args(
        torch.zeros(dec[0].shape, dtype=torch.bfloat16), dec, inp.topk_idx, buf, c, c.M, True,
        ref.align_up(c.R * c.M * min(c.K, c.E // c.R) + (c.A - 1) * (c.E // c.R), c.A)))
    ex_comb = torch.ops.deepep_ops.combine(*_combine_args(
        torch.zeros(ex[0].shape, dtype=torch.bfloat16), ex, inp.topk_idx, buf, c, c.M, False, ex[0].shape[0]))
    # The async pairs: a start's ticket, its wait's outputs (those of the synchronous op).
    dec_w, ex_w, dec_comb_w, ex_comb_w = _async_ops(args, inp.topk_idx, buf, c, real=True)
    return {
        "dispatch": [_meta(t) for t in dec],
        "dispatch_exact": [_meta(t) for t in ex],
        "combine_decode": [_meta(dec_comb)],
        "combine_exact": [_meta(ex_comb)],
        "dispatch_wait": [_meta(t) for t in dec_w],
        "dispatch_exact_wait": [_meta(t) for t in ex_w[2:]],
        "combine_wait_decode": [_meta(dec_comb_w)],
        "combine_wait_exact": [_meta(ex_comb_w)],
        "N": N,
        "X": X,
    }


def _async_ops(args, topk_idx, buf, c: Config, real: bool):
    """dispatch_start/wait, dispatch_exact_start/wait and combine_start/wait (after each
    dispatch) with the same arguments as the synchronous calls; each wait's outputs.
    Each start's ticket is an empty uint8 tensor on the tokens' device."""
    ops = torch.ops.deepep_ops
    outs = []
    for start, wait in ((ops.dispatch_start, ops.dispatch_wait), (ops.dispatch_exact_start, ops.dispatch_exact_wait)):
        ticket = start(*args)
        assert ticket.shape == (0,) and ticket.dtype == torch.uint8 and ticket.device == args[0].device, ticket
        outs.append(wait(ticket, [], *args))
    dec_w, ex_w = outs
    dec_worst = ref.align_up(c.R * c.M * min(c.K, c.E // c.R) + (c.A - 1) * (c.E // c.R), c.A)
    combined = []
    for outputs, decode, num_expanded in ((dec_w, True, dec_worst), (ex_w[2:], False, ex_w[2].shape[0])):
        new = torch.zeros if real else torch.empty
        cargs = _combine_args(new(outputs[0].shape, dtype=torch.bfloat16), outputs, topk_idx, buf, c, c.M,
                              decode, num_expanded)
        combined.append(ops.combine_wait(ops.combine_start(*cargs), [], *cargs))
    return (dec_w, ex_w, *combined)


def _r2_worker(rank, world, configs):
    import torch.distributed as dist

    torch.manual_seed(0)
    out = []
    for c in configs:
        buf = D.EPOpsBuffer(c.buffer(dist.group.WORLD))
        out.append(real_metas(c, rank, buf))
    return out


_SPAWN_CACHE = {}


def _r2_results():
    if "r2" not in _SPAWN_CACHE:
        _SPAWN_CACHE["r2"] = run_distributed(_r2_worker, 2, R2)
    return _SPAWN_CACHE["r2"]


def _hybrid_results():
    if "hybrid" not in _SPAWN_CACHE:
        _SPAWN_CACHE["hybrid"] = run_distributed(_r2_worker, 4, HYBRID)
    return _SPAWN_CACHE["hybrid"]


def fake_outputs(c: Config, rank: int):
    """Fake kernels of dispatch, dispatch_exact and both combines under FakeTensorMode + ShapeEnv."""
    inp = c.inputs()[rank]
    buf = D.EPOpsBuffer(c.buffer(_StubGroup(rank, c.R)))
    shape_env = ShapeEnv()
    with FakeTensorMode(shape_env=shape_env) as mode:
        fx, fi, fw = (mode.from_tensor(t) for t in (inp.x, inp.topk_idx, inp.topk_weights))
        fsf = None if inp.x_scales is None else mode.from_tensor(inp.x_scales)
        args = (fx, fsf, fi, fw, buf, c.E, c.M, c.A)
        dec = torch.ops.deepep_ops.dispatch(*args)
        n_out, x_out, *ex = torch.ops.deepep_ops.dispatch_exact(*args)
        dec_worst = ref.align_up(c.R * c.M * min(c.K, c.E // c.R) + (c.A - 1) * (c.E // c.R), c.A)
        dec_comb = torch.ops.deepep_ops.combine(*_combine_args(
            torch.empty(dec[0].shape, dtype=torch.bfloat16), dec, fi, buf, c, c.M, True, dec_worst))
        ex_comb = torch.ops.deepep_ops.combine(*_combine_args(
            torch.empty(ex[0].shape, dtype=torch.bfloat16), ex, fi, buf, c, c.M, False, ex[0].shape[0]))
        dec_w, ex_w, dec_comb_w, ex_comb_w = _async_ops(args, fi, buf, c, real=False)
    return shape_env, {"sizes": (n_out, x_out), "dispatch": list(dec), "dispatch_exact": ex,
                       "combine_decode": [dec_comb], "combine_exact": [ex_comb],
                       "wait_sizes": tuple(ex_w[:2]), "dispatch_wait": list(dec_w), "dispatch_exact_wait": ex_w[2:],
                       "combine_wait_decode": [dec_comb_w], "combine_wait_exact": [ex_comb_w]}


def _value(s, subs) -> int:
    if isinstance(s, int):
        return s
    v = sympy.sympify(s.node.expr).xreplace(subs)
    assert v.is_Integer, f"{s} did not evaluate to an integer with {subs}: {v}"
    return int(v)


def compare(c: Config, rank: int, real: dict) -> None:
    shape_env, fake = fake_outputs(c, rank)
    ex = fake["dispatch_exact"]
    x_sym, n_sym = ex[0].shape[0], ex[7].shape[0]
    assert isinstance(x_sym, torch.SymInt) and isinstance(n_sym, torch.SymInt), (x_sym, n_sym)
    (u_x,) = free_unbacked_symbols(x_sym.node.expr)
    (u_n,) = free_unbacked_symbols(n_sym.node.expr)
    assert u_x != u_n and x_sym.node.expr == u_x and n_sym.node.expr == u_n
    # the returned SymInts are the same symbols the tensor sizes use (bound first, see schemas.py)
    n_out, x_out = fake["sizes"]
    assert (n_out.node.expr, x_out.node.expr) == (u_n, u_x), (n_out, x_out, u_n, u_x)
    N, X = real["N"], real["X"]
    subs = dict(shape_env.backed_var_to_val)
    subs.update({u_n: sympy.Integer(N), u_x: sympy.Integer(X)})
    # dispatch_exact_wait binds N and X anew (its own unbacked symbols), for the same values.
    ex_w = fake["dispatch_exact_wait"]
    (w_x,) = free_unbacked_symbols(ex_w[0].shape[0].node.expr)
    (w_n,) = free_unbacked_symbols(ex_w[7].shape[0].node.expr)
    assert {w_n, w_x}.isdisjoint({u_n, u_x})
    assert tuple(s.node.expr for s in fake["wait_sizes"]) == (w_n, w_x)
    subs.update({w_n: sympy.Integer(N), w_x: sympy.Integer(X)})

    # bounds the fake declares (value ranges and deferred runtime asserts) hold for the real sizes
    for sym, val in ((u_n, N), (u_x, X), (w_n, N), (w_x, X)):
        vr = shape_env.var_to_range[sym]
        assert vr.lower <= val <= vr.upper, f"real {sym}={val} outside declared range {vr}"
    for asserts in shape_env.deferred_runtime_asserts.values():
        for ra in asserts:
            assert bool(ra.expr.xreplace(subs)), f"declared {ra.expr} is false for N={N}, X={X}"
    # docs/deepep_contract.md §2 facts on the real sizes: N <= R·M, N <= X <= worst case
    EL = c.E // c.R
    assert 0 <= N <= c.R * c.M and N <= X <= ref.align_up(c.R * c.M * min(c.K, EL) + (c.A - 1) * EL, c.A)

    for op, real_list in real.items():
        if op in ("N", "X", "wait_sizes"):
            continue
        fake_list = fake[op]
        assert len(fake_list) == len(real_list), (op, len(fake_list), len(real_list))
        for i, (f, real_meta) in enumerate(zip(fake_list, real_list)):
            where = f"{op} output[{i}]"
            # An absent output (no scales, direct mode's hybrid tensors) is None in both.
            assert (f is None) == (real_meta is None), f"{where}: fake {f!r} vs real {real_meta!r}"
            if f is None:
                continue
            shape, dtype, stride, offset = real_meta
            fshape = tuple(_value(s, subs) for s in f.shape)
            assert fshape == shape, f"{where}: fake shape {fshape} ({tuple(f.shape)}) != real {shape}"
            assert str(f.dtype) == dtype, f"{where}: fake dtype {f.dtype} != real {dtype}"
            fstride = tuple(_value(s, subs) for s in f.stride())
            sig_f = tuple(st for st, n in zip(fstride, shape) if n > 1)
            sig_r = tuple(st for st, n in zip(stride, shape) if n > 1)
            assert sig_f == sig_r, f"{where}: fake strides {fstride} != real {stride} (shape {shape})"
            assert _value(f.storage_offset(), subs) == offset, f"{where}: storage offset differs"


def test_config_list_is_fixed():
    # The randomized configs are seeded: print them so `pytest -s` / -v ids show what ran.
    print("\n".join(c.id for c in CONFIGS))
    assert len(CONFIGS) == 20 and len(R2) >= 6
    assert {c.fp8 for c in CONFIGS} == {True, False} and {c.H for c in CONFIGS} == {256, 512}


@pytest.mark.parametrize("c", R1, ids=[c.id for c in R1])
def test_fake_vs_real_world1(c):
    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=c.H, num_topk=c.K))
    compare(c, 0, real_metas(c, 0, buf))


@pytest.mark.parametrize("c", R2, ids=[c.id for c in R2])
def test_fake_vs_real_world2(c):
    per_rank = _r2_results()
    i = R2.index(c)
    for rank in range(2):
        compare(c, rank, per_rank[rank][i])


@pytest.mark.parametrize("c", HYBRID, ids=[c.id for c in HYBRID])
def test_fake_vs_real_hybrid(c):
    """Hybrid mode (docs/deepep_contract.md §9): psum [U], dst_buffer_slot_idx [C, S, ceil(M/C), K] and the
    two hybrid-only tensors, from the fakes exactly as the reference returns them."""
    per_rank = _hybrid_results()
    i = HYBRID.index(c)
    mtpc = -(-c.M // c.C)
    for rank in range(c.R):
        real = per_rank[rank][i]
        for op in ("dispatch", "dispatch_exact"):
            psum, _pe, _un, _meta, dst, forward, links = real[op][-7:]
            assert psum[0] == (c.R // c.S,), (op, psum)
            assert dst[0] == (c.C, c.S, mtpc, c.K), (op, dst)
            assert forward[0] == (c.C, c.S * mtpc + 1, 2 + 2 * c.K), (op, forward)
            assert links[0] == (c.C, c.S * mtpc + 1, c.R // c.S), (op, links)
        compare(c, rank, real)


# ----------------------------------------------------------------------------- through torch.compile
class _Recorder:
    """Dynamo backend that keeps the graph (with example values) and runs it eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def _op_example_values(gm, op):
    """example_value of every call of ``op`` (an OpOverloadPacket) in the Dynamo graph."""
    return [n.meta["example_value"] for n in gm.graph.nodes
            if n.op == "call_function" and n.target in (op, getattr(op, "default", None))]


def _check_example_values(fake_outs, real_outs, subs):
    if isinstance(fake_outs, torch.Tensor):
        fake_outs, real_outs = (fake_outs,), (real_outs,)
    assert len(fake_outs) == len(real_outs)
    for i, (f, r) in enumerate(zip(fake_outs, real_outs)):
        assert (f is None) == (r is None), (i, f, r)
        if f is None:
            continue
        assert tuple(_value(s, subs) for s in f.shape) == tuple(r.shape), (i, f.shape, r.shape)
        assert f.dtype == r.dtype, (i, f.dtype, r.dtype)
        fstride = tuple(_value(s, subs) for s in f.stride())
        assert [s for s, n in zip(fstride, r.shape) if n > 1] == [s for s, n in zip(r.stride(), r.shape) if n > 1]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_compiled_example_values_match_real(fp8):
    """Dynamo traces with symbolic T and M; its example values for each deepep op agree with the
    real eager outputs, and the compiled function returns the eager result bitwise."""
    torch._dynamo.reset()
    E, K, H, A = 8, 3, 256, 2
    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K))

    def fn(x, sf, idx, w, M):
        r = D.dispatch(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=M, expert_alignment=A, x_scales=sf)
        ex = D.dispatch_exact(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=CAP, expert_alignment=A,
                              x_scales=sf)
        dec_rows = (r.recv_x.float() * 2).to(torch.bfloat16)
        ex_rows = (ex.recv_x.float() * ex.recv_topk_weights[:, None]).to(torch.bfloat16)
        return D.combine(dec_rows, r.handle, buf), D.combine(ex_rows, ex.handle, buf)

    rec = _Recorder()
    cfn = torch.compile(fn, backend=rec, fullgraph=True, dynamic=True)
    inp = ref.make_global_inputs(77, [9], H, K, E, fp8=fp8, neg_frac=0.2)[0]
    args = (inp.x, inp.x_scales, inp.topk_idx, inp.topk_weights, 16)
    got = cfn(*args)
    exp = fn(*args)
    assert all(torch.equal(g, e) for g, e in zip(got, exp)), "compiled result differs from eager"
    assert len(rec.graphs) == 1
    gm = rec.graphs[0]
    dec_vals = _op_example_values(gm, torch.ops.deepep_ops.dispatch)
    ex_vals = _op_example_values(gm, torch.ops.deepep_ops.dispatch_exact)
    comb_vals = _op_example_values(gm, torch.ops.deepep_ops.combine)
    assert len(dec_vals) == 1 and len(ex_vals) == 1 and len(comb_vals) == 2, [n.target for n in gm.graph.nodes]
    # M is symbolic: decode rows are R·M with M a graph input, not a constant
    m_expr = dec_vals[0][0].shape[0]
    assert isinstance(m_expr, torch.SymInt) and not free_unbacked_symbols(m_expr.node.expr), m_expr

    # real outputs of the raw ops on the same inputs
    raw = (inp.x, inp.x_scales, inp.topk_idx, inp.topk_weights, buf, E)
    real_dec = torch.ops.deepep_ops.dispatch(*raw, 16, A)
    real_n, real_x, *real_ex = torch.ops.deepep_ops.dispatch_exact(*raw, CAP, A)
    shape_env = m_expr.node.shape_env
    subs = dict(shape_env.backed_var_to_val)
    fake_n, fake_x, *fake_ex = ex_vals[0]
    (u_x,) = free_unbacked_symbols(fake_ex[0].shape[0].node.expr)
    (u_n,) = free_unbacked_symbols(fake_ex[7].shape[0].node.expr)
    assert (fake_n.node.expr, fake_x.node.expr) == (u_n, u_x), (fake_n, fake_x)
    subs.update({u_x: sympy.Integer(real_x), u_n: sympy.Integer(real_n)})
    _check_example_values(dec_vals[0], real_dec, subs)
    _check_example_values(fake_ex, real_ex, subs)
    _check_example_values(comb_vals[0], exp[0], subs)
    _check_example_values(comb_vals[1], exp[1], subs)
    torch._dynamo.reset()
