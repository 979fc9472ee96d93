"""``deepep_ops.vllm.splitting_ops`` + vLLM's ``split_graph`` on captured MoE graphs,
and the whole ``VllmBackend`` (split, piecewise Inductor, post-grad passes) on them.

Prefill (``deepep_ops::dispatch_exact``: CPU sync, data-dependent sizes) must be cut
out of CUDA-graph pieces; decode (``deepep_ops::dispatch``) must stay inside.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

E, K, H, I, CAP = 4, 2, 256, 16, 64
SWEEP = (6, 11, 3)  # no T = 1: its specialisation would recompile, and a VllmBackend compiles once


def _moe_step(decode: bool):
    """``(step, inputs)``: adapter.prepare → TorchGatedExperts.apply → adapter.finalize
    into the caller's ``out``, then a residual add (so combine's result has a later reader).

    The modular kernel's own body is bypassed: in prefill its ``if M_full == 0``
    branches on dispatch_exact's unbacked row count (tests/test_vllm_prefill_compile.py).
    """
    import deepep_ops
    from deepep_ops.vllm.testing import build_modular_kernel, gated_expert_weights
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG as QC

    buf = deepep_ops.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K)
    kernel, pf = build_modular_kernel(buf, E, K, H, I, decode=decode)
    experts = kernel.fused_experts
    w1, w2 = gated_expert_weights(E, H, I)

    def step(out, x, w, ids):
        a, s, meta, tid, tw = pf.prepare(x, w, ids, E, None, False, QC)
        y = torch.empty((a.shape[0], tid.shape[1], H), dtype=torch.bfloat16)
        experts.apply(y, a, w1, w2, tw, tid, MoEActivation.SILU, E, None, s, None, None, None, meta, False)
        pf.finalize(out, y, tw, tid, False, experts.finalize_weight_and_reduce_impl())
        return out + x

    def inputs(T):
        g = torch.Generator().manual_seed(T)
        x = torch.randn(T, H, generator=g).bfloat16()
        w = torch.rand(T, K, generator=g).softmax(-1)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        return torch.zeros(T, H, dtype=torch.bfloat16), x, w, ids

    return step, inputs


def _compile_and_compare(step, inputs, backend, **tol):
    """Compile ``step`` once with ``backend``; compiled == eager (``out`` and result) over SWEEP."""
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=backend)
    for T in SWEEP:
        got_out, *args = inputs(T)
        want_out, *_ = inputs(T)
        torch.testing.assert_close(compiled(got_out, *args), step(want_out, *args), msg=f"T={T}", **tol)
        torch.testing.assert_close(got_out, want_out, msg=f"T={T}: out", **tol)
    torch._dynamo.reset()


def _split_by_vllm(decode: bool):
    """Dynamo graph and vLLM ``split_graph`` pieces; the split module is what runs."""
    from deepep_ops.vllm import splitting_ops
    from vllm.compilation.backends import split_graph

    graphs, splits = [], []

    def backend(gm, example_inputs):
        split_gm, items = split_graph(gm, splitting_ops())
        graphs.append(gm)
        splits.append(items)
        return split_gm

    _compile_and_compare(*_moe_step(decode), backend, rtol=0, atol=0)
    assert len(graphs) == 1, f"{len(graphs)} graphs"
    return graphs[0], splits[0]


def _targets(gm):
    """call_function targets; ops as "ns.name" (Dynamo records OpOverloadPackets)."""
    return [str(n.target).removesuffix(".default") for n in gm.graph.nodes if n.op == "call_function"]


def test_splitting_ops_helper():
    from deepep_ops.vllm import splitting_ops
    from vllm.config import CompilationConfig

    ours = ["deepep_ops::dispatch_exact", "deepep_ops::dispatch_exact_start", "deepep_ops::dispatch_exact_wait"]
    assert splitting_ops() == ours
    cc = CompilationConfig(splitting_ops=["vllm::unified_attention_with_output"])
    assert splitting_ops(cc) == ["vllm::unified_attention_with_output", *ours]
    assert splitting_ops(cc) == cc.splitting_ops == ["vllm::unified_attention_with_output", *ours]
    default = CompilationConfig()  # splitting_ops None: vLLM's defaults are kept
    ops = splitting_ops(default)
    assert "vllm::unified_attention_with_output" in ops and ops[-3:] == ours
    assert "deepep_ops::dispatch" not in ops and "deepep_ops::dispatch_start" not in ops
    part = CompilationConfig(use_inductor_graph_partition=True, splitting_ops=[])
    assert splitting_ops(part) == ours


def _call_targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_prefill_fx_split_exactly_at_dispatch_exact():
    """vLLM's ``split_graph`` (the FX split of piecewise CUDA graphs) cuts the
    prefill graph exactly around ``deepep_ops::dispatch_exact``, and the split
    module computes what eager does, for several batch sizes.

    The op's piece holds the op and the getitems of its outputs, nothing else:
    its unbacked sizes N and X are outputs of the op (see ``schemas.py``), so
    the bound checks on them and everything that uses them land in the next
    piece.
    """
    gm, items = _split_by_vllm(decode=False)
    assert "deepep_ops.dispatch_exact" in _targets(gm)
    split = [it for it in items if it.is_splitting_graph]
    assert len(split) == 1, [(it.submod_name, it.is_splitting_graph) for it in items]
    op_piece = _call_targets(split[0].graph)
    assert op_piece[0] == "deepep_ops.dispatch_exact", op_piece
    assert set(op_piece[1:]) == {"<built-in function getitem>"}, op_piece
    # (u0, u1, recv_x, recv_topk_weights, counts, five handle tensors): what later pieces use
    assert len(op_piece) == 1 + 10, op_piece
    rest = [t for it in items if not it.is_splitting_graph for t in _call_targets(it.graph)]
    assert "deepep_ops.dispatch_exact" not in rest and "deepep_ops.combine" in rest
    assert "aten._assert_scalar.default" in rest  # the bound checks of N and X run after the op's piece
    assert split[0].graph_id == 1 and items[-1].graph_id == 2 and len(items) == 2, (
        "dispatch_exact is the first op of the graph: one piece for it, one for the rest"
    )


def test_inductor_graph_partition_gets_dispatch_exact():
    """``use_inductor_graph_partition=True``: the ops reach Inductor's partition rules, no FX split."""
    import torch._inductor.config as inductor_config
    from deepep_ops.vllm import splitting_ops
    from vllm.compilation.partition_rules import inductor_partition_rule_context
    from vllm.config import CompilationConfig

    cc = CompilationConfig(use_inductor_graph_partition=True, splitting_ops=[])
    with inductor_partition_rule_context(splitting_ops(cc)):
        assert "deepep_ops::dispatch_exact" in inductor_config.custom_should_partition_ops
        assert "deepep_ops::dispatch" not in inductor_config.custom_should_partition_ops
    # dispatch_exact is also tagged cudagraph_unsafe, which Inductor partitions on by itself
    assert torch.Tag.cudagraph_unsafe in torch.ops.deepep_ops.dispatch_exact.default.tags


