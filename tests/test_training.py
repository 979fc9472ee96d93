"""Training through dispatch and combine (issue 14): gradients, opcheck, compile.

- opcheck (world size 1) of every op with inputs that require grad, so
  ``test_autograd_registration`` and ``test_aot_dispatch_dynamic`` (which runs
  the backward under AOTAutograd) apply.
- Eager gradients on 2 and 4 gloo ranks: x, topk_weights and every expert weight
  (gate/up/down) of the block prepare → experts → finalize against a float64
  dense single-process MoE's autograd (:func:`_dense_grads`), decode and
  prefill, with −1 slots, T = 0 on a rank and expert_alignment padding.
  Tolerance (bf16: tokens, expert outputs and the gradients that cross ranks
  are bf16): ``max|got − ref| <= GRAD_RTOL · max|ref|`` per tensor.
- ``torch.compile(fullgraph=True, dynamic=True)`` of forward + backward, with and
  without ``torch.utils.checkpoint`` around the block, on 2 ranks with T differing
  per rank: 0 graph breaks, at most 2 frames, gradients equal to eager within
  ``COMPILED_RTOL`` (aot_eager: bitwise). Both backends sweep :data:`SWEEP_TS`
  (T − 3·rank on each rank, at least 1), decode and prefill, with and without
  checkpoint: 8 scenarios in one 2-rank spawn. ``SWEEP_TS`` is
  ``tiers.sample_tokens(256)`` (the powers of two with their ±1 neighbours and a
  seeded random sample); in the exhaustive tier (``--exhaustive``) every T in
  1..256 (~2 min more on 2 cores).
"""

from __future__ import annotations

import functools

import pytest
import torch

import deepep_ops as D
import deepep_v25_standin
import dense_reference as ref
import _dist
import tiers
from _dist import assert_scenario_passed

H, I, K, CAP = 256, 32, 2, 256
GRAD_RTOL = 2e-2
#: Compiled vs eager gradients: aot_eager runs the same kernels (bitwise equal);
#: Inductor fuses and reorders fp32/bf16 math, so bf16-level (measured ≤ 1.7e-2).
COMPILED_RTOL = {"aot_eager": 0.0, "inductor": GRAD_RTOL}
SWEEP_TS = tiers.sample_tokens(CAP, salt="test_training")


# ------------------------------------------------------------------------------ opcheck (world size 1)
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
E1 = 4


def _buffer1():
    return D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=16, hidden=H, num_topk=K))


def _check(op, args):
    result = torch.library.opcheck(op, args, test_utils=ALL_UTILS)
    assert result == {u: "SUCCESS" for u in ALL_UTILS}, result


@pytest.mark.parametrize("T", [5, 0])
def test_opcheck_dispatch_ops_with_grad(T):
    inp = ref.make_global_inputs(3, [T], H, K, E1, neg_frac=0.3)[0]
    x, w = inp.x.clone().requires_grad_(), inp.topk_weights.clone().requires_grad_()
    _check(torch.ops.deepep_ops.dispatch.default, (x, None, inp.topk_idx, w, _buffer1(), E1, 8, 1))
    _check(torch.ops.deepep_ops.dispatch_exact.default, (x, None, inp.topk_idx, w, _buffer1(), E1, 16, 4))


@pytest.mark.parametrize("exact,T", [(False, 5), (True, 5), (False, 0), (True, 0)])
def test_opcheck_combine_and_cached_dispatch_with_grad(exact, T):
    buf = _buffer1()
    inp = ref.make_global_inputs(4, [T], H, K, E1, neg_frac=0.3)[0]
    if exact:
        r = D.dispatch_exact(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E1,
                             num_max_tokens_per_rank=16, expert_alignment=2)
    else:
        r = D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E1, num_max_tokens_per_rank=8)
    rows = r.recv_x.clone().requires_grad_()
    _check(torch.ops.deepep_ops.combine.default, (rows, buf) + tuple(r.handle))
    x = inp.x.clone().requires_grad_()
    _check(torch.ops.deepep_ops.cached_dispatch.default, (x, None, buf) + tuple(r.handle))
    _check(torch.ops.deepep_ops.combine_with_weights.default,
           (r.recv_x, r.recv_topk_weights.contiguous(), buf) + tuple(r.handle))


