"""``deepep_ops::weight_and_reduce`` (finalize's top-k reduce) against an independent float64 sum.

The reference (:func:`_expected`) loops over rows and lanes in float64 and
never reads a lane whose id is −1; those lanes hold NaN (or, for a broadcast
expert output, whatever the shared row holds) so that reading one shows up.

- CPU (always): the op's generic kernel and its fake (``opcheck``), its values,
  and errors that name the argument.
- CUDA (skipped without a GPU): the Triton kernel over row counts 0..512, k 1
  and 8, H 256 and 7168, bf16 and fp32, per-lane and broadcast (stride 0 over k)
  expert outputs, transposed ids; and the compiled decode step's graph holding
  the Triton kernel itself (not the op), replayed from a CUDA graph.
- CPU, the traced form (``reduce.weight_and_reduce_traced``, what compiled CUDA
  graphs hold) with a stand-in for the Triton launch: it compiles
  ``fullgraph=True``, wires the kernel's arguments, and bad row counts are the
  same clear error.
"""

from __future__ import annotations

import pytest
import torch

import deepep_ops  # noqa: F401  (defines the ops)

OP = torch.ops.deepep_ops.weight_and_reduce.default


def _inputs(rows: int, k: int, H: int, *, dtype=torch.bfloat16, device="cpu", routed_frac=0.6,
            broadcast=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (rows, k), generator=g)
    ids = torch.where(torch.rand(rows, k, generator=g) < routed_frac, ids, -1)
    w = torch.rand(rows, k, generator=g) - 0.25  # some negative: the sign must survive
    if broadcast:
        y = torch.randn(rows, 1, H, generator=g).to(dtype).expand(rows, k, H)
    else:
        y = torch.randn(rows, k, H, generator=g).to(dtype)
        y = torch.where((ids >= 0).unsqueeze(-1), y, float("nan")).to(dtype)  # garbage where not routed
    return y.to(device), w.to(device), ids.to(device)


def _expected(y, w, ids, apply_weights: bool) -> torch.Tensor:
    rows, k, H = y.shape
    out = torch.zeros(rows, H, dtype=torch.float64)
    y64, w64 = y.cpu().double(), w.cpu().double()
    for r in range(rows):
        for j in range(k):
            if int(ids[r, j]) >= 0:
                out[r] += y64[r, j] * (w64[r, j] if apply_weights else 1.0)
    return out


def _assert_close(got, y, w, ids, apply_weights):
    want = _expected(y, w, ids, apply_weights)
    assert got.shape == want.shape and got.dtype == y.dtype
    # fp32 accumulation, one rounding to the output dtype.
    tol = 1e-5 if y.dtype == torch.float32 else 2**-8
    mag = _expected(y.abs(), w.abs(), ids, apply_weights)
    err = (got.cpu().double() - want).abs()
    assert bool(torch.isfinite(got).all()), "a lane with id -1 leaked into the sum"
    assert bool((err <= 1e-6 + tol * mag).all()), f"max err {err.max().item():.3g}"


# ------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("rows,k", [(5, 2), (0, 2), (3, 1)])
def test_opcheck_cpu(rows, k, broadcast):
    """The fake against the real kernel (test_faketensor: shape, dtype, strides), the schema, AOT."""
    y, w, ids = _inputs(rows, k, 256, broadcast=broadcast)
    y = torch.nan_to_num(y)  # opcheck compares outputs across runs: keep inputs finite
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    assert torch.library.opcheck(OP, (y, w, ids, True), test_utils=utils) == {u: "SUCCESS" for u in utils}


@pytest.mark.parametrize("apply_weights", [True, False])
@pytest.mark.parametrize("broadcast", [False, True])
def test_values_cpu(apply_weights, broadcast):
    y, w, ids = _inputs(9, 4, 256, broadcast=broadcast)
    _assert_close(OP(y, w, ids, apply_weights), y, w, ids, apply_weights)


@pytest.mark.parametrize("bad,match", [
    (lambda y, w, ids: (y[:, 0], w, ids), r"expert_output must be 3-D, got shape \(4, 256\)"),
    (lambda y, w, ids: (y, w.double(), ids), r"topk_weights.dtype must be torch.float32, got torch.float64"),
    (lambda y, w, ids: (y, w, ids.float()), r"topk_ids.dtype must be torch.int64 or torch.int32"),
    (lambda y, w, ids: (y, w[:, :1], ids), r"topk_weights.shape\[1\] must be expert_output.shape\[1\] = 2"),
    (lambda y, w, ids: (y, w[:3], ids), r"topk_weights.shape\[0\] must be expert_output.shape\[0\] = 4"),
    (lambda y, w, ids: (y.to(torch.float8_e4m3fn), w, ids), (r"expert_output.dtype must be torch.bfloat16, torch.float16 or torch.float32, "
      r"got torch.float8_e4m3fn")),
])
def test_bad_input_names_the_argument(bad, match):
    y, w, ids = _inputs(4, 2, 256)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        OP(*bad(y, w, ids), True)


