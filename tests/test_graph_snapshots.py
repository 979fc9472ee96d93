"""Snapshots of the Dynamo and AOT forward graphs of prepare → experts → finalize.

Capture setup: see the docstring of ``tests/graph_snapshot.py`` and
``graphs/README.md``. Regenerate with
``EXPECTTEST_ACCEPT=1 python -m pytest tests/test_graph_snapshots.py``.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

from graph_snapshot import assert_graph_snapshot, graph_text, requires_snapshot_torch

E, H, K, CAP, T = 8, 256, 2, 1024, 3
CASES = [("decode", "bf16"), ("decode", "fp8"), ("prefill", "bf16"), ("prefill", "fp8")]
CASE_IDS = [f"{m}_{d}" for m, d in CASES]


def _inputs():
    g = torch.Generator().manual_seed(0)
    a1 = torch.randn(T, H, generator=g).bfloat16()
    topk_weights = torch.rand(T, K, generator=g)
    topk_ids = torch.tensor([[0, 5], [3, -1], [7, 2]], dtype=torch.int64)
    return a1, topk_weights, topk_ids


def make_fn(mode: str, dtype: str):
    """prepare → expert stand-in (dequantize, ×2, broadcast over the lane dim) → finalize."""
    import deepep_ops as D
    from deepep_ops.prepare_finalize import DeepEPPrepareFinalize, dequantize_block_fp8

    decode = mode == "decode"
    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K))
    pf = DeepEPPrepareFinalize(
        buf, E, K, decode=decode, use_fp8_dispatch=dtype == "fp8", expert_alignment=1 if decode else 4
    )

    def prepare_experts_finalize(a1, topk_weights, topk_ids, num_max_tokens_per_rank):
        p = pf.prepare(a1, topk_weights, topk_ids, num_max_tokens_per_rank=num_max_tokens_per_rank)
        x = p.expert_x if p.expert_x_scale is None else dequantize_block_fp8(p.expert_x, p.expert_x_scale)
        lanes = p.topk_ids.shape[1]
        y = (x * 2).unsqueeze(1).expand(-1, lanes, -1)
        out = torch.empty_like(a1)
        pf.finalize(out, y, p.topk_weights, p.topk_ids, p.handle)
        return out

    bucket = D.pow2_bucket(T, CAP) if decode else None
    return prepare_experts_finalize, bucket


@functools.lru_cache(maxsize=None)
def capture(mode: str, dtype: str):
    """(dynamo text, AOT forward text, compiled output, eager output, #graphs) of one case."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    fn, bucket = make_fn(mode, dtype)
    args = _inputs()
    a1, topk_weights, topk_ids = args
    # dynamic=True makes every dim symbolic; H and K are model constants (in
    # MoELayer the weights pin them), so keep them static: T and M stay dynamic.
    torch._dynamo.mark_static(a1, 1)
    torch._dynamo.mark_static(topk_weights, 1)
    torch._dynamo.mark_static(topk_ids, 1)
    torch._dynamo.reset()
    try:
        backend = AotEagerAndRecordGraphs()
        compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=True)
        out = compiled(*args, bucket)
        eager = fn(*args, bucket)
        return graph_text(backend.graphs[0]), graph_text(backend.fw_graphs[0]), out, eager, len(backend.graphs)
    finally:
        torch._dynamo.reset()


@requires_snapshot_torch
@pytest.mark.parametrize("graph", ["dynamo", "aot_fw"])
@pytest.mark.parametrize("mode,dtype", CASES, ids=CASE_IDS)
def test_graph_snapshot(mode, dtype, graph):
    dynamo, aot_fw, *_ = capture(mode, dtype)
    assert_graph_snapshot(f"{mode}_{dtype}.{graph}", dynamo if graph == "dynamo" else aot_fw)


@pytest.mark.parametrize("mode,dtype", CASES, ids=CASE_IDS)
def test_captured_function_matches_eager(mode, dtype):
    *_, out, eager, num_graphs = capture(mode, dtype)
    assert num_graphs == 1
    torch.testing.assert_close(out, eager, atol=0, rtol=0)
    # The expert stand-in doubles every token routed anywhere: out = 2·Σ_k w_k·deq(q(x)).
    a1, w, ids = _inputs()
    x = a1.float()
    if dtype == "fp8":  # the tests' own block-fp8 quantizer (1x128, e4m3), not the product's
        import dense_reference as ref

        x = ref.dequant(*ref.quant_fp8(a1.float()))
    expected = 2 * (torch.where(ids >= 0, w, 0.0).sum(dim=1, keepdim=True) * x)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_decode_graph_has_no_asserts_and_no_bucket_slicing(dtype):
    """Decode: no runtime asserts, and nothing slices the R·M rows back to the token count."""
    dynamo, aot_fw, *_ = capture("decode", dtype)
    for name, text in (("dynamo", dynamo), ("aot_fw", aot_fw)):
        assert "_assert_scalar" not in text, f"{name} graph has runtime asserts"
        assert "aten.slice" not in text and "slice(" not in text, f"{name} graph slices a tensor:\n{text}"
    # The received rows are R·M = M (R = 1): the bucket's own symbol, not the token count's.
    m_sym = re.search(r'L_num_max_tokens_per_rank_: "Sym\((\w+)\)"', dynamo).group(1)
    t_sym = re.search(r'L_a1_: "bf16\[(\w+), 256\]"', dynamo).group(1)
    rows = re.search(r'recv_x: "\w+\[(\w+), 256\]"', dynamo).group(1)
    assert m_sym != t_sym and rows == m_sym, (m_sym, t_sym, rows)
