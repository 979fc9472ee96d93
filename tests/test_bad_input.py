"""Bad inputs raise clear Python errors (ValueError/TypeError naming the argument) before any
communication.

Dispatch cases use a 2-rank ReferenceElasticBuffer over a stub group (rank 0 of 2) with
``torch.distributed.all_to_all_single`` replaced by a recorder that raises: a bad input must
raise its own error without reaching the backend or any collective, and a valid input (the
control) must get past validation and reach the collective, which proves that validation
runs first. Combine cases use a world-size-1 buffer with a spy on ``backend.combine``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import deepep_ops as D
import dense_reference as ref

T, H, K, E, M, CAP = 4, 256, 2, 4, 8, 16


class _StubGroup:
    def rank(self):
        return 0

    def size(self):
        return 2


class CollectiveAttempted(Exception):
    pass


@pytest.fixture
def spy(monkeypatch):
    """(buffer of 2 ranks over a stub group, list of recorded backend/collective calls)."""
    calls = []

    def no_collective(*args, **kwargs):
        calls.append("all_to_all_single")
        raise CollectiveAttempted

    monkeypatch.setattr(dist, "all_to_all_single", no_collective)
    backend = D.ReferenceElasticBuffer(_StubGroup(), num_max_tokens_per_rank=CAP, hidden=H, num_topk=K)
    real_dispatch = backend.dispatch

    def dispatch_spy(*args, **kwargs):
        calls.append("backend.dispatch")
        return real_dispatch(*args, **kwargs)

    backend.dispatch = dispatch_spy
    buf = D.EPOpsBuffer(backend)
    # The stub peer agrees with whatever this rank sends in the cross-rank check
    # (deepep_ops.agreement, a host exchange, not a payload collective).
    buf.exchange.all_gather_object = lambda obj: [obj] * buf.num_ranks
    buf.exchange.all_gather_ints = lambda values: [tuple(values)] * buf.num_ranks
    assert buf.num_ranks == 2 and buf.rank == 0
    return buf, calls


def _valid(fp8=False, h=H, t=T):
    inp = ref.make_global_inputs(5, [t], h, K, E, fp8=fp8, neg_frac=0.2)[0]
    return dict(x=inp.x, x_scales=inp.x_scales, topk_idx=inp.topk_idx, topk_weights=inp.topk_weights,
                num_experts=E, num_max_tokens_per_rank=M, expert_alignment=1)


def _call(fn, buf, kw):
    kw = dict(kw)
    return fn(kw.pop("x"), kw.pop("topk_idx"), kw.pop("topk_weights"), buf, **kw)


ENTRY_POINTS = {"dispatch": D.dispatch, "dispatch_exact": D.dispatch_exact}


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_valid_input_reaches_the_collective(spy, entry, fp8):
    """Control: with a valid input the op gets past validation and into the collective."""
    buf, calls = spy
    with pytest.raises(CollectiveAttempted):
        _call(ENTRY_POINTS[entry], buf, _valid(fp8))
    assert calls[0] == "backend.dispatch" and "all_to_all_single" in calls


@pytest.mark.parametrize("fp8,h", [(False, 16), (False, 48), (False, 144), (True, 32), (True, 96), (True, 160)])
def test_smallest_valid_hidden_sizes_accepted(spy, fp8, h):
    """Control for the hidden checks: bf16 H % 16 == 0 and fp8 H % 32 == 0 pass validation."""
    buf, calls = spy
    with pytest.raises(CollectiveAttempted):
        _call(D.dispatch, buf, _valid(fp8, h=h))
    assert calls[0] == "backend.dispatch"


def _with(**changes):
    def f(kw):
        kw.update(changes)
        return kw
    return f


def _idx_value(t, k, v):
    def f(kw):
        idx = kw["topk_idx"].clone()
        idx[t, k] = v
        kw["topk_idx"] = idx
        return kw
    return f


def _dup_row(kw):
    idx = kw["topk_idx"].clone()
    idx[2] = torch.tensor([1, 1])
    kw["topk_idx"] = idx
    return kw


def _fp8(h=H):
    def f(kw):
        kw.update(_valid(fp8=True, h=h))
        return kw
    return f


def _bf16_h(h):
    def f(kw):
        kw.update(_valid(h=h))
        return kw
    return f


def _non_contiguous_x(kw):
    kw["x"] = torch.cat([kw["x"], kw["x"]], dim=1)[:, ::2]
    assert not kw["x"].is_contiguous()
    return kw


def _scales(kw, f):
    kw["x_scales"] = f(kw["x_scales"])
    return kw


def _more_tokens_than_m(kw):
    kw.update(_valid(t=M + 1))
    return kw


# (id, mutation, exception, regex naming the argument)
BAD_DISPATCH = [
    ("x_float32", lambda kw: _with(x=kw["x"].float())(kw), TypeError, r"\bx must be .*bfloat16"),
    ("bf16_with_scales", _with(x_scales=torch.ones(T, 2)), ValueError, r"x_scales must be None"),
    ("fp8_without_scales", lambda kw: _with(x_scales=None)(_fp8()(kw)), ValueError, r"x_scales must be given"),
    ("bf16_hidden_not_mult_16", _bf16_h(24), ValueError, r"x\.shape\[1\] \(hidden\) must be a multiple of 16"),
    ("fp8_hidden_not_mult_32", _fp8(h=48), ValueError, r"x\.shape\[1\] \(hidden\) must be a multiple of 32"),
    ("x_non_contiguous", _non_contiguous_x, ValueError, r"\bx must be contiguous"),
    ("x_3d", lambda kw: _with(x=kw["x"].unsqueeze(0))(kw), ValueError, r"\bx must be 2-D"),
    ("topk_idx_int32", lambda kw: _with(topk_idx=kw["topk_idx"].int())(kw), TypeError, r"topk_idx must be torch\.int64"),
    ("topk_idx_rows", lambda kw: _with(topk_idx=kw["topk_idx"][:-1].contiguous())(kw), ValueError, r"topk_idx\.shape\[0\]"),
    ("id_equal_E", _idx_value(1, 0, E), ValueError, r"topk_idx\[1, 0\] must be -1 or in \[0, num_experts=4\)"),
    ("id_too_large", _idx_value(0, 1, 1000), ValueError, r"topk_idx\[0, 1\] must be -1 or in \[0, num_experts"),
    ("id_minus_2", _idx_value(3, 1, -2), ValueError, r"topk_idx\[3, 1\] must be -1 or in"),
    ("duplicate_ids", _dup_row, ValueError, r"topk_idx\[2\] must be free of repeated expert ids"),
    ("tokens_above_M", _more_tokens_than_m, ValueError, r"x\.shape\[0\] \(tokens\) must be <= num_max_tokens_per_rank=8"),
    ("M_above_capacity", _with(num_max_tokens_per_rank=CAP + 1), ValueError, r"num_max_tokens_per_rank must be <= the buffer capacity 16"),
    ("M_zero", _with(num_max_tokens_per_rank=0), ValueError, r"num_max_tokens_per_rank must be > 0"),
    ("E_not_divisible_by_R", _with(num_experts=5), ValueError, r"num_experts must be divisible by the EP group size 2"),
    ("weights_shape", lambda kw: _with(topk_weights=torch.rand(T, K + 1))(kw), ValueError, r"topk_weights\.shape"),
    ("weights_rows", lambda kw: _with(topk_weights=torch.rand(T - 1, K))(kw), ValueError, r"topk_weights\.shape"),
    ("weights_dtype", lambda kw: _with(topk_weights=kw["topk_weights"].bfloat16())(kw), TypeError, r"topk_weights must be torch\.float32"),
    ("weights_1d", lambda kw: _with(topk_weights=torch.rand(T))(kw), ValueError, r"topk_weights must be 2-D"),
    ("scales_rows", lambda kw: _scales(_fp8()(kw), lambda s: s[:-1].contiguous()), ValueError, r"x_scales\.shape\[0\]"),
    ("scales_dtype", lambda kw: _scales(_fp8()(kw), lambda s: s.double()), TypeError, r"x_scales must be"),
    ("alignment_zero", _with(expert_alignment=0), ValueError, r"expert_alignment must be >= 1"),
]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", BAD_DISPATCH, ids=[c[0] for c in BAD_DISPATCH])
def test_bad_dispatch_input(spy, entry, case):
    buf, calls = spy
    _name, mutate, exc, pattern = case
    kw = mutate(_valid())
    with pytest.raises(exc, match=pattern) as info:
        _call(ENTRY_POINTS[entry], buf, kw)
    assert f"deepep_ops.{entry}" in str(info.value), "the message should name the op"
    assert calls == [], f"reached {calls} before rejecting the input"


# ----------------------------------------------------------------------------- combine
@pytest.fixture
def world1(monkeypatch):
    backend = D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K)
    buf = D.EPOpsBuffer(backend)
    calls = []
    real_combine = backend.combine

    def combine_spy(*args, **kwargs):
        calls.append("backend.combine")
        return real_combine(*args, **kwargs)

    backend.combine = combine_spy
    return buf, calls


def _decode(buf, h=H):
    kw = _valid(h=h)
    kw["num_experts"] = E
    return _call(D.dispatch, buf, kw)


def _exact(buf):
    kw = _valid()
    kw["num_max_tokens_per_rank"] = CAP
    return _call(D.dispatch_exact, buf, kw)


def test_combine_valid_control(world1):
    buf, calls = world1
    r = _decode(buf)
    out = D.combine(r.recv_x, r.handle, buf)
    assert out.shape == (T, H) and calls == ["backend.combine"]


BAD_COMBINE = [
    ("x_float32", lambda buf: (lambda r: (r.recv_x.float(), r.handle))(_decode(buf)), TypeError,
     r"deepep_ops.combine: x must be torch\.bfloat16"),
    ("hidden_not_mult_256", lambda buf: (lambda r: (r.recv_x, r.handle))(_decode(buf, h=128)), ValueError,
     r"x\.shape\[1\] \(hidden\) must be a multiple of 256"),
    ("decode_rows_plus_one", lambda buf: (lambda r: (torch.cat([r.recv_x, r.recv_x[:1]]), r.handle))(_decode(buf)),
     ValueError, r"x\.shape\[0\]"),
    ("decode_rows_minus_one", lambda buf: (lambda r: (r.recv_x[:-1].contiguous(), r.handle))(_decode(buf)),
     ValueError, r"x\.shape\[0\]"),
    ("exact_rows_plus_one", lambda buf: (lambda r: (torch.cat([r.recv_x, r.recv_x[:1]]), r.handle))(_exact(buf)),
     ValueError, r"x\.shape\[0\]"),
    ("x_non_contiguous", lambda buf: (lambda r: (torch.cat([r.recv_x, r.recv_x], 1)[:, ::2], r.handle))(_decode(buf)),
     ValueError, r"\bx must be contiguous"),
    ("exact_handle_flagged_decode", lambda buf: (lambda r: (r.recv_x, r.handle._replace(decode=True)))(_exact(buf)),
     ValueError, r"decode=True"),
    ("decode_handle_flagged_expand", lambda buf: (lambda r: (r.recv_x, r.handle._replace(decode=False)))(_decode(buf)),
     ValueError, r"x\.shape\[0\]"),
]


@pytest.mark.parametrize("case", BAD_COMBINE, ids=[c[0] for c in BAD_COMBINE])
def test_bad_combine_input(world1, case):
    buf, calls = world1
    _name, make, exc, pattern = case
    x, handle = make(buf)
    with pytest.raises(exc, match=pattern):
        D.combine(x, handle, buf)
    assert calls == [], "backend.combine was reached"
