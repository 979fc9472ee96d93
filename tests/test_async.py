"""The async ops (``dispatch_start`` / ``dispatch_wait``, ``dispatch_exact_start`` /
``dispatch_exact_wait``, ``combine_start`` / ``combine_wait``) and the prepare/finalize
overlap built on them, against an independent float64 dense MoE plus a float64
shared expert.

- 2 gloo ranks: decode and prefill, eager and Inductor, a shared expert during the
  dispatch and the caller's own work during the combine; every bad use raises the
  same clear error on every rank, and the process group stays usable after it.
- one process: Inductor's output code runs the shared expert's kernels between
  each start and its wait (``graphs/async_overlap.inductor.txt``), one graph over
  T with no break, a compiled double wait raises at run time, no gradient.
"""

from __future__ import annotations

import re

import pytest
import torch

import deepep_ops as D
import dense_reference as ref
from _dist import assert_scenario_passed
from graph_snapshot import assert_graph_snapshot

H, K, CAP, INNER = 256, 3, 16, 64


class SharedExpert(torch.nn.Module):
    """A DeepSeek-style shared expert: down(silu(gate(x)) * up(x)), [T, H] → [T, H]."""

    def __init__(self, hidden: int, inner: int, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1234)  # the same weights on every rank
        self.gate_up = torch.nn.Parameter((torch.randn(hidden, 2 * inner, generator=g) / hidden**0.5).to(dtype))
        self.down = torch.nn.Parameter((torch.randn(inner, hidden, generator=g) / inner**0.5).to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.gate_up).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ self.down


def _shared_reference(shared: SharedExpert, x: torch.Tensor) -> torch.Tensor:
    """The shared expert in float64 (its bf16 weights, upcast)."""
    x = x.double()
    gate, up = (x @ shared.gate_up.double()).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ shared.down.double()


def _overlapped_step(pf: D.DeepEPPrepareFinalize, scale: torch.Tensor):
    """prepare (dispatch started, the shared expert, waited) → elementwise experts →
    finalize_start → the caller's next work → finalize_wait; [T, H] float32."""

    def step(x, topk_weights, topk_idx):
        p = pf.prepare(x, topk_weights, topk_idx)
        y = (p.expert_x.float().unsqueeze(1) * scale[p.topk_ids.clamp(min=0)]).to(torch.bfloat16)
        pending = pf.finalize_start(y, p.topk_weights, p.topk_ids, p.handle)
        after = p.shared_output.float() + 1.0  # independent of the combine
        out = torch.empty_like(x)
        pf.finalize_wait(out, pending, overlap=[after])
        return out.float() + after - 1.0

    return step


def _moe_matches_dense(rank: int, world: int, backend: str) -> None:
    import torch.distributed as dist

    E = 4 * world
    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K))
    experts = ref.Experts(3, E, H, "diag")
    shared = SharedExpert(H, INNER)
    for decode in (True, False):
        pf = D.DeepEPPrepareFinalize(buf, E, K, decode=decode, shared_experts=shared)
        step = _overlapped_step(pf, experts.s.float())
        if backend != "eager":
            counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
            step = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
        # T differs per rank and per call (T >= 2: T = 1 would specialize)
        for seed, Ts in ((5, (5, 9)), (6, (12, 2)), (7, (3, 16))):
            inp = ref.make_global_inputs(seed, Ts[:world], H, K, E, neg_frac=0.25)[rank]
            with torch.no_grad():
                got = step(inp.x, inp.topk_weights, inp.topk_idx)
            expected = ref.dense_moe(inp, experts) + _shared_reference(shared, inp.x)
            torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2,
                                       msg=lambda m: f"decode={decode} Ts={Ts} {backend}: {m}")
            assert buf.pending is None
        if backend != "eager":
            assert counter.frame_count == 1, f"decode={decode}: {counter.frame_count} compiles over T"
    if backend != "eager":
        breaks = torch._dynamo.utils.counters["graph_break"]
        assert not breaks, dict(breaks)


