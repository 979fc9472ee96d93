"""The seams: our own op namespace beside torchtitan's ``deepep::`` library, the
version-specific torch API behind one module, backends behind one interface."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import deepep_ops as D
import dense_reference as ref
from _dist import run_watched


def _run(code: str) -> subprocess.CompletedProcess:
    return run_watched([sys.executable, "-c", code])  # fails on a hang, not on a busy machine


def test_beside_a_foreign_deepep_library():
    """torchtitan defines ``deepep::dispatch`` and ``deepep::combine``; a process that
    loaded it first still imports deepep_ops and runs dispatch -> combine correctly."""
    code = """
import torch
lib = torch.library.Library("deepep", "DEF")
lib.define("dispatch(Tensor x, Tensor topk_idx, Tensor topk_weights, int num_experts) -> (Tensor, Tensor, Tensor)")
lib.define("combine(Tensor x, Tensor handle) -> Tensor")
import deepep_ops as D
buf = D.EPBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=8, hidden=256, num_topk=2))
x = torch.randn(5, 256).bfloat16()
idx = torch.tensor([[0, 1], [1, 2], [3, -1], [2, 0], [-1, -1]])
w = torch.rand(5, 2)
r = D.dispatch(x, idx, w, buf, num_experts=4, num_max_tokens_per_rank=8)
y = D.combine(r.recv_x, r.handle, buf)
# identity experts at world size 1: each routed token comes back once (spec §8)
expected = torch.where((idx >= 0).any(1, keepdim=True), x.float(), 0.0).bfloat16()
assert torch.equal(y, expected), (y - expected).abs().max()
assert torch.ops.deepep.dispatch.default._schema.arguments[1].name == "topk_idx"
print("ok")
"""
    res = _run(code)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_import_logs_no_deprecation():
    """torch 2.14+ logs a deprecation warning for the old opaque-object names; our
    import must not use them (deepep_ops._torch_compat picks the current API)."""
    res = _run("import deepep_ops")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "deprecated" not in res.stderr.lower(), res.stderr[-3000:]


def test_unknown_buffer_is_a_clear_type_error():
    with pytest.raises(TypeError, match=r"buffer must be a deep_ep.ElasticBuffer.*got builtins.object"):
        D.EPBuffer(object())


class _CountingBackend(D.Backend):
    """A third backend in a few lines: delegates to the reference and counts calls."""

    def __init__(self, inner):
        self.inner = D.EPBuffer(inner).backend
        self.num_ranks, self.rank, self.capacity = inner.num_ranks, 0, inner.num_max_tokens_per_rank
        self.topk_idx_dtype = torch.int64
        self.calls = []

    def dispatch(self, *args, **kwargs):
        self.calls.append(("dispatch", kwargs["num_max_tokens_per_rank"], kwargs["expand"]))
        return self.inner.dispatch(*args, **kwargs)

    def combine(self, x, handle, out=None):
        self.calls.append(("combine", handle.num_max_tokens_per_rank, handle.do_expand))
        return self.inner.combine(x, handle, out=out)


def test_a_backend_is_one_class():
    """The op kernels talk to any :class:`deepep_ops.Backend`; results match a dense MoE."""
    H, K, E = 256, 2, 4
    backend = _CountingBackend(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=16, hidden=H, num_topk=K))
    buf = D.EPBuffer(backend)
    inp = ref.make_global_inputs(0, [6], H, K, E, neg_frac=0.2)[0]
    pf = D.DeepEPPrepareFinalize(buf, E, K, decode=False)
    p = pf.prepare(inp.x, inp.topk_weights, inp.topk_idx)
    out = torch.empty_like(inp.x)
    # identity experts: finalize weights and reduces, so the result is sum_k w_k * x
    pf.finalize(out, p.expert_x.unsqueeze(1), p.topk_weights, p.topk_ids, p.handle)
    w = torch.where(inp.topk_idx >= 0, inp.topk_weights, 0.0).sum(1, keepdim=True)
    torch.testing.assert_close(out.float(), inp.x.float() * w, rtol=2e-2, atol=2e-2)
    assert backend.calls == [("dispatch", 16, True), ("combine", 16, True)]



def _same_bucket_eager_and_compiled(rank: int, world_size: int) -> list:
    """Ranks hold T = 3 and 9 under a DP-global token source (the max over ranks):
    the eager prepare (host bucket) and the compiled one (in-graph token_bucket)
    both dispatch with M = pow2(9) = 16, on both ranks."""
    import torch.distributed as dist

    H, K, E = 256, 2, 4
    Ts = [3, 9]
    inner = D.ReferenceElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=32, hidden=H, num_topk=K)
    backend = _CountingBackend(inner)
    backend.rank = rank
    buf = D.EPBuffer(backend, num_tokens_source=lambda _local: max(Ts))
    pf = D.DeepEPPrepareFinalize(buf, E, K, decode=True)
    inp = ref.make_global_inputs(1, Ts, H, K, E, neg_frac=0.2)[rank]

    def step(x, w, ids, m):
        p = pf.prepare(x, w, ids, num_max_tokens_per_rank=m)
        out = torch.empty_like(x)
        pf.finalize(out, p.expert_x.unsqueeze(1).expand(-1, K, -1), p.topk_weights, p.topk_ids, p.handle)
        return out

    eager = step(inp.x, inp.topk_weights, inp.topk_idx, buf.bucket(inp.x.shape[0]))
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")(
        inp.x, inp.topk_weights, inp.topk_idx, None
    )
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    return [m for op, m, _ in backend.calls if op == "dispatch"]


def test_eager_and_compiled_bucket_the_same_count_on_every_rank():
    from _dist import run_distributed

    assert run_distributed(_same_bucket_eager_and_compiled, 2) == [[16, 16], [16, 16]]


# --- CUDA-graph trees and the EPBuffer input (deepep_ops._torch_compat) ---------------------
# The GPU behaviour (graphs recorded and replayed on torch 2.11, a swapped buffer re-recorded)
# is in tests/test_gpu.py; here, on any torch, the two decisions the patches make.


def _fake_compiled_graph(reasons):
    import dataclasses

    from torch._inductor.cudagraph_utils import CudagraphCachedInfo

    given = {"placeholders": (), "stack_traces": [], "cudagraph_fail_reasons": list(reasons)}
    info = CudagraphCachedInfo(**{f.name: given.get(f.name, ()) for f in dataclasses.fields(CudagraphCachedInfo)})
    return type("CompiledGraph", (), {"cudagraph_info": info})()


def _fake_script_object(obj):
    from torch._library.fake_class_registry import maybe_to_fake_obj
    from torch._subclasses.fake_tensor import FakeTensorMode

    return maybe_to_fake_obj(FakeTensorMode(), obj)


def test_cudagraph_verdict_lifted_only_for_an_ep_buffer_input():
    """torch 2.11's "non-Tensor inputs" verdict is dropped for a graph whose only
    non-tensor inputs are EPBuffers (as Dynamo hands them to Inductor: fake script
    objects), other reasons stay, and any other object keeps the verdict."""
    from deepep_ops._torch_compat import _allow_marked_inputs

    buf = D.EPBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=8, hidden=256, num_topk=2))
    fake = _fake_script_object(buf)
    assert fake is not buf and getattr(fake, "real_obj", None) is buf
    inputs = [torch.ones(2), fake, torch.ones(3)]
    graph = _fake_compiled_graph(["non-Tensor inputs", "mutated inputs"])
    _allow_marked_inputs(inputs, graph)
    assert graph.cudagraph_info.cudagraph_fail_reasons == ["mutated inputs"]
    for other in (object(), "a string", None):
        graph = _fake_compiled_graph(["non-Tensor inputs"])
        _allow_marked_inputs(inputs + [other], graph)
        assert graph.cudagraph_info.cudagraph_fail_reasons == ["non-Tensor inputs"], other
    with torch._inductor.config.patch({"triton.cudagraph_trees": False}):  # no trees: nothing lifted
        graph = _fake_compiled_graph(["non-Tensor inputs"])
        _allow_marked_inputs(inputs, graph)
        assert graph.cudagraph_info.cudagraph_fail_reasons == ["non-Tensor inputs"]
    # Several partitions (prefill around dispatch_exact): 2.11 may pass tuples between them.
    graph = _fake_compiled_graph(["non-Tensor inputs"])
    graph.partition_maps = [object(), object()]
    _allow_marked_inputs(inputs, graph)
    assert graph.cudagraph_info.cudagraph_fail_reasons == ["non-Tensor inputs"]
    graph = _fake_compiled_graph(["non-Tensor inputs"])
    graph.partition_maps = [object()]
    _allow_marked_inputs(inputs, graph)
    assert graph.cudagraph_info.cudagraph_fail_reasons == []


def test_cudagraph_node_recorded_with_one_buffer_rejects_another():
    """A CUDA-graph node recorded with buffer A answers a call with buffer B with a
    mismatch (CUDA-graph trees then record anew) instead of replaying A's addresses."""
    from torch._inductor.cudagraph_trees import CUDAGraphNode
    from torch._inductor.cudagraph_utils import CheckInvariantStatus

    from deepep_ops._torch_compat import _patch_trees

    _patch_trees()
    make = lambda: D.EPBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=8, hidden=256, num_topk=2))  # noqa: E731
    a, b = make(), make()
    node = object.__new__(CUDAGraphNode)  # only what the identity check reads
    node.reconstructed_inputs = [torch.ones(2), a, 3]
    status, reason = CUDAGraphNode.check_invariants(node, [torch.ones(2), b, 3])
    assert status == CheckInvariantStatus.StaticInputIdxMismatch
    assert "EPBuffer" in reason()
    # The same buffer reaches torch's own check (which a bare node cannot pass).
    with pytest.raises(AttributeError):
        CUDAGraphNode.check_invariants(node, [torch.ones(2), a, 3])