def test_cpu_finalize_keeps_the_torch_forms():
    """On CPU, weight_and_reduce stays plain torch (graphs unchanged there); the op is CUDA's."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    from deepep_ops.prepare_finalize import weight_and_reduce

    y, w, ids = _inputs(6, 2, 256)
    _assert_close(weight_and_reduce(y, w, ids, False), y, w, ids, True)
    backend = EagerAndRecordGraphs()
    torch._dynamo.reset()
    got = torch.compile(weight_and_reduce, backend=backend, fullgraph=True, dynamic=True)(y, w, ids, False)
    _assert_close(got, y, w, ids, True)
    assert "weight_and_reduce" not in backend.graphs[0].code


@pytest.fixture
def stand_in_launch(monkeypatch):
    """``deepep_ops.triton_reduce`` replaced by a module whose ``launch`` writes the
    weighted sum in torch (CPU has no Triton): the traced form's own code is what
    runs."""
    import sys
    import types

    def launch(out, expert_output, topk_weights, topk_ids, apply_weights):
        w = topk_weights if apply_weights else torch.ones_like(topk_weights)
        terms = expert_output.float() * w.unsqueeze(-1)
        out.copy_(torch.where((topk_ids >= 0).unsqueeze(-1), terms, 0.0).sum(dim=1))

    module = types.ModuleType("deepep_ops.triton_reduce")
    module.launch = launch
    monkeypatch.setitem(sys.modules, "deepep_ops.triton_reduce", module)


@pytest.mark.parametrize("apply_weights", [True, False])
def test_traced_form_compiles_fullgraph_with_the_kernel_arguments(stand_in_launch, apply_weights):
    from deepep_ops.reduce import weight_and_reduce_traced

    torch._dynamo.reset()
    fn = torch.compile(weight_and_reduce_traced, backend="aot_eager", fullgraph=True, dynamic=True)
    for rows in (5, 9):
        y, w, ids = _inputs(rows, 4, 256, seed=rows)
        _assert_close(fn(y, w, ids, apply_weights), y, w, ids, apply_weights)


@pytest.mark.parametrize("bad,match", [
    (lambda y, w, ids: (y, w[:3], ids), r"topk_weights.shape\[0\] must be expert_output.shape\[0\] = 4 \(rows\), got 3"),
    (lambda y, w, ids: (y, w, ids[:3]), r"topk_ids.shape\[0\] must be expert_output.shape\[0\] = 4 \(rows\), got 3"),
    (lambda y, w, ids: (y, w[:, :1], ids), r"topk_weights.shape\[1\] must be expert_output.shape\[1\] = 2"),
])
def test_traced_form_names_the_bad_argument(stand_in_launch, bad, match):
    """As the op's checks word it: eagerly a ValueError; compiled fullgraph, the
    error Dynamo raises at trace time carries the same text."""
    import re

    from deepep_ops.reduce import weight_and_reduce_traced

    y, w, ids = _inputs(4, 2, 256)
    with pytest.raises(ValueError, match=match):
        weight_and_reduce_traced(*bad(y, w, ids), True)
    torch._dynamo.reset()
    compiled = torch.compile(weight_and_reduce_traced, backend="aot_eager", fullgraph=True, dynamic=True)
    with pytest.raises(Exception) as info:
        compiled(*bad(y, w, ids), True)
    assert re.search(match, str(info.value)), str(info.value)


def test_traced_form_checks_unbacked_rows_when_the_graph_runs(stand_in_launch):
    """Rows from two data-dependent sizes (u0, u1) that no guard can compare: the
    compile succeeds and a mismatch fails when the graph runs, not at trace time."""
    from deepep_ops.reduce import weight_and_reduce_traced

    def f(y, w, ids, rows_of_y, rows_of_w):
        i, j = rows_of_y.nonzero().squeeze(1), rows_of_w.nonzero().squeeze(1)
        return weight_and_reduce_traced(y[i], w[j], ids[j], True)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    y, w, ids = _inputs(6, 2, 256)
    rows = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    kept = rows.nonzero().squeeze(1)
    _assert_close(compiled(y, w, ids, rows, rows.clone()), y[kept], w[kept], ids[kept], True)
    with pytest.raises(RuntimeError, match="Eq"):
        compiled(y, w, ids, rows, torch.tensor([1, 0, 0, 1, 0, 1], dtype=torch.bool))


# ------------------------------------------------------------------------------------ CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("rows", [0, 1, 7, 512])
@pytest.mark.parametrize("k,H", [(8, 7168), (1, 256), (2, 256)])
@pytest.mark.parametrize("broadcast", [False, True])
def test_triton_kernel_values(rows, k, H, broadcast):
    for apply_weights in (True, False):
        y, w, ids = _inputs(rows, k, H, device="cuda", broadcast=broadcast, seed=rows + k)
        _assert_close(OP(y, w, ids, apply_weights), y, w, ids, apply_weights)


@cuda
def test_triton_kernel_fp32_and_strided_ids():
    y, w, ids = _inputs(33, 4, 384, dtype=torch.float32, device="cuda")
    ids_t = ids.t().contiguous().t()  # column-major [rows, k]
    _assert_close(OP(y, w, ids_t.int(), True), y, w, ids, True)


@cuda
def test_opcheck_cuda():
    y, w, ids = _inputs(5, 8, 7168, device="cuda")
    y = torch.nan_to_num(y)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    assert torch.library.opcheck(OP, (y, w, ids, True), test_utils=utils) == {u: "SUCCESS" for u in utils}


@cuda
def test_compiled_finalize_launches_the_kernel_and_replays():
    """Compiled (Inductor) on CUDA: the graph holds the Triton kernel itself, not the op
    (Inductor launches it); a CUDA-graph replay on new values is right."""
    from deepep_ops.prepare_finalize import weight_and_reduce

    y, w, ids = _inputs(64, 8, 7168, device="cuda")
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm.code)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    fn = torch.compile(weight_and_reduce, backend=backend, fullgraph=True, dynamic=True)
    static = [t.clone() for t in (y, w, ids)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*static, False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static, False)
    assert any("triton_kernel_wrapper_mutation" in code for code in seen), seen
    assert not any("deepep_ops.weight_and_reduce" in code for code in seen), seen
    y2, w2, ids2 = _inputs(64, 8, 7168, device="cuda", seed=5)
    for t, v in zip(static, (y2, w2, ids2)):
        t.copy_(v)
    graph.replay()
    torch.cuda.synchronize()
    _assert_close(out, y2, w2, ids2, True)