@pytest.mark.parametrize("exact", [False, True])
def test_cached_dispatch_fp8_scales_follow_rows(exact):
    """Cached dispatch moves fp8 rows and their scales exactly as the original dispatch."""
    buf = _buffer1()
    inp = ref.make_global_inputs(5, [6], H, K, E1, fp8=True, neg_frac=0.3)[0]
    kw = dict(num_experts=E1, x_scales=inp.x_scales)
    if exact:
        r = D.dispatch_exact(inp.x, inp.topk_idx, inp.topk_weights, buf, num_max_tokens_per_rank=16,
                             expert_alignment=4, **kw)
        n = r.recv_x.shape[0]
    else:
        r = D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, buf, num_max_tokens_per_rank=8, **kw)
        n = int(r.handle.psum_num_recv_tokens_per_scaleup_rank[-1])
    cx, cs = D.cached_dispatch(inp.x, r.handle, buf, x_scales=inp.x_scales)
    assert cx.shape == r.recv_x.shape and cs.shape == r.recv_x_scales.shape
    assert torch.equal(cx[:n].view(torch.uint8), r.recv_x[:n].view(torch.uint8))
    assert torch.equal(cs[:n], r.recv_x_scales[:n])


def test_cached_dispatch_rejects_wrong_token_count():
    buf = _buffer1()
    inp = ref.make_global_inputs(6, [5], H, K, E1)[0]
    r = D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E1, num_max_tokens_per_rank=8)
    with pytest.raises(ValueError, match=r"x.shape\[0\] \(tokens\) must be the handle's 5 dispatched tokens, got 4"):
        D.cached_dispatch(inp.x[:4], r.handle, buf)


def test_prepare_rejects_fp8_training():
    pf = D.DeepEPPrepareFinalize(_buffer1(), E1, K, decode=True, use_fp8_dispatch=True)
    inp = ref.make_global_inputs(7, [3], H, K, E1)[0]
    with pytest.raises(ValueError, match="use_fp8_dispatch"):
        pf.prepare(inp.x.clone().requires_grad_(), inp.topk_weights, inp.topk_idx)


# ------------------------------------------------------------------------------ gradient strides (world size 1)
# torch 2.15's register_autograd: the strides of the gradients a backward receives are undefined,
# and a backward that calls a layout-sensitive kernel must make them contiguous (DeepEP's combine
# asserts a contiguous x; the dispatch backward is a combine, the combine backward a cached dispatch).
E_STRIDES = 4