def _misuse_every_rank(rank: int, world: int) -> None:
    """Every bad use raises the same ValueError on every rank, before any collective of
    its own; the pending call is still waited for correctly; nothing hangs."""
    import torch.distributed as dist

    E = 4 * world
    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K))
    inp = ref.make_global_inputs(11, (4, 6)[:world], H, K, E, neg_frac=0.25)[rank]
    args = (inp.x, inp.topk_idx, inp.topk_weights, buf)
    kw = dict(num_experts=E, num_max_tokens_per_rank=8)

    with torch.no_grad():
        pending = D.dispatch_start(*args, **kw)
        # a start whose wait has not come before the next collective
        with pytest.raises(ValueError, match=r"deepep_ops\.dispatch: .*dispatch_start in flight"):
            D.dispatch(*args, **kw)
        with pytest.raises(ValueError, match=r"dispatch_exact_start: .*dispatch_start in flight"):
            D.dispatch_exact_start(*args, **kw)
        # a wait for another kind of call, or with a ticket its start did not return
        with pytest.raises(ValueError, match=r"dispatch_exact_wait: the ticket is not the one"):
            D.dispatch_wait(pending._replace(args=pending.args._replace(decode=False)))
        forged = pending._replace(ticket=torch.empty((0,), dtype=torch.uint8))
        with pytest.raises(ValueError, match=r"dispatch_wait: the ticket is not the one"):
            D.dispatch_wait(forged)
        result = D.dispatch_wait(pending)
        # a second wait, and a wait without a start
        with pytest.raises(ValueError, match=r"dispatch_wait: no async call is in flight"):
            D.dispatch_wait(pending)
        combine_pending = D.combine_start(result.recv_x, result.handle, buf)
        with pytest.raises(ValueError, match=r"deepep_ops\.combine: .*combine_start in flight"):
            D.combine(result.recv_x, result.handle, buf)
        out = D.combine_wait(combine_pending)
        with pytest.raises(ValueError, match=r"combine_wait: no async call is in flight"):
            D.combine_wait(combine_pending)
    # combine of the received rows as they came: one copy of x[t] back from each destination rank
    EL = E // world
    ranks = torch.tensor([len({e // EL for e in row if e >= 0}) for row in inp.topk_idx.tolist()])
    torch.testing.assert_close(out.double(), inp.x.double() * ranks.unsqueeze(1), rtol=2e-2, atol=2e-2)

    # no gradient: refused up front, on every rank
    x = inp.x.clone().requires_grad_()
    with pytest.raises(ValueError, match=r"dispatch_start.*(grad|gradient)"):
        D.dispatch_start(x, inp.topk_idx, inp.topk_weights, buf, **kw)
    assert buf.pending is None
    # the group is still in step
    dist.barrier()


SCENARIOS = {
    "eager": lambda rank, world: _moe_matches_dense(rank, world, "eager"),
    "inductor": lambda rank, world: _moe_matches_dense(rank, world, "inductor"),
    "misuse": _misuse_every_rank,
}
NAMES = tuple(SCENARIOS)


@pytest.mark.parametrize("name", NAMES)
def test_two_ranks(name):
    assert_scenario_passed(__name__, NAMES, 2, name)


# ----------------------------------------------------------------------------- one process
def _world1(decode: bool, shared: SharedExpert):
    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K))
    experts = ref.Experts(3, 8, H, "diag")
    pf = D.DeepEPPrepareFinalize(buf, 8, K, decode=decode, shared_experts=shared)
    return buf, experts, _overlapped_step(pf, experts.s.float())


#: Lines of Inductor's output code that show the schedule: our ops, the matmuls, the fused CPU kernels.
_SCHEDULE = re.compile(r"torch\.ops\.(deepep_ops\.\w+)\.default\(|(extern_kernels\.mm|cpp_fused_\w+)\(")


def _schedule(code: str) -> list:
    """Our ops, matmuls and fused kernels of Inductor's ``call``, in the order it runs them."""
    body = code[code.index("def call("):]
    return [m.group(1) or m.group(2) for line in body.splitlines()
            if not line.lstrip().startswith("#") for m in [_SCHEDULE.search(line)] if m]


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_inductor_runs_the_shared_expert_between_start_and_wait(decode):
    """The output code's order: dispatch start, the shared expert's two matmuls (and its
    fused silu·mul), dispatch wait; combine start, the caller's elementwise work, combine wait.
    The schedule is recorded in graphs/async_overlap.<mode>.inductor.txt."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    shared = SharedExpert(H, INNER)
    _buf, experts, step = _world1(decode, shared)
    inp = ref.make_global_inputs(3, (7,), H, K, 8, neg_frac=0.25)[0]
    with torch.no_grad():
        got, (code,) = run_and_get_code(torch.compile(step, fullgraph=True, dynamic=True),
                                        inp.x, inp.topk_weights, inp.topk_idx)
    expected = ref.dense_moe(inp, experts) + _shared_reference(shared, inp.x)
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)
    order = _schedule(code)
    start = "deepep_ops.dispatch_start" if decode else "deepep_ops.dispatch_exact_start"
    wait = start.replace("start", "wait")
    i, j = order.index(start), order.index(wait)
    between = order[i + 1:j]
    assert between.count("extern_kernels.mm") == 2 and "extern_kernels.mm" not in order[j:], order
    assert all(op.startswith(("extern_kernels.mm", "cpp_fused_")) for op in between), order
    c, d = order.index("deepep_ops.combine_start"), order.index("deepep_ops.combine_wait")
    assert c < d and any(op.startswith("cpp_fused_") for op in order[c + 1:d]), order  # the caller's work
    _snapshot(decode, order)


def _snapshot(decode: bool, order: list) -> None:
    assert_graph_snapshot(f"async_overlap.{'decode' if decode else 'prefill'}.inductor", "\n".join(order))


def test_one_graph_over_t_and_a_compiled_double_wait_raises():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    shared = SharedExpert(H, INNER)
    buf, experts, step = _world1(True, shared)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    for T in (2, 5, 11, 16):
        inp = ref.make_global_inputs(T, (T,), H, K, 8, neg_frac=0.25)[0]
        with torch.no_grad():
            got = compiled(inp.x, inp.topk_weights, inp.topk_idx)
        expected = ref.dense_moe(inp, experts) + _shared_reference(shared, inp.x)
        torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)
    assert counter.frame_count == 1 and not torch._dynamo.utils.counters["graph_break"]

    def waits_twice(x, topk_weights, topk_idx):
        pending = D.dispatch_start(x, topk_idx, topk_weights, buf, num_experts=8, num_max_tokens_per_rank=CAP)
        first = D.dispatch_wait(pending)
        second = D.dispatch_wait(pending)
        return first.recv_x, second.recv_x

    with torch.no_grad(), pytest.raises(ValueError, match=r"dispatch_wait: no async call is in flight"):
        torch.compile(waits_twice, backend="aot_eager", fullgraph=True)(inp.x, inp.topk_weights, inp.topk_idx)


def test_shared_expert_with_gradients_runs_after_the_dispatch():
    """The async ops have no gradient: with ``a1`` requiring grad, prepare dispatches
    synchronously, then runs the shared expert; values and gradients match float64."""
    shared = SharedExpert(H, INNER)
    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K))
    experts = ref.Experts(3, 8, H, "diag")
    pf = D.DeepEPPrepareFinalize(buf, 8, K, decode=False, shared_experts=shared)
    inp = ref.make_global_inputs(4, (6,), H, K, 8, neg_frac=0.25)[0]
    x = inp.x.clone().requires_grad_()
    p = pf.prepare(x, inp.topk_weights, inp.topk_idx)
    scale = experts.s.float()
    y = (p.expert_x.float().unsqueeze(1) * scale[p.topk_ids.clamp(min=0)]).to(torch.bfloat16)
    out = torch.empty_like(inp.x)
    pf.finalize(out, y, p.topk_weights, p.topk_ids, p.handle)
    total = out.float() + p.shared_output.float()
    total.sum().backward()

    x64 = inp.x.double().requires_grad_()
    w = torch.where(inp.topk_idx >= 0, inp.topk_weights, 0.0).double()
    routed = (w.unsqueeze(-1) * experts.s.double()[inp.topk_idx.clamp(min=0)] * x64.unsqueeze(1)).sum(1)
    expected = routed + _shared_reference(shared, x64)
    expected.sum().backward()
    torch.testing.assert_close(total.double(), expected.detach(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
def test_moe_layer_with_a_shared_expert_compiles_and_matches_dense(overlap):
    """``deepep_ops.moe.MoELayer`` with a shared expert (the MoE-layer benchmark's layer),
    compiled ``fullgraph=True``, the shared expert after the combine or between dispatch
    start and wait: the dense MoE plus the shared expert, with no deepep_ops code.
    (torch 2.11's Dynamo could not unpack the ParameterList the shared expert once was.)"""
    from deepep_ops.moe import MoELayer, make_moe_weights, make_shared_weights

    torch._dynamo.reset()
    E, I = 8, 32
    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K))
    weights = make_moe_weights(E, H, I, seed=3)
    shared = make_shared_weights(H, INNER)
    layer = MoELayer(weights, D.DeepEPPrepareFinalize(buf, E, K, decode=True), shared, overlap=overlap)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(0)
    for T in (3, 9):
        x = torch.randn(T, H, generator=g).bfloat16()
        with torch.no_grad():
            got = compiled(x)
        y, mag, near_tie = ref.dense_moe_layer(x, *weights, K)
        xs = x.double()
        w_gate, w_up, w_down = (w.double() for w in shared)
        want = y + (torch.nn.functional.silu(xs @ w_gate) * (xs @ w_up)) @ w_down
        keep = ~near_tie
        # bf16 output of an fp32 sum: 1 % of the routed magnitude plus the shared term's rounding.
        tol = 1e-3 + 1e-2 * (mag + want.abs())
        assert ((got.double() - want).abs() <= tol)[keep].all(), (got.double() - want).abs().max()
        assert keep.any()
