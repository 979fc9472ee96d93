"""An MoE block compiled the way vLLM compiles models: ``@support_torch_compile``.

A small ``nn.Module`` (router → vLLM's ``FusedMoEKernel`` over this adapter
in decode mode → ``out.copy_(moe); return out + x``) decorated with vLLM's
``support_torch_compile`` and built under a ``VllmConfig`` whose
``CompilationConfig`` asks for ``VLLM_COMPILE``, our ``splitting_ops`` and our
``CombineIntoPass`` as ``post_grad_custom_post_pass``. On the CPU platform vLLM
turns ``VLLM_COMPILE`` into ``DYNAMO_TRACE_ONCE`` with Inductor
(``platforms/cpu.py``): one trace, all guards dropped, the config's
``inductor_compile_config`` as Inductor options. Trace-once without guards is
exactly where a bucket baked in as a constant would go silently wrong; the
in-graph ``deepep_ops::token_bucket`` keeps every batch size right.

Checks, for T = 5, 9, 3, 17, 1, 33 after one compile: one graph, no graph
breaks, the pass rewrote the combine copy (synchronous combine), the result
equals the same compile without the pass bitwise and eager within bf16
rounding; with the adapter's default async prepare/finalize, one graph holding
the start/wait pairs, no break, eager's values.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from torch import nn  # noqa: E402

E, K, H, I, CAP = 4, 2, 256, 16, 64
SWEEP = (5, 9, 3, 17, 1, 33)


def _block_class(asynchronous: bool = True):
    import deepep_ops
    from deepep_ops.vllm.testing import build_modular_kernel, gated_expert_weights
    from vllm.compilation.decorators import support_torch_compile
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    @support_torch_compile(dynamic_arg_dims={"x": 0, "out": 0})
    class MoEBlock(nn.Module):
        def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
            super().__init__()
            buf = deepep_ops.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K)
            self.kernel, _ = build_modular_kernel(buf, E, K, H, I, decode=True, asynchronous=asynchronous)
            w1, w2 = gated_expert_weights(E, H, I)
            gate = torch.randn(H, E, generator=torch.Generator().manual_seed(1)).bfloat16()
            self.gate = nn.Parameter(gate, requires_grad=False)
            self.w1 = nn.Parameter(w1, requires_grad=False)
            self.w2 = nn.Parameter(w2, requires_grad=False)

        def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            w, ids = torch.topk(torch.softmax((x @ self.gate).float(), -1), K, dim=-1)
            out.copy_(self.kernel.apply(x, self.w1, self.w2, w, ids, MoEActivation.SILU, E, None, False))
            return out + x

    return MoEBlock


def _run(block_cls, post_pass):
    from torch._dynamo.utils import counters
    from vllm.config import CompilationConfig, CompilationMode, VllmConfig, set_current_vllm_config
    from vllm.forward_context import set_forward_context

    from deepep_ops.vllm import splitting_ops

    extra = {} if post_pass is None else {"post_grad_custom_post_pass": post_pass}
    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, backend="inductor", inductor_compile_config=extra)
    splitting_ops(cc)
    vllm_config = VllmConfig(compilation_config=cc)
    with set_current_vllm_config(vllm_config):
        block = block_cls(vllm_config=vllm_config, prefix="")
    torch._dynamo.reset()
    counters.clear()
    results = {}
    for T in SWEEP:
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).bfloat16()
        with set_forward_context({}, vllm_config=vllm_config):
            out = torch.zeros(T, H, dtype=torch.bfloat16)
            ret = block(x, out)
            eager_out = torch.zeros(T, H, dtype=torch.bfloat16)
            eager_ret = block.forward(x, eager_out)  # the undecorated forward: eager
        results[T] = (out, ret, eager_out, eager_ret)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    return vllm_config, results, graphs, breaks


def test_support_torch_compile_block_with_pass(tmp_path, monkeypatch):
    from deepep_ops.vllm.passes import CombineIntoPass
    from vllm.config import CompilationMode

    # fresh caches: a cache hit would skip Inductor, and with it the pass
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm"))
    block_cls = _block_class(asynchronous=False)  # the pass rewrites the synchronous combine's copy
    ours = CombineIntoPass()
    vllm_config, with_pass, graphs, breaks = _run(block_cls, ours)
    assert vllm_config.compilation_config.mode == CompilationMode.DYNAMO_TRACE_ONCE  # the CPU platform's choice
    assert "deepep_ops::dispatch_exact" in vllm_config.compilation_config.splitting_ops
    assert (graphs, breaks) == (1, 0), f"{graphs} graphs, {breaks} graph breaks over T={SWEEP}"
    assert ours.matched_count == 1, "the combine copy was not rewritten"

    _, without_pass, _, _ = _run(block_cls, None)
    for T in SWEEP:
        out, ret, eager_out, eager_ret = with_pass[T]
        ref_out, ref_ret, _, _ = without_pass[T]
        assert torch.equal(out, ref_out) and torch.equal(ret, ref_ret), f"T={T}: pass changed the result"
        torch.testing.assert_close(out, eager_out, atol=4e-2, rtol=2e-2, msg=f"T={T}: out vs eager")
        torch.testing.assert_close(ret, eager_ret, atol=4e-2, rtol=2e-2, msg=f"T={T}: return vs eager")


def test_support_torch_compile_block_async(tmp_path, monkeypatch):
    """The adapter's default: prepare_async / finalize_async start and wait (vLLM's
    modular kernel calls them), traced once by vLLM, every T right."""
    from deepep_ops.vllm.passes import CombineIntoPass

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm"))
    seen = []

    class Spy(CombineIntoPass):
        def __call__(self, graph):
            # our async ops sit inside with_effects (their ordered effect): the op is its second argument
            seen.append({str(n.args[1]) if "with_effects" in str(n.target) else str(n.target)
                         for n in graph.nodes if n.op == "call_function"})
            super().__call__(graph)

    spy = Spy()
    _, results, graphs, breaks = _run(_block_class(), spy)
    assert (graphs, breaks) == (1, 0), f"{graphs} graphs, {breaks} graph breaks over T={SWEEP}"
    ops = set().union(*seen)
    for op in ("dispatch_start", "dispatch_wait", "combine_start", "combine_wait"):
        assert any(f"deepep_ops.{op}" in t for t in ops), (op, sorted(t for t in ops if "deepep" in t))
    assert spy.matched_count == 0
    for T in SWEEP:
        out, ret, eager_out, eager_ret = results[T]
        torch.testing.assert_close(out, eager_out, atol=4e-2, rtol=2e-2, msg=f"T={T}: out vs eager")
        torch.testing.assert_close(ret, eager_ret, atol=4e-2, rtol=2e-2, msg=f"T={T}: return vs eager")
