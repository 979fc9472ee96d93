"""DeepEP v2.5 (``deep_ep.EPBuffer``) and v2.1 (``deep_ep.ElasticBuffer``) behind the backend seam,
against the stand-ins of ``tests/deepep_v25_standin.py`` (a fake ``deep_ep`` package over the
reference buffer that enforces v2.5's Python contract; no real DeepEP here: the real-DeepEP tests,
on v2.1, are ``tests/test_gpu.py``).

- The stand-in itself fails where v2.5 fails (so the tests below could fail).
- The backend tells the two APIs apart by feature; ``new_buffer`` builds the installed one.
- Every op (dispatch, dispatch_exact, combine, cached_dispatch, combine_with_weights), eager and
  compiled (``aot_eager``), world size 1, gives the reference buffer's results on both.
- ``topk_idx`` written after dispatch is our clear error, never v2.5's assertion; inference mode works.
- Every dispatch, cached dispatch and combine runs with the dispatch's ``num_sms`` (issue 29 item 5),
  as v2.1 takes it and as v2.5 rounds it.
"""

from __future__ import annotations

import pytest
import torch

import deepep_ops as D
import deepep_v25_standin as standin
import dense_reference as ref
from deepep_ops.backends.deep_ep import ELASTIC_BUFFER_API, DeepEPBackend, new_buffer
from deepep_ops.handle import handle_args

H, K, E, CAP = 256, 2, 4, 16
VERSIONS = ("2.5", "2.1")


def _native(deep_ep, version: str, **kw):
    cls = deep_ep.EPBuffer if version == "2.5" else deep_ep.ElasticBuffer
    return cls(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K, **kw)


def _reference_buffer() -> D.EPOpsBuffer:
    return D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K))


def _inputs(seed=0, T=7):
    # -1 slots and a token routed nowhere.
    return ref.make_global_inputs(seed, [T], H, K, E, neg_frac=0.3, empty_rows=1)[0]


# ----------------------------------------------------------------------------- the stand-in's contract
def test_standin_enforces_v25s_contract(monkeypatch):
    deep_ep = standin.install(monkeypatch, "2.5")
    buf = _native(deep_ep, "2.5")
    inp = _inputs()
    kw = dict(topk_idx=inp.topk_idx, topk_weights=inp.topk_weights, num_experts=E, num_max_tokens_per_rank=8,
              do_cpu_sync=False)
    with pytest.raises(AssertionError, match="do_handle_copy"):
        buf.dispatch(inp.x, do_handle_copy=True, **kw)
    recv_x, _, _, handle, event = buf.dispatch(inp.x, **kw)
    assert isinstance(handle, deep_ep.EPHandle) and isinstance(event, deep_ep.EventOverlap)
    # PR #685: cached dispatch with the default num_sms and no num_experts raises.
    with pytest.raises(TypeError):
        buf.dispatch(inp.x, handle=handle)
    # An explicit num_sms is rounded up to even (ep.py:654).
    buf.dispatch(inp.x, handle=handle, num_experts=E, num_sms=5)
    assert buf.runtime.calls[-1] == ("cached_dispatch", 6)
    # defer_epilogue: only an event, whose wait() gives the results; it needs async_with_compute_stream.
    with pytest.raises(AssertionError, match="async_with_compute_stream"):
        buf.dispatch(inp.x, defer_epilogue=True, **kw)
    deferred = buf.dispatch(inp.x, defer_epilogue=True, async_with_compute_stream=True, **kw)
    assert isinstance(deferred, deep_ep.EventOverlap)
    later_x, _, _, later_handle = deferred.wait()
    assert torch.equal(later_x, recv_x) and isinstance(later_handle, deep_ep.EPHandle)
    combined = buf.combine(recv_x, handle, defer_epilogue=True, async_with_compute_stream=True).wait()
    assert torch.equal(combined[0], buf.combine(recv_x, handle)[0])
    # The handle keeps topk_idx by reference and asserts it unchanged.
    inp.topk_idx[0, 0] = inp.topk_idx[0, 0]
    with pytest.raises(AssertionError, match="must not be modified"):
        buf.combine(recv_x, handle)
    # ... except inference tensors, which have no version counter.
    with torch.inference_mode():
        ids = inp.topk_idx.clone()
        _, _, _, handle, _ = buf.dispatch(inp.x, **dict(kw, topk_idx=ids))
        ids[0, 0] = ids[0, 0]
        buf.combine(recv_x, handle)