class _TransposedGrad(torch.autograd.Function):
    """The identity, whose backward hands on its gradient's values in transposed strides
    ((1, rows) for [rows, H]). An explicit stand-in for what a layout-changing consumer may
    hand a backward: a matmul's backward matches its input's layout (``(Wᵀ·rowsᵀ)ᵀ`` gives
    ``rows`` a contiguous gradient), so it cannot be relied on to make one."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad.t().contiguous().t()


def _expert(rows, W, layout):
    """The same function of every row. ``transpose``: rows @ W, the gradient reaching ``rows``
    transposed (:class:`_TransposedGrad`); ``expand``: the row's bf16 sum over H broadcast over
    H, so the gradient reaching ``rows`` is a stride-0 expand (sum's backward)."""
    if layout == "transpose":
        return _TransposedGrad.apply(rows).float() @ W
    return rows.sum(1, keepdim=True).float().expand(-1, rows.shape[1])


def _strided_grads_loss(x, idx, w, W, G, c, buf, decode, layout, hook=None):
    """dispatch → expert → combine → a loss whose gradients arrive non-contiguous at every op
    output: ``recv_x`` (the expert), the combined tokens (``out.t()`` or ``out.sum(0)``) and
    ``recv_topk_weights`` (its sum: stride 0; decode ``transpose``: its transpose)."""
    if decode:
        r = D.dispatch(x, idx, w, buf, num_experts=E_STRIDES, num_max_tokens_per_rank=8)
    else:
        r = D.dispatch_exact(x, idx, w, buf, num_experts=E_STRIDES, num_max_tokens_per_rank=16, expert_alignment=4)
    out = D.combine(_expert(r.recv_x, W, layout).bfloat16().contiguous(), r.handle, buf)
    if hook is not None:
        for name, t in (("recv_x", r.recv_x), ("recv_topk_weights", r.recv_topk_weights), ("combined", out)):
            t.register_hook(functools.partial(hook, name))
    if layout == "transpose":
        loss = (out.t().float() * G.t().contiguous()).sum()
    else:
        loss = (out.sum(0).float() * G[0]).sum()
    if decode and layout == "transpose":
        rw = r.recv_topk_weights
        return loss + (rw.t() * torch.full((rw.shape[1], rw.shape[0]), c)).sum()
    return loss + c * r.recv_topk_weights.sum()


def _dense_strided_grads(inp, W, G, c, decode, layout):
    """float64 autograd of the same loss on one process: token t's rows (1 if it is routed, in
    decode; one per valid lane, in prefill) each give f(x[t]), and combine sums them."""
    x, w, W = (t.double().requires_grad_() for t in (inp.x, inp.topk_weights, W))
    valid = inp.topk_idx >= 0
    m = (valid.any(1) if decode else valid.sum(1)).double().unsqueeze(1)
    f = x @ W if layout == "transpose" else x.sum(1, keepdim=True).expand(-1, x.shape[1])
    out = m * f
    loss = (out * G.double()).sum() if layout == "transpose" else (out.sum(0) * G[0].double()).sum()
    (loss + c * torch.where(valid, w, 0.0).sum()).backward()
    return x.grad, w.grad, W.grad


def _strides_buffer(backend, monkeypatch):
    if backend == "reference":
        return _buffer1()
    deep_ep = deepep_v25_standin.install(monkeypatch, "2.5")
    return D.EPOpsBuffer(deep_ep.EPBuffer(None, num_max_tokens_per_rank=16, hidden=H, num_topk=K))


@pytest.mark.parametrize("layout", ["transpose", "expand"])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("backend,compiled", [("reference", False), ("reference", True), ("deepep_v25", False)],
                         ids=["reference-eager", "reference-aot_eager", "deepep_v25_standin-eager"])
def test_non_contiguous_gradients(monkeypatch, layout, decode, backend, compiled):
    """Gradients that arrive transposed or expanded at dispatch's, dispatch_exact's and combine's
    outputs give the float64 dense gradients of x, topk_weights and the expert weight (eager: a
    hook confirms each one arrived non-contiguous)."""
    buf = _strides_buffer(backend, monkeypatch)
    inp = ref.make_global_inputs(11, [6], H, K, E_STRIDES, neg_frac=0.3, empty_rows=1)[0]
    g = torch.Generator().manual_seed(12)
    W = (torch.randn(H, H, generator=g) / H ** 0.5).requires_grad_(layout == "transpose")
    G = torch.randn(6, H, generator=g).bfloat16().float()
    c = 0.75
    x, w = inp.x.clone().requires_grad_(), inp.topk_weights.clone().requires_grad_()
    seen = {}
    hook = None if compiled else (lambda name, grad: seen.update({name: grad.is_contiguous()}))
    fn = _strided_grads_loss
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(_strided_grads_loss, fullgraph=True, dynamic=True, backend="aot_eager")
    fn(x, inp.topk_idx, w, W, G, c, buf, decode, layout, hook).backward()
    if not compiled:
        assert seen == {"recv_x": False, "recv_topk_weights": False, "combined": False}
    want_x, want_w, want_W = _dense_strided_grads(inp, W.detach(), G, c, decode, layout)
    _assert_rel(x.grad, want_x, "x")
    _assert_rel(w.grad, want_w, "topk_weights")
    if layout == "transpose":
        _assert_rel(W.grad, want_W, "W")

# ------------------------------------------------------------------------------ multi-rank scenarios
def _dense_grads(inputs, W, G):
    """float64 dense MoE over every rank's tokens: grads of each rank's x and topk_weights, and of W."""
    xs = [i.x.double().requires_grad_() for i in inputs]
    ws = [i.topk_weights.double().requires_grad_() for i in inputs]
    gate, up, down = (t.double().requires_grad_() for t in (W.w_gate, W.w_up, W.w_down))
    loss = 0.0
    for x, w, inp, g in zip(xs, ws, inputs, G):
        y = torch.zeros_like(x)
        for e in range(gate.shape[0]):
            lane = inp.topk_idx == e
            coef = torch.where(lane, w, 0.0).sum(dim=1, keepdim=True)
            y = y + coef * ((torch.nn.functional.silu(x @ gate[e]) * (x @ up[e])) @ down[e])
        loss = loss + (y * g.double()).sum()
    loss.backward()
    return [x.grad for x in xs], [w.grad for w in ws], (gate.grad, up.grad, down.grad)


def _max_source(n: int) -> int:
    """The DP-global max token count (the bucket must be the same on every rank)."""
    import torch.distributed as dist

    t = torch.tensor([n])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


class _Setup:
    def __init__(self, rank, world, decode, A, seed=0, trainable=True, S=1):
        import torch.distributed as dist
        from deepep_ops.moe import LocalExperts, make_moe_weights
        from deepep_ops.train_demo import MoEBlock

        self.E = 2 * world
        self.EL = 2
        self.W = make_moe_weights(self.E, H, I, seed=seed)
        # S > 1: hybrid mode (S nodes of world / S ranks, 3 simulated channels).
        buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=CAP,
                                                  num_scaleout_ranks=S, num_channels=3),
                         num_tokens_source=_max_source)
        assert buf.num_scaleout_ranks == S
        pf = D.DeepEPPrepareFinalize(buf, self.E, K, decode=decode, expert_alignment=A)
        experts = LocalExperts(self.W, rank * self.EL, self.EL)
        for p in experts.parameters():
            p.requires_grad_(trainable)
        self.block = MoEBlock(pf, experts)
        self.rank = rank


