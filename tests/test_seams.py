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
buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=8, hidden=256, num_topk=2))
x = torch.randn(5, 256).bfloat16()
idx = torch.tensor([[0, 1], [1, 2], [3, -1], [2, 0], [-1, -1]])
w = torch.rand(5, 2)
r = D.dispatch(x, idx, w, buf, num_experts=4, num_max_tokens_per_rank=8)
y = D.combine(r.recv_x, r.handle, buf)
# identity experts at world size 1: each routed token comes back once (docs/deepep_contract.md §8)
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


def test_epbuffer_is_a_deprecated_alias():
    """The old name of EPOpsBuffer (renamed: DeepEP v2.5's own buffer is deep_ep.EPBuffer) still
    works, with a DeprecationWarning naming the new one, from the package and from its module."""
    import deepep_ops.buffer

    with pytest.warns(DeprecationWarning, match=r"deepep_ops.EPBuffer is deprecated, use deepep_ops.EPOpsBuffer"):
        assert D.EPBuffer is D.EPOpsBuffer
    with pytest.warns(DeprecationWarning, match=r"deepep_ops.buffer.EPBuffer is deprecated"):
        from deepep_ops.buffer import EPBuffer
    assert EPBuffer is D.EPOpsBuffer and "EPBuffer" not in D.__all__
    with pytest.raises(AttributeError, match="has no attribute 'EPBufer'"):
        D.EPBufer
    # Nothing in the package uses the old name: importing it and running an op raise no
    # DeprecationWarning from deepep_ops code (the alias attributes it to its caller).
    res = _run("import warnings\n"
               "warnings.filterwarnings('error', category=DeprecationWarning, module=r'(deepep_ops|fake_impls)(\\.|$)')\n"
               "import deepep_ops as D, torch\n"
               "b = D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=8, hidden=256, num_topk=2))\n"
               "r = D.dispatch(torch.zeros(3, 256).bfloat16(), torch.tensor([[0, 1]] * 3), torch.ones(3, 2), b, "
               "num_experts=2, num_max_tokens_per_rank=4)\n"
               "D.combine(r.recv_x, r.handle, b); print('ok')")
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_unknown_buffer_is_a_clear_type_error():
    with pytest.raises(TypeError, match=r"buffer must be a DeepEP buffer \(deep_ep.ElasticBuffer, v2.1, or "
                                        r"deep_ep.EPBuffer, v2.5\).*got builtins.object"):
        D.EPOpsBuffer(object())


class _CountingBackend(D.Backend):
    """A third backend in a few lines: delegates to the reference and counts calls."""

    def __init__(self, inner):
        self.inner = D.EPOpsBuffer(inner).backend
        self.num_ranks, self.rank, self.capacity = inner.num_ranks, 0, inner.num_max_tokens_per_rank
        self.topk_idx_dtype = torch.int64
        self.calls = []

    def dispatch(self, args):
        self.calls.append(("dispatch", args.num_max_tokens_per_rank, args.decode))
        return self.inner.dispatch(args)

    def combine(self, x, handle, out=None):
        self.calls.append(("combine", handle.num_max_tokens_per_rank, handle.decode))
        return self.inner.combine(x, handle, out=out)


def test_a_backend_is_one_class():
    """The op kernels talk to any :class:`deepep_ops.Backend`; results match a dense MoE."""
    H, K, E = 256, 2, 4
    backend = _CountingBackend(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=16, hidden=H, num_topk=K))
    buf = D.EPOpsBuffer(backend)
    inp = ref.make_global_inputs(0, [6], H, K, E, neg_frac=0.2)[0]
    pf = D.DeepEPPrepareFinalize(buf, E, K, decode=False)
    p = pf.prepare(inp.x, inp.topk_weights, inp.topk_idx)
    out = torch.empty_like(inp.x)
    # identity experts: finalize weights and reduces, so the result is sum_k w_k * x
    pf.finalize(out, p.expert_x.unsqueeze(1), p.topk_weights, p.topk_ids, p.handle)
    w = torch.where(inp.topk_idx >= 0, inp.topk_weights, 0.0).sum(1, keepdim=True)
    torch.testing.assert_close(out.float(), inp.x.float() * w, rtol=2e-2, atol=2e-2)
    assert backend.calls == [("dispatch", 16, False), ("combine", 16, False)]



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
    buf = D.EPOpsBuffer(backend, num_tokens_source=lambda _local: max(Ts))
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


# --- CUDA-graph trees and the EPOpsBuffer input (deepep_ops._torch_compat) ---------------------
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

    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=8, hidden=256, num_topk=2))
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
    make = lambda: D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=8, hidden=256, num_topk=2))  # noqa: E731
    a, b = make(), make()
    node = object.__new__(CUDAGraphNode)  # only what the identity check reads
    node.reconstructed_inputs = [torch.ones(2), a, 3]
    status, reason = CUDAGraphNode.check_invariants(node, [torch.ones(2), b, 3])
    assert status == CheckInvariantStatus.StaticInputIdxMismatch
    assert "EPOpsBuffer" in reason()
    # The same buffer reaches torch's own check (which a bare node cannot pass).
    with pytest.raises(AttributeError):
        CUDAGraphNode.check_invariants(node, [torch.ones(2), a, 3])