# ----------------------------------------------------------------------------- detection, construction
@pytest.mark.parametrize("version", VERSIONS)
def test_backend_tells_the_apis_apart(monkeypatch, version):
    deep_ep = standin.install(monkeypatch, version)
    backend = D.EPOpsBuffer(_native(deep_ep, version)).backend
    assert type(backend) is DeepEPBackend and backend.topk_idx_dtype == torch.int64
    if version == "2.5":
        assert backend.handle_class is deep_ep.EPHandle
        assert backend.api == ("EPBuffer", True, 2, False)
        assert backend.api.defer_epilogue and not backend.api.handle_copy
    else:
        assert backend.handle_class is deep_ep.buffers.elastic.EPHandle
        assert backend.api == ELASTIC_BUFFER_API and not backend.api.defer_epilogue


def test_new_buffer_builds_the_installed_api(monkeypatch):
    deep_ep = standin.install(monkeypatch, "2.1")
    assert type(new_buffer(None, num_max_tokens_per_rank=CAP, num_cpu_bytes=0)) is deep_ep.ElasticBuffer
    deep_ep = standin.install(monkeypatch, "2.5")
    buf = new_buffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K, explicitly_destroy=True)
    assert type(buf) is deep_ep.EPBuffer and buf.num_max_tokens_per_rank == CAP
    with pytest.raises(TypeError, match=r"new_buffer: deep_ep.EPBuffer \(DeepEP 2.5.0\) takes no num_cpu_bytes; it "
                                        r"takes num_bytes, num_max_tokens_per_rank, "):
        new_buffer(None, num_cpu_bytes=0)
    monkeypatch.delattr(deep_ep, "EPBuffer")
    with pytest.raises(ImportError, match=r"needs DeepEP v2 .* the installed deep_ep 2.5.0 has neither"):
        new_buffer(None)


# ----------------------------------------------------------------------------- the ops, against the reference
def _all_ops(x, idx, w, buf, decode: bool):
    """Every op once: (dispatch outputs, combine, cached dispatch, weighted combine), real rows only."""
    if decode:
        r = D.dispatch(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=8)
        n = r.handle.psum_num_recv_tokens_per_scaleup_rank[-1]
        rows = torch.arange(r.recv_x.shape[0]) < n
        real = lambda t: torch.where(rows.reshape(-1, *([1] * (t.dim() - 1))), t, 0)  # noqa: E731
        recv_w = torch.where(r.recv_topk_idx >= 0, r.recv_topk_weights, 0)
        received = (real(r.recv_x), real(r.recv_topk_idx), real(recv_w))
    else:
        r = D.dispatch_exact(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=CAP, expert_alignment=4)
        real = lambda t: t  # noqa: E731  (padding rows are zero)
        received = (r.recv_x, r.recv_topk_weights, r.num_recv_tokens_per_expert)
    combined = D.combine(r.recv_x * 2, r.handle, buf)
    cached, _ = D.cached_dispatch(x * 3, r.handle, buf)
    weighted = torch.ops.deepep_ops.combine_with_weights(
        r.recv_x, r.recv_topk_weights.contiguous(), buf, *handle_args(r.handle))
    return (*received, combined, real(cached), *weighted)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_ops_match_the_reference(monkeypatch, version, decode, compiled):
    deep_ep = standin.install(monkeypatch, version)
    native = _native(deep_ep, version)
    buf = D.EPOpsBuffer(native)
    inp = _inputs(1)
    fn = _all_ops
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(_all_ops, fullgraph=True, dynamic=True, backend="aot_eager")
    got = fn(inp.x, inp.topk_idx, inp.topk_weights, buf, decode)
    want = _all_ops(inp.x, inp.topk_idx, inp.topk_weights, _reference_buffer(), decode)
    assert len(got) == len(want) == 7
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"output {i}"
    # Every call reached the stand-in (no silent fallback), with the dispatch's SM count.
    assert [op for op, _ in native.runtime.calls] == ["dispatch", "combine", "cached_dispatch", "combine"]
    assert {n for _, n in native.runtime.calls} == {24}