def test_decode_graph_is_not_split():
    gm, items = _split_by_vllm(decode=True)
    targets = _targets(gm)
    assert "deepep_ops.dispatch" in targets and "deepep_ops.token_bucket" in targets
    assert len(items) == 1 and not items[0].is_splitting_graph


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_vllm_backend_end_to_end(decode, tmp_path, monkeypatch):
    """The whole ``VllmBackend`` (GPU platforms' ``VLLM_COMPILE`` backend) on CPU:
    ``split_graph`` at our ``splitting_ops``, each piece compiled by vLLM's
    piecewise backend with Inductor, ``PostGradPassManager`` running
    ``CombineIntoPass``; compiled once, equal to eager over several batch sizes.
    """
    from deepep_ops.vllm import splitting_ops
    from deepep_ops.vllm.passes import CombineIntoPass
    from vllm.compilation.backends import VllmBackend
    from vllm.config import CompilationConfig, CompilationMode, VllmConfig, set_current_vllm_config
    from vllm.forward_context import set_forward_context

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a cache hit would skip the pass
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm"))
    ours = CombineIntoPass()
    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, backend="inductor",
                           inductor_compile_config={"post_grad_custom_post_pass": ours})
    splitting_ops(cc)
    vllm_config = VllmConfig(compilation_config=cc)
    # vLLM's CPU platform downgrades VLLM_COMPILE to one plain Dynamo trace
    # (platforms/cpu.py, see test_vllm_compile_flow.py); undo that to run the
    # backend GPU platforms use.
    vllm_config.compilation_config.mode = CompilationMode.VLLM_COMPILE
    if vllm_config.compilation_config.compile_sizes is None:
        vllm_config.compilation_config.compile_sizes = []

    step, inputs = _moe_step(decode)
    with set_current_vllm_config(vllm_config), set_forward_context({}, vllm_config=vllm_config):
        backend = VllmBackend(vllm_config, prefix="")
        _compile_and_compare(step, inputs, backend, rtol=2e-2, atol=4e-2)

    pieces = [(item.graph_id, item.is_splitting_graph) for item in backend.piecewise_graphs]
    if decode:
        assert pieces == [(0, False)], pieces
    else:
        assert pieces == [(1, True), (2, False)], pieces
        op_piece = _call_targets(backend.piecewise_graphs[0].graph)
        assert op_piece[0] == "deepep_ops.dispatch_exact" and set(op_piece[1:]) == {"<built-in function getitem>"}
    assert ours.matched_count == 1, "PostGradPassManager did not rewrite the combine copy"
