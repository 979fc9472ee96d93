"""Snapshots of the AOT backward graphs of prepare → experts → finalize (bf16,
decode and prefill): ``graphs/<mode>_bf16.aot_bw.txt``.

Same capture as ``tests/test_graph_snapshots.py`` (world size 1, E=8, K=2, H=256,
T=3, the function of its ``make_fn``), with ``a1`` and ``topk_weights``
requiring grad and ``out.float().sum().backward()`` after the compiled call;
the snapshot is ``AotEagerAndRecordGraphs().bw_graphs[0]``. The backward is
``cached_dispatch`` of the output gradient (combine's backward), the experts'
backward, then ``combine_with_weights`` of the received-row and weight
gradients (dispatch's backward), all in one graph. Regenerate with
``EXPECTTEST_ACCEPT=1 python -m pytest tests/test_graph_snapshots_backward.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch

from graph_snapshot import assert_graph_snapshot, graph_text
from test_graph_snapshots import _inputs, make_fn


@functools.lru_cache(maxsize=None)
def capture_backward(mode: str):
    """(AOT backward text, compiled grads, eager grads, #graphs) of one bf16 case."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    fn, bucket = make_fn(mode, "bf16")

    def grads(f):
        a1, w, ids = _inputs()
        a1, w = a1.requires_grad_(), w.requires_grad_()
        for t in (a1, w, ids):
            torch._dynamo.mark_static(t, 1)
        f(a1, w, ids, bucket).float().sum().backward()
        return a1.grad, w.grad

    torch._dynamo.reset()
    try:
        backend = AotEagerAndRecordGraphs()
        compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=True)
        got = grads(compiled)
        want = grads(fn)
        return graph_text(backend.bw_graphs[0]), got, want, len(backend.graphs)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_backward_graph_snapshot(mode):
    text, *_ = capture_backward(mode)
    assert "deepep_ops.cached_dispatch" in text and "deepep_ops.combine_with_weights" in text, text
    assert_graph_snapshot(f"{mode}_bf16.aot_bw", text)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_captured_backward_matches_eager(mode):
    _text, got, want, num_graphs = capture_backward(mode)
    assert num_graphs == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