@pytest.mark.parametrize("version", VERSIONS)
def test_topk_idx_written_after_dispatch_is_our_error(monkeypatch, version):
    """v2.5's handle asserts topk_idx unchanged; the eager path checks first and names the argument."""
    deep_ep = standin.install(monkeypatch, version)
    buf = D.EPOpsBuffer(_native(deep_ep, version))
    inp = _inputs(2)
    r = D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E, num_max_tokens_per_rank=8)
    D.combine(r.recv_x, r.handle, buf)  # the known-call path once
    inp.topk_idx[1, 0] = inp.topk_idx[1, 0]
    with pytest.raises(ValueError, match=r"handle.topk_idx must be unchanged between dispatch and combine"):
        D.combine(r.recv_x, r.handle, buf)


@pytest.mark.parametrize("version", VERSIONS)
def test_inference_mode(monkeypatch, version):
    """Inference tensors have no version counter: the eager path keeps a copy of the ids and
    v2.5 checks nothing; results are the reference's, whatever the caller does to its ids."""
    deep_ep = standin.install(monkeypatch, version)
    buf = D.EPOpsBuffer(_native(deep_ep, version))
    inp = _inputs(3)
    with torch.inference_mode():
        idx = inp.topk_idx.clone()
        r = D.dispatch(inp.x, idx, inp.topk_weights, buf, num_experts=E, num_max_tokens_per_rank=8)
        idx.fill_(-1)
        got = D.combine(r.recv_x, r.handle, buf)
    want = _all_ops(inp.x, inp.topk_idx, inp.topk_weights, _reference_buffer(), True)[3]
    assert torch.equal(got, want / 2)  # _all_ops combines 2·recv_x (exact in bf16)


def test_rebuilt_handle_keeps_the_graphs_topk_idx(monkeypatch):
    """A v2.5 EPHandle rebuilt from graph values holds the handle's own topk_idx (by reference)."""
    deep_ep = standin.install(monkeypatch, "2.5")
    buf = D.EPOpsBuffer(_native(deep_ep, "2.5"))
    inp = _inputs(4)
    r = D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E, num_max_tokens_per_rank=8)
    native = buf.backend.native_handle(D.DispatchHandle(*r.handle))  # a plain handle: rebuilt
    assert type(native) is deep_ep.EPHandle and native is not r.handle.native
    assert native.topk_idx is inp.topk_idx and native.num_sms == r.handle.native.num_sms


# ----------------------------------------------------------------------------- num_sms (issue 29 item 5)
def _train_step(x, idx, w, buf, decode):
    """Forward dispatch → combine, backward: combine's is a cached dispatch, dispatch's a weighted combine."""
    if decode:
        r = D.dispatch(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=8)
    else:
        r = D.dispatch_exact(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=CAP, expert_alignment=2)
    return D.combine(r.recv_x, r.handle, buf).float().sum() + r.recv_topk_weights.sum()


def _eager_then_compiled_train_step(buf, inp, decode: bool, num_sms: int) -> None:
    """An eager dispatch → combine (its handle from a dispatch on ``num_sms`` SMs), then a compiled
    training step (handles rebuilt from graph values) whose gradients reach x and the weights."""
    r = D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E, num_max_tokens_per_rank=8)
    D.combine(r.recv_x, r.handle, buf)
    assert r.handle.native.num_sms == num_sms
    torch._dynamo.reset()
    step = torch.compile(_train_step, fullgraph=True, dynamic=True, backend="aot_eager")
    x, w = inp.x.clone().requires_grad_(), inp.topk_weights.clone().requires_grad_()
    step(x, inp.topk_idx, w, buf, decode).backward()
    assert x.grad is not None and w.grad is not None