def _inputs(seed, Ts, E):
    inputs = ref.make_global_inputs(seed, Ts, H, K, E, neg_frac=0.25)
    g = torch.Generator().manual_seed(seed + 1)
    G = [torch.randn(T, H, generator=g) for T in Ts]
    return inputs, G


def _checkpointed(block):
    def fn(x, w, idx):
        return torch.utils.checkpoint.checkpoint(block, x, w, idx, use_reentrant=False)

    return fn


def _step(block, inp, G, fn=None):
    """One forward + backward of ``fn`` (default ``block``); returns (x.grad, w.grad,
    [expert grads]) and zeroes the module's grads."""
    fn = block if fn is None else fn
    x = inp.x.clone().requires_grad_()
    w = inp.topk_weights.clone().requires_grad_()
    out = fn(x, w, inp.topk_idx)
    (out.float() * G).sum().backward()
    params = [p.grad.clone() for p in block.experts.parameters()]
    block.zero_grad(set_to_none=True)
    return x.grad, w.grad, params


def _assert_rel(got, want, what, rtol=GRAD_RTOL):
    assert got is not None, f"{what}: no gradient"
    got, want = got.double(), want.double()
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= rtol * max(scale, 1e-6), f"{what}: max err {err:.3g} > {rtol} * max|ref| {scale:.3g}"
    return err / max(scale, 1e-30)


def _eager_grads_case(rank, world, *, decode, Ts, A, seed, S=1):
    s = _Setup(rank, world, decode, A, seed=seed, S=S)
    inputs, G = _inputs(seed, Ts, s.E)
    gx, gw, gp = _step(s.block, inputs[rank], G[rank])
    dx, dw, (dgate, dup, ddown) = _dense_grads(inputs, s.W, G)
    sl = slice(rank * s.EL, (rank + 1) * s.EL)
    errs = [
        _assert_rel(gx, dx[rank], f"rank {rank} x.grad"),
        _assert_rel(gw, dw[rank] * (inputs[rank].topk_idx >= 0), f"rank {rank} topk_weights.grad"),
    ]
    for got, want, name in zip(gp, (dgate[sl], dup[sl], ddown[sl]), ("w_gate", "w_up", "w_down")):
        errs.append(_assert_rel(got, want, f"rank {rank} {name}.grad"))
    print(f"GRADS rank {rank} decode={decode} Ts={Ts} A={A} S={S}: rel errs {[f'{e:.2e}' for e in errs]}")


def _ts_for(world, base):
    return [max(base - 3 * r, 1) for r in range(world)]


