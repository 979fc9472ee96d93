"""``deepep_ops.vllm.splitting_ops`` + vLLM's ``split_graph`` on captured MoE graphs.

Prefill (``deepep::dispatch_exact``: CPU sync, data-dependent sizes) must be cut
out of CUDA-graph pieces; decode (``deepep::dispatch``) must stay inside.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

E, K, H, I, CAP, T = 4, 2, 256, 16, 64, 6


def _capture(decode: bool) -> torch.fx.GraphModule:
    """Dynamo graph of adapter.prepare → TorchGatedExperts.apply → adapter.finalize."""
    import deepep_ops
    from deepep_ops.vllm.testing import build_modular_kernel
    from torch._dynamo.testing import EagerAndRecordGraphs
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG as QC

    buf = deepep_ops.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K)
    kernel, pf = build_modular_kernel(buf, E, K, H, I, decode=decode)
    experts = kernel.fused_experts
    g = torch.Generator().manual_seed(0)
    w1 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).bfloat16()

    # The modular kernel's own body is bypassed here: in prefill its
    # `if M_full == 0` branches on dispatch_exact's unbacked row count.
    def step(x, w, ids):
        a, s, meta, tid, tw = pf.prepare(x, w, ids, E, None, False, QC)
        y = torch.empty((a.shape[0], tid.shape[1], H), dtype=torch.bfloat16)
        experts.apply(y, a, w1, w2, tw, tid, MoEActivation.SILU, E, None, s, None, None, None, meta, False)
        out = torch.empty_like(x)
        pf.finalize(out, y, tw, tid, False, experts.finalize_weight_and_reduce_impl())
        return out

    backend = EagerAndRecordGraphs()
    x = torch.randn(T, H, generator=g).bfloat16()
    w = torch.rand(T, K, generator=g).softmax(-1)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    torch._dynamo.reset()
    torch.compile(step, fullgraph=True, dynamic=True, backend=backend)(x, w, ids)
    assert len(backend.graphs) == 1
    return backend.graphs[0]


def _targets(gm):
    """call_function targets; ops as "ns.name" (Dynamo records OpOverloadPackets)."""
    return [str(n.target).removesuffix(".default") for n in gm.graph.nodes if n.op == "call_function"]


def test_splitting_ops_helper():
    from deepep_ops.vllm import splitting_ops
    from vllm.config import CompilationConfig

    assert splitting_ops() == ["deepep::dispatch_exact"]
    cc = CompilationConfig(splitting_ops=["vllm::unified_attention_with_output"])
    assert splitting_ops(cc) == ["vllm::unified_attention_with_output", "deepep::dispatch_exact"]
    assert splitting_ops(cc) == cc.splitting_ops == ["vllm::unified_attention_with_output", "deepep::dispatch_exact"]
    default = CompilationConfig()  # splitting_ops None: vLLM's defaults are kept
    ops = splitting_ops(default)
    assert "vllm::unified_attention_with_output" in ops and ops[-1] == "deepep::dispatch_exact"
    assert "deepep::dispatch" not in ops
    part = CompilationConfig(use_inductor_graph_partition=True, splitting_ops=[])
    assert splitting_ops(part) == ["deepep::dispatch_exact"]


def test_prefill_fx_split_at_dispatch_exact_hits_split_module_cycle():
    """Known limitation (vLLM 0.32 + torch 2.13), pinned so that a fix shows up here.

    ``split_graph`` puts ``dispatch_exact`` (and its getitems) in their own piece,
    but Dynamo binds the op's unbacked sizes (u0, u1) with ``aten.sym_size.int``
    nodes right after it, which ``split_graph`` assigns to the *next* piece.
    ``torch.fx.passes.split_module.record_cross_partition_use`` then makes that
    piece depend on itself through the symbol's binding node, and
    ``split_module`` raises "cycle exists between partitions!". With
    ``use_inductor_graph_partition=True`` vLLM skips the FX split and gives
    ``splitting_ops`` to Inductor instead (see the test below).
    """
    from deepep_ops.vllm import splitting_ops
    from vllm.compilation.backends import split_graph

    gm = _capture(decode=False)
    targets = _targets(gm)
    assert "deepep.dispatch_exact" in targets and "deepep.combine" in targets
    # the offending nodes: size reads of dispatch_exact's outputs right after it
    i = targets.index("deepep.dispatch_exact")
    assert "aten.sym_size.int" in targets[i + 1:i + 5]
    with pytest.raises(RuntimeError, match="cycle exists between partitions"):
        split_graph(gm, splitting_ops())


def test_inductor_graph_partition_gets_dispatch_exact():
    """``use_inductor_graph_partition=True``: the ops reach Inductor's partition rules, no FX split."""
    import torch._inductor.config as inductor_config
    from deepep_ops.vllm import splitting_ops
    from vllm.compilation.partition_rules import inductor_partition_rule_context
    from vllm.config import CompilationConfig

    cc = CompilationConfig(use_inductor_graph_partition=True, splitting_ops=[])
    with inductor_partition_rule_context(splitting_ops(cc)):
        assert "deepep::dispatch_exact" in inductor_config.custom_should_partition_ops
        assert "deepep::dispatch" not in inductor_config.custom_should_partition_ops
    # dispatch_exact is also tagged cudagraph_unsafe, which Inductor partitions on by itself
    assert torch.Tag.cudagraph_unsafe in torch.ops.deepep.dispatch_exact.default.tags


def test_decode_graph_is_not_split():
    from deepep_ops.vllm import splitting_ops
    from vllm.compilation.backends import split_graph

    gm = _capture(decode=True)
    targets = _targets(gm)
    assert "deepep.dispatch" in targets and "deepep.token_bucket" in targets
    _, items = split_graph(gm, splitting_ops())
    assert len(items) == 1 and not items[0].is_splitting_graph
