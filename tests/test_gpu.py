"""CUDA-graph capture and Inductor on CUDA for the compiled prepare/finalize.

Skipped without CUDA. On a GPU machine:

    python -m pytest -q tests/test_gpu.py

World size 1 on one GPU (the reference buffer needs no process group there);
the same code runs per rank on several GPUs over NCCL.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

E, H, I, K, CAPACITY = 8, 256, 128, 2, 64


def _layer(decode: bool, native=None):
    import deepep_ops
    from deepep_ops.moe import MoELayer, make_moe_weights
    from deepep_ops.prepare_finalize import DeepEPPrepareFinalize

    device = torch.device("cuda")
    if native is None:
        native = deepep_ops.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAPACITY, hidden=H, num_topk=K)
    buffer = deepep_ops.EPOpsBuffer(native)
    weights = make_moe_weights(E, H, I, seed=3)
    weights = type(weights)(*(w.to(device) for w in weights))
    pf = DeepEPPrepareFinalize(buffer, E, K, decode=decode, device=device)
    return MoELayer(weights, pf).to(device), weights


def _tokens(T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=g).to("cuda", torch.bfloat16)


def _dense(x, weights):
    """The independent dense answer (tests/dense_reference.py, no deepep_ops code) on x's device."""
    import dense_reference as ref

    return ref.dense_moe_layer(x, *weights, K)[0].to(x.device)


def _describe(ir_node) -> str:
    """An Inductor IR node as the op it runs ("output of <op>" for a multi-output's item)."""
    op = getattr(ir_node, "op_overload", None)
    if op is not None:
        return str(op)
    if type(ir_node).__name__ == "MultiOutput":
        return f"output of {_describe(ir_node.inputs[0])}"
    return type(ir_node).__name__