@pytest.mark.parametrize("version,theoretical,expected", [("2.1", 23, 23), ("2.5", 23, 24), ("2.5", 20, 20)])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_every_call_runs_with_the_dispatchs_num_sms(monkeypatch, version, theoretical, expected, decode):
    """get_theoretical_num_sms answers ``theoretical``; v2.1 runs with it, v2.5 rounds it up to
    even. Eager dispatch → combine (DeepEP's own handle), a compiled training step (handles rebuilt
    from graph values: combine, cached dispatch and weighted combine in backward): every call
    runs with the dispatch's count."""
    deep_ep = standin.install(monkeypatch, version)
    monkeypatch.setattr(standin.StandInBuffer, "THEORETICAL_NUM_SMS", theoretical)
    native = _native(deep_ep, version)
    _eager_then_compiled_train_step(D.EPOpsBuffer(native), _inputs(5), decode, expected)
    ops = [op for op, _ in native.runtime.calls]
    assert ops == ["dispatch", "combine", "dispatch", "combine", "cached_dispatch", "combine"], ops
    assert {n for _, n in native.runtime.calls} == {expected}


def test_a_rounding_deepep_did_not_announce_is_adopted(monkeypatch):
    """A DeepEP that runs with another num_sms than it was given (here v2.5 driven as if it were
    v2.1): the first dispatch's handle says so, and later calls on rebuilt handles pass its count."""
    deep_ep = standin.install(monkeypatch, "2.5")
    monkeypatch.setattr(standin.StandInBuffer, "THEORETICAL_NUM_SMS", 23)
    native = _native(deep_ep, "2.5")
    backend = DeepEPBackend(native, deep_ep.EPHandle, torch.int64)  # v2.1's API: no rounding expected
    buf = D.EPOpsBuffer(backend)
    inp = _inputs(6)
    r = D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E, num_max_tokens_per_rank=8)
    assert native.runtime.calls == [("dispatch", 24)] and backend.num_sms(E, K) == 24
    D.cached_dispatch(inp.x, r.handle, buf)
    torch.ops.deepep_ops.combine_with_weights(r.recv_x, r.recv_topk_weights, buf, *handle_args(r.handle))
    assert native.runtime.calls[1:] == [("cached_dispatch", 24), ("combine", 24)]


@pytest.mark.parametrize("version,num_sms,expected", [("2.1", 7, 7), ("2.5", 7, 8), ("2.5", 16, 16)])
def test_num_sms_pins_every_call(monkeypatch, version, num_sms, expected):
    """``EPOpsBuffer(num_sms=)``: eager, compiled (forward + backward) and async calls all run on
    that many SMs (v2.5 rounds up to even), not get_theoretical_num_sms's 23, and the results
    equal the reference buffer's."""
    deep_ep = standin.install(monkeypatch, version)
    monkeypatch.setattr(standin.StandInBuffer, "THEORETICAL_NUM_SMS", 23)
    native = _native(deep_ep, version)
    buf = D.EPOpsBuffer(native, num_sms=num_sms)
    assert buf.backend.fixed_num_sms == expected
    inp = _inputs(7)
    _eager_then_compiled_train_step(buf, inp, True, expected)
    with torch.no_grad():
        got = _async_ops(inp.x, inp.topk_idx, inp.topk_weights, buf, True)
        want = _async_ops(inp.x, inp.topk_idx, inp.topk_weights, _reference_buffer(), True)
    for i, (g, w_) in enumerate(zip(got, want)):
        assert torch.equal(g, w_), f"output {i}"
    ops = [op for op, _ in native.runtime.calls]
    assert ops == ["dispatch", "combine"] * 2 + ["cached_dispatch", "combine"] + ["dispatch", "combine"], ops
    assert {n for _, n in native.runtime.calls} == {expected}