#: Eager gradients of a compiled scenario's steps, kept for the scenario of the other
#: backend with the same (decode, ckpt): the eager function, its weights and its
#: inputs are the same there, so are its gradients (the reference buffer and the
#: CPU kernels are deterministic). The first of the two computes them, the second
#: takes them and drops the entry. Per spawned rank.
_EAGER_GRADS: dict = {}


def _compiled_case(rank, world, *, decode, backend, ckpt, Ts, S=1):
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    s = _Setup(rank, world, decode, 1 if decode else 4, seed=11, S=S)
    torch._dynamo.reset()
    counters.clear()
    cnt = CompileCounterWithBackend(backend)
    eager = _checkpointed(s.block) if ckpt else s.block
    # With ckpt the checkpoint is inside the compiled region (Dynamo's checkpoint HOP).
    compiled = torch.compile(eager, backend=cnt, fullgraph=True, dynamic=True)
    key = (decode, ckpt, tuple(Ts), S)
    shared = _EAGER_GRADS.pop(key, None)
    computed = []
    worst = 0.0
    for i, base in enumerate(Ts):
        step_ts = _ts_for(world, base)
        inputs, G = _inputs(100 + i, step_ts, s.E)
        if shared is None:
            want = _step(s.block, inputs[rank], G[rank], fn=eager)
            computed.append(want)
        else:
            want = shared[i]
        got = _step(s.block, inputs[rank], G[rank], fn=compiled)
        for a, b, name in zip((got[0], got[1], *got[2]), (want[0], want[1], *want[2]), ("x", "w", "gate", "up", "down")):
            worst = max(worst, _assert_rel(a, b, f"rank {rank} T={step_ts[rank]} {name}.grad (compiled vs eager)",
                                           COMPILED_RTOL[backend]))
    if shared is None:
        _EAGER_GRADS[key] = computed
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert 1 <= cnt.frame_count <= 2, f"{cnt.frame_count} frames"
    print(f"COMPILED rank {rank} {backend} decode={decode} ckpt={ckpt} S={S}: {cnt.frame_count} frames over "
          f"{len(Ts)} steps, worst rel err vs eager {worst:.2e}")
    torch._dynamo.reset()


def _eager(decode, Ts, A, seed):
    return lambda rank, world: _eager_grads_case(rank, world, decode=decode, Ts=Ts(world), A=A, seed=seed)


SCENARIOS = {
    "decode": _eager(True, lambda w: [5 + r for r in range(w)], 1, 1),
    "decode_T0": _eager(True, lambda w: [0] + [6] * (w - 1), 1, 3),
    "prefill_aligned": _eager(False, lambda w: [6 + 2 * r for r in range(w)], 4, 3),
    "prefill_T0": _eager(False, lambda w: [7] * (w - 1) + [0], 2, 4),
}
COMPILE_SCENARIOS = {
    f"{backend}_{'decode' if decode else 'prefill'}{'_ckpt' if ckpt else ''}": (
        lambda rank, world, decode=decode, backend=backend, ckpt=ckpt: _compiled_case(
            rank, world, decode=decode, backend=backend, ckpt=ckpt,
            Ts=SWEEP_TS,
        )
    )
    for backend in ("aot_eager", "inductor")
    for decode in (True, False)
    for ckpt in (False, True)
}
SCENARIOS.update(COMPILE_SCENARIOS)
EAGER_NAMES = ("decode", "decode_T0", "prefill_aligned", "prefill_T0")


#: World size 2 runs the eager and the compiled scenarios in one spawn.
_WORLD2 = EAGER_NAMES + tuple(COMPILE_SCENARIOS)


