"""The wrappers' eager fast path (kernels called without the dispatcher) against the
dispatcher path: same outputs, and the dispatcher is still used wherever it matters."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import deepep_ops as D
import dense_reference as ref
from deepep_ops.handle import DispatchedHandle, DispatchHandle

H, K, E, CAP = 256, 2, 4, 8


@pytest.fixture
def buf():
    return D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K))


def _inputs(T=5, seed=0):
    (inp,) = ref.make_global_inputs(seed, (T,), H, K, E, neg_frac=0.3)
    return inp.x, inp.topk_idx, inp.topk_weights


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _via_dispatcher(fn):
    import deepep_ops.api as api

    saved = api._eager_mode_is_plain
    api._eager_mode_is_plain = lambda: False
    try:
        return fn()
    finally:
        api._eager_mode_is_plain = saved


def test_fast_path_equals_dispatcher_path(buf):
    x, idx, w = _inputs()

    def run():
        d = D.dispatch(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=8)
        return d, D.combine(d.recv_x, d.handle, buf)

    (fast, fast_out), (slow, slow_out) = run(), _via_dispatcher(run)
    assert type(fast.handle) is DispatchedHandle and type(slow.handle) is DispatchHandle
    n = int(slow.handle.psum_num_recv_tokens_per_scaleup_rank[-1])
    assert torch.equal(fast.recv_x[:n], slow.recv_x[:n]) and torch.equal(fast_out, slow_out)
    for a, b in zip(fast.handle, slow.handle):
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)
    # x * [routed somewhere], computed here (R = 1: one destination rank at most)
    expected = (x.float() * (idx >= 0).any(dim=1, keepdim=True)).bfloat16()
    assert torch.equal(fast_out, expected)


def test_modes_see_the_ops(buf):
    x, idx, w = _inputs()
    with _Record() as rec:
        d = D.dispatch(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=8)
        D.combine(d.recv_x, d.handle, buf)
    assert "deepep_ops.dispatch.default" in rec.ops and "deepep_ops.combine.default" in rec.ops, rec.ops


def test_edited_handle_is_checked_in_full(buf):
    x, idx, w = _inputs()
    d = D.dispatch(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=8)
    edited = d.handle._replace(decode=False)
    assert type(edited) is DispatchHandle
    with pytest.raises(ValueError, match=r"x\.shape\[0\]"):
        D.combine(d.recv_x, edited, buf)
    with pytest.raises(ValueError, match=r"deepep_ops.combine: x\.shape\[0\]"):
        D.combine(d.recv_x[:-1].contiguous(), d.handle, buf)


@pytest.fixture
def agree_once():
    """Agree-once mode (GPU's default): the mode in which eager calls are remembered."""
    return D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K), check=False)


def _pair(buf, x, idx, w):
    d = D.dispatch(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=8)
    return D.combine(d.recv_x, d.handle, buf)


def test_known_call_still_checks_what_its_key_does_not_hold(agree_once):
    """A remembered call skips the metadata checks, never the value checks (CPU:
    always on) nor the checks of metadata its key does not match."""
    x, idx, w = _inputs()
    want = _pair(agree_once, x, idx, w)
    assert torch.equal(_pair(agree_once, x, idx, w), want)
    (known,) = agree_once.known_calls.entries()  # the dispatch,
    assert set(known.combine_guards) == {True}  # and the combine inputs (no out) every rank agreed on
    bad = idx.clone()
    bad[1, 0] = E + 3
    with pytest.raises(ValueError, match=r"topk_idx\[1, 0\] must be -1 or in \[0, num_experts=4\), got 7"):
        _pair(agree_once, x, bad, w)
    with pytest.raises(TypeError, match=r"topk_weights must be torch.float32, got torch.float64"):
        _pair(agree_once, x, idx, w.double())
    with pytest.raises(ValueError, match=r"x must be contiguous"):
        _pair(agree_once, torch.cat([x, x], dim=1)[:, :H], idx, w)
    with pytest.raises(TypeError, match=r"num_experts must be an int, not a bool"):
        D.dispatch(x, idx, w, agree_once, num_experts=True, num_max_tokens_per_rank=8)
    with pytest.raises(ValueError, match=r"x.shape\[0\] \(tokens\) must be <= num_max_tokens_per_rank=4"):
        D.dispatch(x, idx, w, agree_once, num_experts=E, num_max_tokens_per_rank=4)


@pytest.mark.parametrize("remembered", [False, True])
def test_topk_idx_written_after_dispatch_is_an_error(agree_once, remembered):
    """The handle keeps the caller's topk_idx and its version: combine refuses a
    routing written in place since (first call, and a remembered one)."""
    x, idx, w = _inputs()
    if remembered:
        _pair(agree_once, x, idx.clone(), w)
    mine = idx.clone()
    d = D.dispatch(x, mine, w, agree_once, num_experts=E, num_max_tokens_per_rank=8)
    mine[0, 0] = -1
    with pytest.raises(ValueError, match=r"handle.topk_idx must be unchanged between dispatch and combine .* "
                                         r"got version 1, dispatched at version 0"):
        D.combine(d.recv_x, d.handle, agree_once)


def test_inference_topk_idx_is_copied(agree_once):
    """Inference tensors have no version counter: the handle holds a copy, so a
    write after dispatch does not change what combine reduces."""
    x, idx, w = _inputs()
    want = _pair(agree_once, x, idx, w)
    with torch.inference_mode():
        mine = idx.clone()
        d = D.dispatch(x, mine, w, agree_once, num_experts=E, num_max_tokens_per_rank=8)
        mine.fill_(-1)
        got = D.combine(d.recv_x, d.handle, agree_once)
    assert d.handle.topk_idx is not mine and torch.equal(got, want)


