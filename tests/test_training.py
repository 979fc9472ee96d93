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

import pytest
import torch

import deepep_ops as D
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
    return D.EPBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=16, hidden=H, num_topk=K))


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
    def __init__(self, rank, world, decode, A, seed=0, trainable=True):
        import torch.distributed as dist
        from deepep_ops.moe import LocalExperts, make_moe_weights
        from deepep_ops.train_demo import MoEBlock

        self.E = 2 * world
        self.EL = 2
        self.W = make_moe_weights(self.E, H, I, seed=seed)
        buf = D.EPBuffer(D.ReferenceElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=CAP),
                         num_tokens_source=_max_source)
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


def _eager_grads_case(rank, world, *, decode, Ts, A, seed):
    s = _Setup(rank, world, decode, A, seed=seed)
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
    print(f"GRADS rank {rank} decode={decode} Ts={Ts} A={A}: rel errs {[f'{e:.2e}' for e in errs]}")


def _ts_for(world, base):
    return [max(base - 3 * r, 1) for r in range(world)]


#: Eager gradients of a compiled scenario's steps, kept for the scenario of the other
#: backend with the same (decode, ckpt): the eager function, its weights and its
#: inputs are the same there, so are its gradients (the reference buffer and the
#: CPU kernels are deterministic). The first of the two computes them, the second
#: takes them and drops the entry. Per spawned rank.
_EAGER_GRADS: dict = {}


def _compiled_case(rank, world, *, decode, backend, ckpt, Ts):
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    s = _Setup(rank, world, decode, 1 if decode else 4, seed=11)
    torch._dynamo.reset()
    counters.clear()
    cnt = CompileCounterWithBackend(backend)
    eager = _checkpointed(s.block) if ckpt else s.block
    # With ckpt the checkpoint is inside the compiled region (Dynamo's checkpoint HOP).
    compiled = torch.compile(eager, backend=cnt, fullgraph=True, dynamic=True)
    key = (decode, ckpt, tuple(Ts))
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
    print(f"COMPILED rank {rank} {backend} decode={decode} ckpt={ckpt}: {cnt.frame_count} frames over "
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


def start_early() -> None:
    """Called by tests/conftest.py once collected: the 2-rank spawn runs in the background."""
    _dist.start_scenarios_early(__name__.split(".")[-1], _WORLD2, 2)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", EAGER_NAMES)
def test_eager_gradients_match_dense_float64(world, name):
    assert_scenario_passed(__name__.split(".")[-1], _WORLD2 if world == 2 else EAGER_NAMES, world, name)


@pytest.mark.parametrize("name", tuple(COMPILE_SCENARIOS))
def test_compiled_forward_backward(name):
    assert_scenario_passed(__name__.split(".")[-1], _WORLD2, 2, name)