def _hybrid_opcheck(rank, world):
    """opcheck (schema, autograd registration, fake vs real, AOT dispatch) of every op in hybrid
    mode, the handle's two hybrid-only tensors given as the ops' optional arguments. Every rank
    runs the same checks, so the collectives they make stay in step."""
    import torch.distributed as dist

    E = 2 * world
    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=16, hidden=H, num_topk=K,
                                              num_scaleout_ranks=2, num_channels=3))
    inp = ref.make_global_inputs(9, [5, 3, 0, 4], H, K, E, neg_frac=0.3)[rank]
    x, w = inp.x.clone().requires_grad_(), inp.topk_weights.clone().requires_grad_()
    _check(torch.ops.deepep_ops.dispatch.default, (x, None, inp.topk_idx, w, buf, E, 8, 1))
    _check(torch.ops.deepep_ops.dispatch_exact.default, (x, None, inp.topk_idx, w, buf, E, 16, 2))
    for r in (D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E, num_max_tokens_per_rank=8),
              D.dispatch_exact(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E,
                               num_max_tokens_per_rank=16, expert_alignment=2)):
        assert r.handle.hybrid
        handle = tuple(r.handle)
        _check(torch.ops.deepep_ops.combine.default, (r.recv_x.clone().requires_grad_(), buf) + handle)
        _check(torch.ops.deepep_ops.cached_dispatch.default, (inp.x.clone().requires_grad_(), None, buf) + handle)
        _check(torch.ops.deepep_ops.combine_with_weights.default,
               (r.recv_x, r.recv_topk_weights.contiguous(), buf) + handle)


#: Hybrid mode (docs/deepep_contract.md §9) on 4 ranks, 2 nodes x 2: the backward ops run from hybrid
#: handles (combine_with_weights: hybrid rounding; cached_dispatch: the hybrid sender). Eager gradients
#: against the float64 dense MoE; compiled (aot_eager, fullgraph, T swept 1..HYBRID_TS) against eager.
HYBRID_TS = tuple(range(1, 13))
HYBRID_SCENARIOS = {
    "hybrid_opcheck": _hybrid_opcheck,
    "hybrid_decode": lambda rank, world: _eager_grads_case(rank, world, decode=True, Ts=[5, 0, 7, 6], A=1, seed=5,
                                                           S=2),
    "hybrid_prefill": lambda rank, world: _eager_grads_case(rank, world, decode=False, Ts=[6, 8, 0, 7], A=4,
                                                            seed=6, S=2),
    "hybrid_compiled_decode": lambda rank, world: _compiled_case(rank, world, decode=True, backend="aot_eager",
                                                                 ckpt=False, Ts=HYBRID_TS, S=2),
    "hybrid_compiled_prefill": lambda rank, world: _compiled_case(rank, world, decode=False, backend="aot_eager",
                                                                  ckpt=False, Ts=HYBRID_TS, S=2),
}
SCENARIOS.update(HYBRID_SCENARIOS)
#: World size 4 runs the eager scenarios, direct and hybrid, in one spawn; opcheck and the
#: compiled hybrid ones (slow tier: compiles on 4 ranks sharing the cores) in another, so that
#: deselecting them skips their spawn too.
_HYBRID_SLOW = ("hybrid_opcheck",) + tuple(n for n in HYBRID_SCENARIOS if "compiled" in n)
_WORLD4 = EAGER_NAMES + tuple(n for n in HYBRID_SCENARIOS if n not in _HYBRID_SLOW)


def start_early() -> None:
    """Called by tests/conftest.py once collected: the 2-rank spawn runs in the background."""
    _dist.start_scenarios_early(__name__.split(".")[-1], _WORLD2, 2)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", EAGER_NAMES)
def test_eager_gradients_match_dense_float64(world, name):
    assert_scenario_passed(__name__.split(".")[-1], _WORLD2 if world == 2 else _WORLD4, world, name)


@pytest.mark.parametrize("name", [n for n in HYBRID_SCENARIOS if n not in _HYBRID_SLOW])
def test_hybrid_eager_gradients_match_dense_float64(name):
    assert_scenario_passed(__name__.split(".")[-1], _WORLD4, 4, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", _HYBRID_SLOW)
def test_hybrid_opcheck_and_compiled_forward_backward(name):
    """opcheck of every op with hybrid handles; hybrid mode compiles as direct mode does: fullgraph,
    no graph break, at most 2 frames over T = 1..12 (the T = 1 specialisation and one dynamic
    graph), gradients bitwise equal to eager (aot_eager)."""
    assert_scenario_passed(__name__.split(".")[-1], _HYBRID_SLOW, 4, name)


@pytest.mark.parametrize("name", tuple(COMPILE_SCENARIOS))
def test_compiled_forward_backward(name):
    assert_scenario_passed(__name__.split(".")[-1], _WORLD2, 2, name)