@pytest.mark.parametrize("num_sms,error", [
    (0, "ValueError: EPOpsBuffer: num_sms must be >= 1, got 0"),
    (-4, "ValueError: EPOpsBuffer: num_sms must be >= 1, got -4"),
    (True, "TypeError: EPOpsBuffer: num_sms must be an int >= 1 or None, got True"),
    (8.0, "TypeError: EPOpsBuffer: num_sms must be an int >= 1 or None, got 8.0"),
    ("8", "TypeError: EPOpsBuffer: num_sms must be an int >= 1 or None, got '8'"),
])
def test_bad_num_sms(monkeypatch, num_sms, error):
    # On a CUDA machine the stand-in (a deep_ep class) would also get the GPU's SM count as the
    # upper bound in the message; tests/test_gpu.py checks that bound against a real GPU.
    monkeypatch.setattr("deepep_ops.backends.deep_ep._device_sm_count", lambda buffer: None)
    deep_ep = standin.install(monkeypatch, "2.1")
    for native in (_native(deep_ep, "2.1"), D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H,
                                                                     num_topk=K)):
        with pytest.raises((TypeError, ValueError)) as e:
            D.EPOpsBuffer(native, num_sms=num_sms)
        assert f"{e.type.__name__}: {e.value}" == error


def test_num_sms_with_a_backend_is_an_error(monkeypatch):
    """A Backend carries its own num_sms: a second one given beside it would be ignored, so it is refused."""
    deep_ep = standin.install(monkeypatch, "2.5")
    backend = DeepEPBackend(_native(deep_ep, "2.5"), deep_ep.EPHandle, torch.int64, num_sms=12)
    assert D.EPOpsBuffer(backend).backend.fixed_num_sms == 12
    with pytest.raises(TypeError, match=r"num_sms=8 applies to a DeepEP or reference buffer; a DeepEPBackend "
                                        r"\(a Backend\) was built with its own \(fixed_num_sms=12\)"):
        D.EPOpsBuffer(backend, num_sms=8)


# ----------------------------------------------------------------------------- asynchrony (issue 33)
def _async_ops(x, idx, w, buf, decode: bool):
    """dispatch start/wait and combine start/wait: the received rows and the combine (real rows)."""
    if decode:
        r = D.dispatch_wait(D.dispatch_start(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=8))
        n = r.handle.psum_num_recv_tokens_per_scaleup_rank[-1]
        rows = (torch.arange(r.recv_x.shape[0]) < n).unsqueeze(1)
        received = (torch.where(rows, r.recv_x, 0), torch.where(rows, r.recv_topk_idx, 0))
    else:
        r = D.dispatch_wait(D.dispatch_exact_start(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=CAP,
                                                   expert_alignment=4))
        received = (r.recv_x, r.num_recv_tokens_per_expert)
    return (*received, D.combine_wait(D.combine_start(r.recv_x * 2, r.handle, buf)))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_async_pairs_match_the_reference(monkeypatch, version, decode, compiled):
    """The async pairs on each API: v2.5 defers the epilogue (the call returns an event whose
    wait() gives the results), v2.1 returns its outputs with the event; both give the
    reference buffer's synchronous results."""
    deep_ep = standin.install(monkeypatch, version)
    native = _native(deep_ep, version)
    seen = []
    for name in ("dispatch", "combine"):
        call = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _call=call, _name=name, **kw: (
            seen.append((_name, kw.get("async_with_compute_stream", False), kw.get("defer_epilogue", False))),
            _call(*a, **kw))[1])
    buf = D.EPOpsBuffer(native)
    inp = _inputs(2)
    fn = _async_ops
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(_async_ops, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch.no_grad():
        got = fn(inp.x, inp.topk_idx, inp.topk_weights, buf, decode)
        want = _async_ops(inp.x, inp.topk_idx, inp.topk_weights, _reference_buffer(), decode)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"output {i}"
    defer = version == "2.5"
    assert seen == [("dispatch", True, defer), ("combine", True, defer)], seen
    assert buf.pending is None