def test_remembered_combine_still_names_a_bad_x(agree_once):
    """A 1-D or wrong-dtype x after a remembered combine gets validation's error, not an IndexError."""
    x, idx, w = _inputs()
    _pair(agree_once, x, idx, w)
    d = D.dispatch(x, idx, w, agree_once, num_experts=E, num_max_tokens_per_rank=8)
    with pytest.raises(ValueError, match=r"x must be 2-D, got shape \(16,\)"):
        D.combine(d.recv_x.flatten()[:16], d.handle, agree_once)
    with pytest.raises(TypeError, match=r"x must be torch.bfloat16, got torch.float32"):
        D.combine(d.recv_x.float(), d.handle, agree_once)


# --- a known call is recognised by a guard (deepep_ops._torch_compat.metadata_guard):
# --- whatever the dispatcher would do for a repeat of it must still happen.


def _warm(buf, x, idx, w):
    """Make (x, idx, w) and its combine a known call of ``buf`` (agree-once mode)."""
    _pair(buf, x, idx, w)
    _pair(buf, x, idx, w)
    (known,) = buf.known_calls.entries()
    return known


def test_known_call_under_a_dispatch_mode_is_seen_by_it(agree_once):
    x, idx, w = _inputs()
    _warm(agree_once, x, idx, w)
    with _Record() as rec:
        d = D.dispatch(x, idx, w, agree_once, num_experts=E, num_max_tokens_per_rank=8)
        D.combine(d.recv_x, d.handle, agree_once)
    assert "deepep_ops.dispatch.default" in rec.ops and "deepep_ops.combine.default" in rec.ops, rec.ops


def test_known_call_with_grad_is_recorded_by_autograd(agree_once):
    """Same metadata as a known call but an input that needs grad: autograd must
    see both ops (the guard matches requires_grad), and the gradient is right."""
    x, idx, w = _inputs()
    _warm(agree_once, x, idx, w)
    xg = x.clone().requires_grad_()
    d = D.dispatch(xg, idx, w, agree_once, num_experts=E, num_max_tokens_per_rank=8)
    assert d.recv_x.grad_fn is not None
    y = D.combine(d.recv_x, d.handle, agree_once)
    assert y.grad_fn is not None
    y.float().sum().backward()
    # combine(dispatch(x)) = x * [routed somewhere] (R = 1): so is the gradient.
    routed = (idx >= 0).any(dim=1, keepdim=True)
    assert torch.equal(xg.grad, routed.expand_as(x).to(xg.grad.dtype))


def test_requires_grad_under_no_grad_is_not_remembered(agree_once):
    """Under no_grad an input that needs grad is plain eager, but a guard cannot
    tell grad mode: such a call is never remembered, so the same call with grad
    on goes to autograd."""
    x, idx, w = _inputs()
    xg = x.clone().requires_grad_()
    with torch.no_grad():
        _pair(agree_once, xg, idx, w)
        _pair(agree_once, xg, idx, w)
    assert not agree_once.known_calls
    d = D.dispatch(xg, idx, w, agree_once, num_experts=E, num_max_tokens_per_rank=8)
    assert d.recv_x.grad_fn is not None


def test_known_combine_with_grad_is_recorded_by_autograd(agree_once):
    x, idx, w = _inputs()
    _warm(agree_once, x, idx, w)
    d = D.dispatch(x, idx, w, agree_once, num_experts=E, num_max_tokens_per_rank=8)
    y = D.combine(d.recv_x.clone().requires_grad_(), d.handle, agree_once)
    assert y.grad_fn is not None


def test_known_call_in_inference_mode_and_other_layouts(agree_once):
    """A known call's guard fails under other dispatch state (inference mode) and
    for other strides or T: those calls are checked in full and still right."""
    x, idx, w = _inputs(T=6)
    want = _pair(agree_once, x, idx, w)
    _warm(agree_once, x, idx, w)
    with torch.inference_mode():
        assert torch.equal(_pair(agree_once, x, idx, w), want)
    wide = torch.zeros(6, 2 * K)
    wide[:, :K] = w
    with pytest.raises(ValueError, match=r"topk_weights must be contiguous"):
        _pair(agree_once, x, idx, wide[:, :K])
    x5, idx5, w5 = _inputs(T=5, seed=1)
    want5 = (x5.float() * (idx5 >= 0).any(dim=1, keepdim=True)).bfloat16()
    assert torch.equal(_pair(agree_once, x5, idx5, w5), want5)


def test_known_combine_checks_rows_and_routing(agree_once):
    """A combine input that passes the guard (dim 0 is free) with other rows, or a
    routing written since dispatch, still fails with the full checks' message."""
    x, idx, w = _inputs()
    _warm(agree_once, x, idx, w)
    mine = idx.clone()
    d = D.dispatch(x, mine, w, agree_once, num_experts=E, num_max_tokens_per_rank=8)
    with pytest.raises(ValueError, match=r"deepep_ops.combine: x\.shape\[0\]"):
        D.combine(torch.cat([d.recv_x, d.recv_x]), d.handle, agree_once)
    mine[0, 0] = -1
    with pytest.raises(ValueError, match=r"handle.topk_idx must be unchanged"):
        D.combine(d.recv_x, d.handle, agree_once)


def test_without_a_guard_every_call_is_checked_in_full(agree_once, monkeypatch):
    """A torch without Dynamo's TensorGuards: nothing is remembered, results are the same."""
    import deepep_ops._torch_compat as compat

    x, idx, w = _inputs()
    want = _pair(agree_once, x, idx, w)
    fresh = D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K),
                          check=False)
    monkeypatch.setattr(compat, "_TensorGuards", None)
    for _ in range(2):
        assert torch.equal(_pair(fresh, x, idx, w), want)
    assert not fresh.known_calls
