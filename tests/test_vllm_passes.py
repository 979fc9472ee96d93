"""The combine-into post-grad pass (deepep_ops.vllm.passes) on real Inductor post-grad graphs.

A small MoE step through vLLM's ``FusedMoEKernel`` + the adapter (decode mode,
synchronous combine, reference buffer at world size 1) writes into a caller-owned output buffer
(``out.copy_(kernel.apply(...))``, a graph input), so the post-grad graph holds
``aten.copy_(out, deepep_ops.combine(...))``. Checks: graph snapshots before/after
the pass (``graphs/vllm_pass_combine_into.{before,after}.txt``), the same numbers
with and without the pass, and the pass run by vLLM's ``PostGradPassManager``
configured from a ``CompilationConfig``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402
from torch._inductor.custom_graph_pass import CustomGraphPass  # noqa: E402

from graph_snapshot import assert_graph_snapshot, graph_text  # noqa: E402

E, K, H, I, CAP, T = 2, 2, 256, 16, 64, 5


@pytest.fixture(scope="module")
def setup():
    import deepep_ops
    from deepep_ops.vllm.testing import build_modular_kernel, gated_expert_weights
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    buf = deepep_ops.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K)
    # Synchronous combine (the pass's case); the async one is test_async_finalize_is_left_alone.
    kernel, _ = build_modular_kernel(buf, E, K, H, I, decode=True, asynchronous=False)
    w1, w2 = gated_expert_weights(E, H, I)
    g = torch.Generator().manual_seed(0)

    def moe(x, topk_weights, topk_ids):
        return kernel.apply(x, w1, w2, topk_weights, topk_ids, MoEActivation.SILU, E, None, False)

    def step(out, x, topk_weights, topk_ids):  # the snapshots' graph: keep as is (symbol names follow sources)
        out.copy_(kernel.apply(x, w1, w2, topk_weights, topk_ids, MoEActivation.SILU, E, None, False))

    x = torch.randn(T, H, generator=g).bfloat16()
    w = torch.rand(T, K, generator=g).softmax(-1)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return step, (x, w, ids), moe


class _Recorder(CustomGraphPass):
    """Post-grad hook: snapshot the graph, run ``inner``, snapshot again."""

    def __init__(self, inner):
        self.inner, self.before, self.after = inner, None, None

    def __call__(self, graph):
        self.before = graph_text(graph.owning_module)
        self.inner(graph)
        self.after = graph_text(graph.owning_module)

    def uuid(self):
        return None


def _run(step, inputs, post_pass):
    torch._dynamo.reset()
    out = torch.zeros(T, H, dtype=torch.bfloat16)
    with inductor_config.patch(post_grad_custom_post_pass=post_pass, fx_graph_cache=False):
        torch.compile(step, fullgraph=True, dynamic=True, backend="inductor")(out, *inputs)
    return out


def test_pass_snapshot_and_numerics(setup):
    from deepep_ops.vllm.passes import CombineIntoPass

    step, inputs, _ = setup
    eager = torch.zeros(T, H, dtype=torch.bfloat16)
    step(eager, *inputs)
    plain = _run(step, inputs, None)
    pass_ = CombineIntoPass()
    rec = _Recorder(pass_)
    rewritten = _run(step, inputs, rec)

    assert pass_.matched_count == 1
    assert "torch.ops.aten.copy_.default" in rec.before and "torch.ops.deepep_ops.combine.default" in rec.before
    assert "torch.ops.deepep_ops.combine_into.default" in rec.after
    assert "torch.ops.deepep_ops.combine.default" not in rec.after
    assert "copy_" not in rec.after
    torch.testing.assert_close(rewritten, plain, rtol=0, atol=0)
    torch.testing.assert_close(rewritten, eager, rtol=2e-2, atol=2e-2)  # Inductor vs eager: bf16 rounding
    assert eager.abs().sum() > 0
    # Last: under another torch than the snapshots' these skip (symbol names differ).
    assert_graph_snapshot("vllm_pass_combine_into.before", rec.before)
    assert_graph_snapshot("vllm_pass_combine_into.after", rec.after)


@pytest.mark.parametrize("reads", ["result_after_copy", "out_before_copy"])
def test_pass_when_combine_result_has_other_readers(setup, reads):
    """``out.copy_(moe); return out + x`` reaches post-grad as ``add(combine, x)`` beside
    ``copy_(out, combine)``: rewritten, with combine_into at combine's place and the add
    reading ``out``. If ``out`` is also read before the copy, moving the write earlier
    would change that read: left alone."""
    from deepep_ops.vllm.passes import CombineIntoPass

    _, inputs, moe = setup

    def step(out, x, topk_weights, topk_ids):
        before = out * 2 if reads == "out_before_copy" else 0
        out.copy_(moe(x, topk_weights, topk_ids))
        return out + x + before

    def run(post_pass):
        torch._dynamo.reset()
        out = torch.full((T, H), 0.5, dtype=torch.bfloat16)
        with inductor_config.patch(post_grad_custom_post_pass=post_pass, fx_graph_cache=False):
            ret = torch.compile(step, fullgraph=True, dynamic=True, backend="inductor")(out, *inputs)
        return out, ret

    pass_ = CombineIntoPass()
    rec = _Recorder(pass_)
    got, plain = run(rec), run(None)
    if reads == "result_after_copy":
        assert pass_.matched_count == 1 and "copy_" not in rec.after
        assert rec.after.index("combine_into") < rec.after.rindex("aten.add"), rec.after  # `out + x` reads out after it
    else:
        assert pass_.matched_count == 0 and rec.after == rec.before
    for g, p in zip(got, plain):
        torch.testing.assert_close(g, p, rtol=0, atol=0)
    eager_out = torch.full((T, H), 0.5, dtype=torch.bfloat16)
    torch.testing.assert_close(got[1], step(eager_out, *inputs), rtol=2e-2, atol=2e-2)


def test_pass_through_vllm_post_grad_pass_manager(setup):
    """``CompilationConfig`` → ``PostGradPassManager`` (as VllmBackend.configure_post_pass does) → Inductor."""
    from deepep_ops.vllm.passes import CombineIntoPass
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.compilation.passes.pass_manager import PostGradPassManager
    from vllm.config import CompilationConfig, VllmConfig
    from vllm.config.utils import Range

    step, inputs, _ = setup
    ours = CombineIntoPass()
    vllm_config = VllmConfig(compilation_config=CompilationConfig(
        inductor_compile_config={"post_grad_custom_post_pass": ours}))
    manager = PostGradPassManager()
    manager.configure(vllm_config)
    manager.add(vllm_config.compilation_config.inductor_compile_config["post_grad_custom_post_pass"])
    rec = _Recorder(manager)
    with pass_context(Range(start=1, end=CAP)):
        got = _run(step, inputs, rec)
    assert ours.matched_count == 1
    assert "torch.ops.deepep_ops.combine_into.default" in rec.after and "copy_" not in rec.after
    eager = torch.zeros(T, H, dtype=torch.bfloat16)
    step(eager, *inputs)
    torch.testing.assert_close(got, eager, rtol=2e-2, atol=2e-2)


def test_pass_by_name_after_plugin():
    """The name a JSON compilation config uses resolves once the plugin ran."""
    from deepep_ops.vllm.plugin import register
    from vllm.compilation.passes.inductor_pass import CallableInductorPass
    from vllm.config import CompilationConfig

    register()
    cc = CompilationConfig(inductor_passes={"post_grad_custom_post_pass": "deepep_ops.vllm_combine_into_pass"})
    p = cc.inductor_compile_config["post_grad_custom_post_pass"]
    assert isinstance(p, CallableInductorPass)
    from deepep_ops.vllm.passes import combine_into_pass

    assert p.callable is combine_into_pass


def test_async_finalize_is_left_alone():
    """The default adapter combines asynchronously (``combine_start`` / ``combine_wait``,
    so vLLM's shared experts overlap it): the pass matches nothing there (the wait's
    copy into ``out`` stays; real DeepEP's combine_into copies too), and the numbers
    are those of eager."""
    import deepep_ops
    from deepep_ops.vllm.passes import CombineIntoPass
    from deepep_ops.vllm.testing import build_modular_kernel, gated_expert_weights
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    buf = deepep_ops.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K)
    kernel, _ = build_modular_kernel(buf, E, K, H, I, decode=True)
    w1, w2 = gated_expert_weights(E, H, I)

    def step(out, x, topk_weights, topk_ids):
        out.copy_(kernel.apply(x, w1, w2, topk_weights, topk_ids, MoEActivation.SILU, E, None, False))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).bfloat16()
    w = torch.rand(T, K, generator=g).softmax(-1)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    eager = torch.zeros(T, H, dtype=torch.bfloat16)
    step(eager, x, w, ids)
    pass_ = CombineIntoPass()
    rec = _Recorder(pass_)
    got = _run(step, (x, w, ids), rec)
    assert pass_.matched_count == 0 and rec.after == rec.before
    assert "deepep_ops.combine_start.default" in rec.before and "deepep_ops.combine_wait.default" in rec.before
    torch.testing.assert_close(got, eager, rtol=2e-2, atol=2e-2)
    assert eager.abs().sum() > 0
