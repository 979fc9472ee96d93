"""Prefill (``dispatch_exact``) through vLLM 0.32's ``FusedMoEKernel`` under ``torch.compile``.

vLLM's ``FusedMoEKernelModularImpl._fused_experts`` branches on the expert
input's row count (``if M_full == 0``, modular_kernel.py), which in prefill is
the unbacked X of ``dispatch_exact``. So ``fullgraph=True`` cannot hold there
(pinned below, so that a vLLM fix, e.g. ``guard_or_false``, shows up), and
without ``fullgraph`` Dynamo falls back around the branch and must still give
eager's result. vLLM itself only picks prefill mode with ``enforce_eager``
(torch.compile off); decode through the kernel compiles fullgraph
(test_vllm_multirank.py).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

E, K, H, I, CAP = 4, 2, 256, 16, 64


@pytest.fixture(scope="module")
def prefill_forward():
    import deepep_ops
    from deepep_ops.vllm.testing import build_modular_kernel, expert_map_for, gated_expert_weights
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    buf = deepep_ops.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K)
    kernel, _ = build_modular_kernel(buf, E, K, H, I, decode=False)
    w1, w2 = gated_expert_weights(E, H, I)
    emap = expert_map_for(E, 0, 1)

    def fwd(x, w, ids):
        return kernel.apply(x, w1, w2, w, ids, MoEActivation.SILU, E, emap, False)

    return fwd


def _inputs(T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).bfloat16()
    w = torch.rand(T, K, generator=g).softmax(-1)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.empty(0, K).long()
    return x, w, ids


def _forward_context(T: int):
    from vllm.forward_context import DPMetadata, ForwardContext, override_forward_context

    ctx = ForwardContext(no_compile_layers={}, attn_metadata={}, slot_mapping={},
                         dp_metadata=DPMetadata(torch.tensor([T], dtype=torch.int32)))
    return override_forward_context(ctx)


def test_fullgraph_stops_at_vllm_branch_on_unbacked_rows(prefill_forward):
    torch._dynamo.reset()
    x, w, ids = _inputs(6, 0)
    with _forward_context(6), pytest.raises(torch._dynamo.exc.UserError, match=r"Eq\(u\d+, 0\)") as err:
        torch.compile(prefill_forward, fullgraph=True, dynamic=True, backend="aot_eager")(x, w, ids)
    assert "if M_full == 0" in str(err.value)
    torch._dynamo.reset()


def test_without_fullgraph_equals_eager(prefill_forward):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(prefill_forward, dynamic=True, backend=counter)
    for i, T in enumerate((6, 13, 2)):
        x, w, ids = _inputs(T, i)
        with _forward_context(T):
            torch.testing.assert_close(compiled(x, w, ids), prefill_forward(x, w, ids), rtol=0, atol=0)
    assert counter.frame_count >= 2
    torch._dynamo.reset()