# --- a new all-to-all library reuses the reference layout: one class, no registration ---------
class PointToPointBuffer(D.ReferenceElasticBuffer):
    """The reference layout over another transport: point-to-point sends instead of
    ``all_to_all_single`` (what a new all-to-all library overrides). ``EPOpsBuffer``
    wraps it with no registration: it is a ``ReferenceElasticBuffer``."""

    def all_to_all_async(self, send: torch.Tensor):
        import torch.distributed as dist
        from deepep_ops.reference import Transfer

        self.transfers = getattr(self, "transfers", 0) + 1
        recv = torch.empty_like(send)
        recv[self.rank_idx].copy_(send[self.rank_idx])
        ops = []
        for peer in range(self.num_ranks):
            if peer != self.rank_idx:
                ops.append(dist.P2POp(dist.isend, send[peer].contiguous(), peer, group=self.group))
                ops.append(dist.P2POp(dist.irecv, recv[peer], peer, group=self.group))
        # Started, not waited for: the buffer waits (at once, or at an async op's wait).
        return recv, Transfer(dist.batch_isend_irecv(ops) if ops else ())


def _third_backend(rank: int, world_size: int) -> int:
    """Decode and prefill prepare/finalize over the point-to-point transport, against a
    float64 dense MoE (elementwise experts), on every rank; forward and backward."""
    import torch.distributed as dist

    H, K, E = 256, 3, 4 * world_size
    inner = PointToPointBuffer(dist.group.WORLD, num_max_tokens_per_rank=16, hidden=H, num_topk=K)
    buf = D.EPOpsBuffer(inner)
    inp = ref.make_global_inputs(21, [5, 9][:world_size], H, K, E, neg_frac=0.25)[rank]
    experts = ref.Experts(3, E, H, "diag")
    scale = experts.s.to(torch.float32)
    for decode in (True, False):
        pf = D.DeepEPPrepareFinalize(buf, E, K, decode=decode)
        x = inp.x.clone().requires_grad_()
        p = pf.prepare(x, inp.topk_weights, inp.topk_idx, num_max_tokens_per_rank=16 if decode else None)
        y = p.expert_x.float().unsqueeze(1) * scale[p.topk_ids.clamp(min=0)]
        out = torch.empty_like(inp.x)
        pf.finalize(out, y.to(torch.bfloat16), p.topk_weights, p.topk_ids, p.handle)
        expected = ref.dense_moe(inp, experts)
        torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
        out.float().sum().backward()
        # d(sum out)/dx[t] = sum_k w[t,k] * s_{e(t,k)} (elementwise experts)
        w = torch.where(inp.topk_idx >= 0, inp.topk_weights, 0.0)
        grad = (w.unsqueeze(-1) * scale[inp.topk_idx.clamp(min=0)]).sum(1)
        torch.testing.assert_close(x.grad.float(), grad, rtol=2e-2, atol=2e-2)
    return inner.transfers


def test_a_new_transport_reuses_the_reference_layout():
    from _dist import run_distributed

    transfers = run_distributed(_third_backend, 2)
    # every byte went through the subclass's transport, per mode: dispatch (payload and
    # counts), combine, and in backward a combine with weights and a cached dispatch
    assert transfers == [10, 10], transfers


def test_import_stays_light():
    """``import deepep_ops`` imports neither Dynamo nor Inductor (seconds; every vLLM
    process imports us through the plugin): the compile hooks are installed when a
    graph holding our ops is first traced."""
    res = _run("import sys, deepep_ops; print('torch._dynamo' in sys.modules, 'torch._inductor' in sys.modules)")
    assert res.returncode == 0 and res.stdout.split() == ["False", "False"], (res.stdout, res.stderr[-2000:])


def test_rank_layout_is_a_trace_time_constant():
    """The wrappers size the handle with R and pick the hybrid outputs with S, both
    baked into the graph as the fakes bake them: ``buffer.rank_layout()`` under
    ``dynamic=True`` adds no graph input (the attribute ``buffer.num_ranks`` would
    be a symbolic input on torch 2.11-2.15, and torch 2.11 rejects
    ``assume_constant_result`` on an opaque argument)."""
    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=8, hidden=256, num_topk=2))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x, buffer):
        num_ranks, num_scaleout_ranks = buffer.rank_layout()
        return x.new_zeros((num_ranks * x.shape[0], 1)) if num_scaleout_ranks == 1 else x

    out = torch.compile(f, backend=backend, fullgraph=True, dynamic=True)(torch.randn(3, 4), buf)
    assert out.shape == (3, 1)  # R = 1: no process group
    (gm,) = graphs
    placeholders = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    assert not [p for p in placeholders if "buffer" in p], placeholders