@contextlib.contextmanager
def _record_partitions():
    """Graph partitioning on; yields the list of (op, reason) Inductor keeps out of CUDA graphs."""
    import torch._inductor.config as inductor_config
    from torch._inductor.scheduler import Scheduler

    seen = []
    original = Scheduler.should_partition

    def recording(self, node, *args, **kwargs):
        reason = original(self, node, *args, **kwargs)
        if reason and node.node is not None:
            seen.append((_describe(node.node), reason))
        return reason

    Scheduler.should_partition = recording
    try:
        # No FX graph cache: a cache hit skips scheduling, and with it the partitioning we record.
        with inductor_config.patch(graph_partition=True, fx_graph_cache=False):
            yield seen
    finally:
        Scheduler.should_partition = original


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_decode_reduce_overhead_replays_without_skips():
    """mode="reduce-overhead": no cudagraph skips, nothing partitioned out of CUDA graphs,
    and several T sharing bucket 8 give correct results, T padded to the bucket so that
    CUDA-graph trees record one graph per bucket (that they do capture is the next test)."""
    from torch._dynamo.utils import counters

    from deepep_ops import pow2_bucket

    layer, weights = _layer(decode=True)
    with _record_partitions() as partitioned:
        compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True, dynamic=True)
        for step, T in enumerate([5, 6, 7, 8, 5, 3, 8, 6]):
            m = pow2_bucket(T, CAPACITY)
            x = _tokens(T, seed=step)
            # Padding rows route like real ones; their outputs are dropped.
            x_padded = torch.cat([x, x.new_zeros(m - T, H)])
            out = compiled(x_padded, m)[:T].clone()
            torch.testing.assert_close(out, layer(x_padded, m)[:T], atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(out.float(), _dense(x, weights).float(), atol=3e-2, rtol=3e-2)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    print("decode: ops kept out of CUDA graphs:", partitioned)
    assert partitioned == [], partitioned


def _cuda_graph_launches(fn, *args, calls: int = 3) -> int:
    """How many CUDA graphs ``calls`` calls of ``fn`` launch (profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn(*args)
        torch.cuda.synchronize()
    return sum("cudaGraphLaunch" in e.name for e in prof.events())


def _reduce_overhead_call(compiled):
    """One serving step of a mode="reduce-overhead" function: a new step begins (the
    previous outputs may be overwritten), and the output is copied out of the pool."""

    def call(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args).clone()

    return call


def test_decode_reduce_overhead_launches_cuda_graphs():
    """Past warm-up and recording each decode call is one CUDA-graph launch, with the
    EPOpsBuffer as a graph input (torch 2.11 needs deepep_ops._torch_compat's backport),
    and T = 5..8 padded to their bucket replay that one graph with correct results."""
    from torch._dynamo.utils import counters

    from deepep_ops import pow2_bucket

    layer, weights = _layer(decode=True)
    call = _reduce_overhead_call(torch.compile(layer, mode="reduce-overhead", fullgraph=True, dynamic=True))
    m = pow2_bucket(8, CAPACITY)
    for step in range(3):  # warm-up, record, replay
        call(_tokens(m, seed=100 + step), m)
    x = _tokens(m, seed=0)
    assert _cuda_graph_launches(call, x, m) == 3
    for step, T in enumerate([5, 6, 7, 8, 5]):
        x = _tokens(T, seed=step)
        x_padded = torch.cat([x, x.new_zeros(m - T, H)])
        out = call(x_padded, m)[:T]
        torch.testing.assert_close(out, layer(x_padded, m)[:T], atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(out.float(), _dense(x, weights).float(), atol=3e-2, rtol=3e-2)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def _scaled_reference(scale: float):
    """A :class:`ReferenceElasticBuffer` whose combine scales by a tensor it holds on
    the GPU, as DeepEP's buffer holds device memory that a captured graph bakes in."""
    import deepep_ops

    class ScaledReference(deepep_ops.ReferenceElasticBuffer):
        def combine(self, x, handle, **kwargs):
            out, weights, event = super().combine(x, handle, **kwargs)
            return (out.float() * self.scale).bfloat16(), weights, event

    buf = ScaledReference(None, num_max_tokens_per_rank=CAPACITY, hidden=H, num_topk=K)
    buf.scale = torch.tensor(scale, device="cuda")
    return buf


def test_reduce_overhead_replays_each_buffer_its_own_graph():
    """Two EPBuffers share one compiled graph (Dynamo guards the opaque type, not the
    object); a CUDA graph recorded with one must not be replayed for the other,
    which would run the first buffer's device memory (deepep_ops._torch_compat's guard)."""
    from deepep_ops import EPOpsBuffer, pow2_bucket

    layer, weights = _layer(decode=True, native=_scaled_reference(1.0))
    buffers = {1.0: layer.pf.buffer, 3.0: EPOpsBuffer(_scaled_reference(3.0))}
    call = _reduce_overhead_call(torch.compile(layer, mode="reduce-overhead", fullgraph=True, dynamic=True))
    m = pow2_bucket(8, CAPACITY)
    for step, scale in enumerate([1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 1.0, 3.0, 1.0, 3.0]):
        layer.pf.buffer = buffers[scale]
        x = _tokens(m, seed=step)
        want = _dense(x, weights).float() * scale
        torch.testing.assert_close(call(x, m).float(), want, atol=3e-2 * scale, rtol=3e-2)
    assert _cuda_graph_launches(call, x, m) == 3


def test_decode_manual_cuda_graph_capture_replays():
    """The compiled decode step captured with torch.cuda.graph replays correctly on new inputs."""
    from deepep_ops import pow2_bucket

    layer, weights = _layer(decode=True)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    T = 6
    m = pow2_bucket(T, CAPACITY)
    static_x = _tokens(T, seed=0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and warm up outside the capture
            compiled(static_x, m)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = compiled(static_x, m)
    for seed in range(1, 4):
        x = _tokens(T, seed=seed)
        static_x.copy_(x)
        graph.replay()
        torch.testing.assert_close(static_out, layer(x, m), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(static_out.float(), _dense(x, weights).float(), atol=3e-2, rtol=3e-2)


def test_prefill_only_exact_dispatch_leaves_cuda_graphs():
    """Prefill under reduce-overhead with graph partitioning: correct results, and the
    only op Inductor partitions out of CUDA graphs is deepep_ops::dispatch_exact.

    Reasons Inductor gives (torch 2.11, H100): the op, "unbacked binding ops"; the
    items of its output tuple, "CUDAGraph-unsafe custom ops"; the checks of its
    unbacked sizes' bounds (AssertScalar), "cpu ops".
    """
    layer, weights = _layer(decode=False)
    with _record_partitions() as partitioned:
        compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True, dynamic=True)
        for step, T in enumerate([40, 17, 40]):
            x = _tokens(T, seed=step)
            out = compiled(x).clone()
            torch.testing.assert_close(out, layer(x), atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(out.float(), _dense(x, weights).float(), atol=3e-2, rtol=3e-2)
    print("prefill: ops kept out of CUDA graphs:", partitioned)
    ops = {op for op, _reason in partitioned}
    # dispatch_exact, the unpacking of its outputs and the host-side checks of the
    # bounds its fake declares on the unbacked sizes (AssertScalar): nothing else.
    exact = "deepep_ops.dispatch_exact.default"
    assert exact in ops, partitioned
    assert ops <= {exact, f"output of {exact}", "AssertScalar"}, partitioned


# ============================================================================================
# Issue 14 (training): cached dispatch and the backward on real DeepEP at R = 1, compared
# with the reference buffer. Skips without deep_ep. Kept in this block on its own.
# ============================================================================================
@pytest.fixture(scope="module")
def nccl_world(tmp_path_factory):
    """torch.distributed over NCCL at world size 1 (real DeepEP needs a process group),
    shared by every real-DeepEP test of this module."""
    pytest.importorskip("deep_ep")
    import torch.distributed as dist

    torch.cuda.set_device(0)
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def training_buffers(nccl_world):
    """(EPOpsBuffer over deep_ep.ElasticBuffer, EPOpsBuffer over ReferenceElasticBuffer) for the training tests."""
    import deep_ep

    import deepep_ops

    native = deep_ep.ElasticBuffer(
        nccl_world, num_max_tokens_per_rank=CAPACITY, hidden=H, num_topk=K, explicitly_destroy=True
    )
    reference = deepep_ops.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAPACITY, hidden=H, num_topk=K)
    try:
        yield deepep_ops.EPOpsBuffer(native), deepep_ops.EPOpsBuffer(reference)
    finally:
        native.destroy()


def _routing(T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K]
    ids = torch.where(torch.rand(T, K, generator=g) < 0.2, -1, ids)
    w = torch.rand(T, K, generator=g)
    return ids.to("cuda"), w.to("cuda")


def _dispatch(buffer, x, ids, w, exact: bool, A: int):
    import deepep_ops

    if exact:
        return deepep_ops.dispatch_exact(x, ids, w, buffer, num_experts=E, num_max_tokens_per_rank=CAPACITY,
                                         expert_alignment=A)
    return deepep_ops.dispatch(x, ids, w, buffer, num_experts=E, num_max_tokens_per_rank=32)


class TestTrainingOnDeepEP:
    @pytest.mark.parametrize("exact,A", [(False, 1), (True, 1), (True, 4)])
    def test_cached_dispatch_matches_reference(self, training_buffers, exact, A):
        import deepep_ops

        real, refb = training_buffers
        x = _tokens(20, seed=1)
        ids, w = _routing(20, seed=1)
        rows = []
        for buffer in (real, refb):
            r = _dispatch(buffer, x, ids, w, exact, A)
            got, _ = deepep_ops.cached_dispatch(x * 3, r.handle, buffer)
            n = r.recv_x.shape[0] if exact else int(r.handle.psum_num_recv_tokens_per_scaleup_rank[-1])
            # The handle's layout, reused: row i carries what row i of the first dispatch
            # carried, times 3 (real DeepEP's decode row order can change between two
            # fresh dispatches, so a second dispatch is no reference).
            torch.testing.assert_close(got[:n], r.recv_x[:n] * 3, atol=0, rtol=0)
            rows.append(got[:n].float())
        # Across backends the same rows arrive, in whatever order each backend chose.
        real_rows, ref_rows = (t[torch.argsort(t.sum(dim=1))] for t in rows)
        torch.testing.assert_close(real_rows, ref_rows, atol=0, rtol=0)

    @pytest.mark.parametrize("exact", [False, True])
    def test_backward_matches_reference(self, training_buffers, exact):
        """Grads of x and topk_weights through dispatch → weighting → combine, DeepEP vs reference."""
        import deepep_ops

        grads = []
        for buffer in training_buffers:
            x = _tokens(20, seed=2).requires_grad_()
            ids, w = _routing(20, seed=2)
            w = w.requires_grad_()
            r = _dispatch(buffer, x, ids, w, exact, 2 if exact else 1)
            if exact:
                rows = (r.recv_x.float() * r.recv_topk_weights.unsqueeze(1)).bfloat16()
            else:
                n = r.handle.psum_num_recv_tokens_per_scaleup_rank[-1]
                real = (torch.arange(r.recv_x.shape[0], device="cuda") < n).unsqueeze(1)
                lanes = ((r.recv_topk_idx >= 0) & real).unsqueeze(2)
                terms = r.recv_x.float().unsqueeze(1) * r.recv_topk_weights.unsqueeze(2)
                rows = torch.where(lanes, terms, 0.0).sum(dim=1).bfloat16()
            out = deepep_ops.combine(rows, r.handle, buffer)
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to("cuda")
            (out.float() * g).sum().backward()
            grads.append((x.grad, w.grad))
        (rx, rw), (fx, fw) = grads
        torch.testing.assert_close(rx.float(), fx.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(rw, fw, atol=2e-2, rtol=2e-2)


# =============================================================================
# Real DeepEP v2 (deep_ep.ElasticBuffer) on one GPU: world size 1 over NCCL.
# Skipped without deep_ep. Every output is checked against its fake kernel
# (shapes, dtypes, strides; prefill's unbacked sizes inside their declared
# ranges) and against the reference buffer on the same inputs; combine also
# against x * (routed lanes), computed here. H, K, E, the buckets and the
# capacity are few and fixed: every new M costs DeepEP a JIT compile (docs/deepep_contract.md §5, §8).
# =============================================================================

DE_H, DE_K, DE_E, DE_CAP, DE_M = 2048, 8, 64, 64, 8


@pytest.fixture(scope="module")
def deepep_buffers(nccl_world):
    """(EPOpsBuffer over deep_ep.ElasticBuffer, EPOpsBuffer over ReferenceElasticBuffer), world size 1."""
    import deep_ep

    import deepep_ops

    group = nccl_world
    # Sized for bf16 rows, which also holds fp8 rows plus their scales.
    native = deep_ep.ElasticBuffer(
        group, num_max_tokens_per_rank=DE_CAP, hidden=DE_H, num_topk=DE_K, use_fp8_dispatch=False,
        explicitly_destroy=True,
    )
    reference = deepep_ops.ReferenceElasticBuffer(None, num_max_tokens_per_rank=DE_CAP, hidden=DE_H, num_topk=DE_K)
    try:
        yield deepep_ops.EPOpsBuffer(native), deepep_ops.EPOpsBuffer(reference)
    finally:
        native.destroy()


def _de_inputs(T: int, fp8: bool, seed: int, neg_frac: float = 0.2):
    """x (bf16, or fp8 + float32 scales), int64 ids with some -1 slots, float32 weights, on the GPU."""
    import dense_reference as ref

    (inp,) = ref.make_global_inputs(seed, (T,), DE_H, DE_K, DE_E, fp8=fp8, neg_frac=neg_frac)
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    return cuda(inp.x), cuda(inp.x_scales), cuda(inp.topk_idx), cuda(inp.topk_weights)


def _meta(t: Optional[torch.Tensor]) -> Optional[tuple]:
    return None if t is None else (tuple(t.shape), t.dtype, tuple(t.stride()), t.storage_offset())


def _fake_metas(args, op, subs_sizes):
    """Metadata of ``op``'s fake outputs on ``args``, symbols replaced by the real values."""
    import sympy
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv, free_unbacked_symbols

    shape_env = ShapeEnv()
    with FakeTensorMode(shape_env=shape_env) as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        out = op(*fake_args)
    if isinstance(out, torch.Tensor):  # combine: one tensor
        out = [out]
    # Backed symbols (from_tensor under a ShapeEnv) take their example values.
    backed = shape_env.backed_var_to_val if hasattr(shape_env, "backed_var_to_val") else shape_env.var_to_val
    subs = {k: sympy.Integer(v) for k, v in backed.items()}
    if subs_sizes is not None:  # dispatch_exact: the first two outputs are N and X, unbacked
        for sym_int, real in zip(out[:2], subs_sizes):
            (u,) = free_unbacked_symbols(sym_int.node.expr)
            vr = shape_env.var_to_range[u]
            assert vr.lower <= real <= vr.upper, f"real size {real} outside the fake's range {vr}"
            subs[u] = sympy.Integer(real)
        for asserts in shape_env.deferred_runtime_asserts.values():
            for ra in asserts:
                assert bool(ra.expr.xreplace(subs)), f"fake's {ra.expr} is false for {subs}"
        out = out[2:]

    def value(s):
        return s if isinstance(s, int) else int(sympy.sympify(s.node.expr).xreplace(subs))

    return [
        None if t is None else
        (tuple(value(s) for s in t.shape), t.dtype, tuple(value(s) for s in t.stride()), value(t.storage_offset()))
        for t in out
    ]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_deepep_outputs_match_fakes(deepep_buffers, fp8):
    """dispatch, dispatch_exact and both combines on real DeepEP: every output as its fake says."""
    from deepep_ops.layout import decode_num_expanded_tokens

    buf, _ = deepep_buffers
    x, s, idx, w = _de_inputs(6, fp8, seed=1)
    dec_args = (x, s, idx, w, buf, DE_E, DE_M, 1)
    dec = torch.ops.deepep_ops.dispatch(*dec_args)
    assert [_meta(t) for t in dec] == _fake_metas(dec_args, torch.ops.deepep_ops.dispatch, None)
    ex_args = (x, s, idx, w, buf, DE_E, DE_CAP, 1)
    N, X, *ex = torch.ops.deepep_ops.dispatch_exact(*ex_args)
    assert (N, X) == (ex[7].shape[0], ex[0].shape[0])
    assert [_meta(t) for t in ex] == _fake_metas(ex_args, torch.ops.deepep_ops.dispatch_exact, (N, X))
    worst = decode_num_expanded_tokens(1, DE_M, DE_K, DE_E, 1)
    # combine's schema: rows, buffer, topk_idx, the five handle tensors (outputs[4:9] of both
    # dispatches once N, X are off dispatch_exact's), E, M, A, decode, X (direct mode: no hybrid tensors)
    for rows, handle, m, decode, n_exp in ((dec[0], dec[4:9], DE_M, True, worst), (ex[0], ex[4:9], DE_CAP, False, X)):
        y = torch.randn(rows.shape[0], DE_H, device="cuda").bfloat16()
        c_args = (y, buf, idx, *handle, DE_E, m, 1, decode, n_exp)
        out = torch.ops.deepep_ops.combine(*c_args)
        assert [_meta(out)] == _fake_metas(c_args, torch.ops.deepep_ops.combine, None)


def _rows_by_source(recv, handle, n: int):
    """The first ``n`` rows of ``recv`` ordered by source token (DeepEP's order within a
    source rank is not deterministic, contract §2, §8)."""
    order = handle.recv_src_metadata[:n, 0].argsort()
    return recv[:n][order]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_deepep_decode_matches_reference(deepep_buffers, fp8):
    """Decode dispatch layout and combine: deep_ep == the reference buffer == x * [routed]."""
    import deepep_ops

    buf, ref_buf = deepep_buffers
    for T, seed in ((1, 2), (5, 3), (8, 4)):
        x, s, idx, w = _de_inputs(T, fp8, seed)
        got = deepep_ops.dispatch(x, idx, w, buf, num_experts=DE_E, num_max_tokens_per_rank=DE_M, x_scales=s)
        want = deepep_ops.dispatch(x, idx, w, ref_buf, num_experts=DE_E, num_max_tokens_per_rank=DE_M, x_scales=s)
        torch.testing.assert_close(got.handle.psum_num_recv_tokens_per_scaleup_rank,
                                   want.handle.psum_num_recv_tokens_per_scaleup_rank)
        n = int(want.handle.psum_num_recv_tokens_per_scaleup_rank[-1])
        assert n == int((idx >= 0).any(dim=1).sum())
        pairs = [(got.recv_x, want.recv_x), (got.recv_topk_idx, want.recv_topk_idx),
                 (got.recv_topk_weights, want.recv_topk_weights)]
        if fp8:
            pairs.append((got.recv_x_scales, want.recv_x_scales))
        for a, b in pairs:
            a_rows, b_rows = _rows_by_source(a, got.handle, n), _rows_by_source(b, want.handle, n)
            if a.dtype == torch.float8_e4m3fn:
                a_rows, b_rows = a_rows.view(torch.uint8), b_rows.view(torch.uint8)
            if a is got.recv_topk_weights:  # weights of lanes owned elsewhere are unspecified
                lanes = _rows_by_source(want.recv_topk_idx, want.handle, n) >= 0
                a_rows, b_rows = a_rows[lanes], b_rows[lanes]
            assert torch.equal(a_rows, b_rows), a.dtype
        # combine the (dequantized) received rows: each token comes back once (R = 1)
        y = got.recv_x.float() if not fp8 else got.recv_x.float() * got.recv_x_scales.repeat_interleave(128, 1)
        out = deepep_ops.combine(y.bfloat16(), got.handle, buf)
        x_float = x.float() if not fp8 else x.float() * s.repeat_interleave(128, 1)
        expected = (x_float * (idx >= 0).any(dim=1, keepdim=True)).bfloat16()
        assert torch.equal(out, expected)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_deepep_prefill_matches_reference(deepep_buffers, fp8):
    """Prefill (expand) layout and combine: per-expert counts and rows as the reference's,
    combine == x * (routed lanes)."""
    import deepep_ops

    buf, ref_buf = deepep_buffers
    x, s, idx, w = _de_inputs(40, fp8, seed=5)
    got = deepep_ops.dispatch_exact(x, idx, w, buf, num_experts=DE_E, num_max_tokens_per_rank=DE_CAP, x_scales=s)
    want = deepep_ops.dispatch_exact(x, idx, w, ref_buf, num_experts=DE_E, num_max_tokens_per_rank=DE_CAP,
                                     x_scales=s)
    assert torch.equal(got.num_recv_tokens_per_expert, want.num_recv_tokens_per_expert)
    assert got.recv_x.shape == want.recv_x.shape and got.handle.num_expanded_tokens == want.handle.num_expanded_tokens
    # Rows of one expert as a multiset: sort each expert's group by its (bytes of the) row.
    start = 0
    for count in want.num_recv_tokens_per_expert.tolist():
        a = got.recv_x[start:start + count].view(torch.uint8).cpu()
        b = want.recv_x[start:start + count].view(torch.uint8).cpu()
        key = lambda r: sorted(map(tuple, r.tolist()))  # noqa: E731
        assert key(a) == key(b)
        start += count
    y = got.recv_x.float() if not fp8 else got.recv_x.float() * got.recv_x_scales.repeat_interleave(128, 1)
    out = deepep_ops.combine(y.bfloat16(), got.handle, buf)
    x_float = x.float() if not fp8 else x.float() * s.repeat_interleave(128, 1)
    expected = x_float * (idx >= 0).sum(dim=1, keepdim=True)
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)


def _assert_rel_err(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """‖out − ref‖ / ‖ref‖ below ``tol`` (bf16 operands: 1e-3 … 1e-2; fp8 tokens more)."""
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < tol, f"relative error {err:.2e} >= {tol}"


def _de_dense(x, weights):
    """The independent dense answer (tests/dense_reference.py) for the real-DeepEP layers."""
    import dense_reference as ref

    return ref.dense_moe_layer(x, *weights, DE_K)[0].to(x.device)


def _deepep_layer(buf, decode: bool, fp8: bool):
    from deepep_ops.moe import MoELayer, make_moe_weights
    from deepep_ops.prepare_finalize import DeepEPPrepareFinalize

    weights = make_moe_weights(DE_E, DE_H, 128, seed=3)
    weights = type(weights)(*(w.cuda() for w in weights))
    pf = DeepEPPrepareFinalize(buf, DE_E, DE_K, decode=decode, use_fp8_dispatch=fp8, device="cuda")
    return MoELayer(weights, pf).cuda(), weights


def _capture_compiled(layer, T: int, g: torch.Generator):
    """``layer`` compiled (fullgraph, dynamic), warmed up on a side stream and captured with
    torch.cuda.graph for [T, H] bf16 inputs: ``(graph, static_x, static_out)``."""
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    static_x = torch.randn(T, DE_H, generator=g).cuda().bfloat16()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            compiled(static_x, DE_M)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = compiled(static_x, DE_M)
    return graph, static_x, static_out


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_deepep_compiled_decode_replays_from_cuda_graph(deepep_buffers, fp8):
    """The compiled decode MoE step on real DeepEP, captured with torch.cuda.graph, replays
    correctly on new inputs (against the eager step and the dense MoE)."""
    buf, _ = deepep_buffers
    layer, weights = _deepep_layer(buf, decode=True, fp8=fp8)
    T = 6
    g = torch.Generator().manual_seed(0)
    graph, static_x, static_out = _capture_compiled(layer, T, g)
    tol = dict(atol=6e-2, rtol=6e-2) if fp8 else dict(atol=2e-2, rtol=2e-2)
    for _ in range(3):
        x = torch.randn(T, DE_H, generator=g).cuda().bfloat16()
        static_x.copy_(x)
        graph.replay()
        torch.testing.assert_close(static_out, layer(x, DE_M), **tol)
        _assert_rel_err(static_out, _de_dense(x, weights), 5e-2 if fp8 else 2e-2)


def test_deepep_prefill_only_exact_dispatch_leaves_cuda_graphs(deepep_buffers):
    """Prefill on real DeepEP under reduce-overhead with graph partitioning: correct, and only
    deepep_ops::dispatch_exact (and its outputs, bound checks) is kept out of CUDA graphs."""
    buf, _ = deepep_buffers
    layer, weights = _deepep_layer(buf, decode=False, fp8=False)
    with _record_partitions() as partitioned:
        compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True, dynamic=True)
        for step, T in enumerate([40, 17, 40]):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(T, DE_H, generator=g).cuda().bfloat16()
            out = compiled(x).clone()
            torch.testing.assert_close(out, layer(x), atol=2e-2, rtol=2e-2)
            _assert_rel_err(out, _de_dense(x, weights), 2e-2)
    exact = "deepep_ops.dispatch_exact.default"
    ops = {op for op, _reason in partitioned}
    assert exact in ops and ops <= {exact, f"output of {exact}", "AssertScalar"}, partitioned


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_deepep_decode_reduce_overhead_launches_cuda_graphs(deepep_buffers, fp8):
    """mode="reduce-overhead" on real DeepEP: each decode call past recording is one
    CUDA-graph launch, with correct results on new inputs (eager step, dense MoE)."""
    buf, _ = deepep_buffers
    layer, weights = _deepep_layer(buf, decode=True, fp8=fp8)
    call = _reduce_overhead_call(torch.compile(layer, mode="reduce-overhead", fullgraph=True, dynamic=True))
    T = 6
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randn(T, DE_H, generator=g).cuda().bfloat16() for _ in range(6)]
    for x in tokens[:3]:  # warm-up, record, replay
        call(x, DE_M)
    assert _cuda_graph_launches(call, tokens[0], DE_M) == 3
    tol = dict(atol=6e-2, rtol=6e-2) if fp8 else dict(atol=2e-2, rtol=2e-2)
    for x in tokens[3:]:
        out = call(x, DE_M)
        torch.testing.assert_close(out, layer(x, DE_M), **tol)
        _assert_rel_err(out, _de_dense(x, weights), 5e-2 if fp8 else 2e-2)


# --- asynchrony on real DeepEP (issue 33): async_with_compute_stream, stream fork/join in capture -----
@pytest.mark.parametrize("exact", [False, True], ids=["decode", "prefill"])
def test_deepep_async_pairs_equal_the_synchronous_ops(deepep_buffers, exact):
    """dispatch_start → (a matmul on the compute stream) → dispatch_wait, then combine_start →
    combine_wait, on DeepEP's communication stream: the rows the synchronous ops receive (bitwise, as
    multisets) and what they combine."""
    import deepep_ops

    buf, _ = deepep_buffers
    x, _s, idx, w = _de_inputs(40, False, seed=9)
    kw = dict(num_experts=DE_E, num_max_tokens_per_rank=DE_CAP)
    sync = (deepep_ops.dispatch_exact if exact else deepep_ops.dispatch)(x, idx, w, buf, **kw)
    start = deepep_ops.dispatch_exact_start if exact else deepep_ops.dispatch_start
    pending = start(x, idx, w, buf, **kw)
    busy = torch.randn(1024, 1024, device="cuda") @ torch.randn(1024, 1024, device="cuda")
    got = deepep_ops.dispatch_wait(pending, overlap=[busy])
    # DeepEP's row order differs from call to call: compare the received rows as multisets,
    # each set ordered by a random projection of its rows (equal rows, equal keys).
    n = int(got.handle.psum_num_recv_tokens_per_scaleup_rank[-1])
    assert n == int(sync.handle.psum_num_recv_tokens_per_scaleup_rank[-1])
    probe = torch.randn(DE_H, device="cuda", dtype=torch.float64)

    def rows(result):
        r = result.recv_x if exact else result.recv_x[:n]  # prefill: exactly the received rows
        return r[(r.double() @ probe).argsort()]

    assert rows(got).shape == rows(sync).shape and torch.equal(rows(got), rows(sync))
    y = got.recv_x.float().mul(0.5).bfloat16()
    want = deepep_ops.combine(sync.recv_x.float().mul(0.5).bfloat16(), sync.handle, buf)
    out = deepep_ops.combine_wait(deepep_ops.combine_start(y, got.handle, buf))
    torch.testing.assert_close(out, want)
    expected = x.float() * 0.5 * ((idx >= 0).sum(1, keepdim=True) if exact else (idx >= 0).any(1, keepdim=True))
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_deepep_pinned_num_sms(deepep_buffers):
    """EPOpsBuffer(num_sms=16) over the same DeepEP buffer: DeepEP runs dispatch and combine on 16 SMs
    (its handle says so), the async pair too, and the combine equals x * [routed]; more SMs than
    the GPU has is a clear error."""
    import deepep_ops

    buf, _ = deepep_buffers
    native = buf.backend.buffer
    pinned = deepep_ops.EPOpsBuffer(native, num_sms=16)
    x, _s, idx, w = _de_inputs(8, False, seed=11)
    expected = (x.float() * (idx >= 0).any(dim=1, keepdim=True)).bfloat16()
    kw = dict(num_experts=DE_E, num_max_tokens_per_rank=DE_M)
    got = deepep_ops.dispatch(x, idx, w, pinned, **kw)
    assert got.handle.native.num_sms == 16
    assert torch.equal(deepep_ops.combine(got.recv_x, got.handle, pinned), expected)
    got = deepep_ops.dispatch_wait(deepep_ops.dispatch_start(x, idx, w, pinned, **kw))
    assert torch.equal(deepep_ops.combine_wait(deepep_ops.combine_start(got.recv_x, got.handle, pinned)), expected)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    with pytest.raises(ValueError, match=rf"num_sms must be >= 1 and <= {sms} \(this GPU's SMs\), got {sms + 2}"):
        deepep_ops.EPOpsBuffer(native, num_sms=sms + 2)


def test_deepep_overlapped_layer_replays_from_cuda_graph(deepep_buffers):
    """The compiled decode layer with its shared expert between dispatch start and wait,
    captured in one CUDA graph (DeepEP's stream fork and join inside the capture), replays
    correctly on new inputs against the dense MoE with the shared expert."""
    import dense_reference as ref

    from deepep_ops.moe import MoELayer, make_moe_weights, make_shared_weights
    from deepep_ops.prepare_finalize import DeepEPPrepareFinalize

    buf, _ = deepep_buffers
    weights = make_moe_weights(DE_E, DE_H, 128, seed=3)
    weights = type(weights)(*(w.cuda() for w in weights))
    shared = make_shared_weights(DE_H, 256)
    shared = type(shared)(*(w.cuda() for w in shared))
    pf = DeepEPPrepareFinalize(buf, DE_E, DE_K, decode=True, device="cuda")
    layer = MoELayer(weights, pf, shared, overlap=True).cuda()
    T = 6
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        graph, static_x, static_out = _capture_compiled(layer, T, g)
        for _ in range(3):
            x = torch.randn(T, DE_H, generator=g).cuda().bfloat16()
            static_x.copy_(x)
            graph.replay()
            dense = ref.dense_moe_layer(x, *weights, DE_K)[0].to(x.device).float()
            dense = dense + (torch.nn.functional.silu(x.float() @ shared.w_gate) * (x.float() @ shared.w_up)) @ shared.w_down
            _assert_rel_err(static_out, dense, 2e-2)
    assert buf.pending is None
