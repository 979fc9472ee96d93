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
    return D.EPBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K))


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

    saved = api._plain_eager
    api._plain_eager = lambda *_: False
    try:
        return fn()
    finally:
        api._plain_eager = saved


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
    edited = d.handle._replace(do_expand=True)
    assert type(edited) is DispatchHandle
    with pytest.raises(ValueError, match=r"x\.shape\[0\]"):
        D.combine(d.recv_x, edited, buf)
    with pytest.raises(ValueError, match=r"deepep_ops.combine: x\.shape\[0\]"):
        D.combine(d.recv_x[:-1].contiguous(), d.handle, buf)
