"""Single-process checks of deepep_ops.vllm.DeepEPV2PrepareAndFinalize (world size 1, reference buffer)."""

from __future__ import annotations

import subprocess
import sys
import types
from typing import Optional

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

E, K, H, I, CAP = 4, 2, 256, 16, 32


def _buffer():
    import deepep_ops

    return deepep_ops.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K)


def _inputs(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).bfloat16()
    w = torch.rand(T, K, generator=g).softmax(-1)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return x, w, ids


def _weights():
    g = torch.Generator().manual_seed(1)
    return ((torch.randn(E, 2 * I, H, generator=g) / H**0.5).bfloat16(),
            (torch.randn(E, H, I, generator=g) / I**0.5).bfloat16())


def _dense(x, w, ids, w1, w2, scales=None):
    xf = x.float()
    out = torch.zeros_like(xf)
    for e in range(E):
        y = (torch.nn.functional.silu(xf @ w1[e, :I].float().t()) * (xf @ w1[e, I:].float().t())) @ w2[e].float().t()
        out += (w * (ids == e)).sum(-1, keepdim=True) * y
    return out.bfloat16()


def _apply(kernel, x, w, ids):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    w1, w2 = _weights()
    return kernel.apply(x, w1, w2, w, ids, MoEActivation.SILU, E, None, False)


def test_import_deepep_ops_does_not_import_vllm():
    code = "import sys, deepep_ops; assert 'vllm' not in sys.modules and 'deepep_ops.vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_interface():
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from deepep_ops.vllm import DeepEPV2PrepareAndFinalize

    pf = DeepEPV2PrepareAndFinalize(_buffer(), 1, 1, 0, E, K, use_cudagraph=True)
    assert isinstance(pf, mk.FusedMoEPrepareAndFinalizeModular)
    assert pf.activation_format == mk.FusedMoEActivationFormat.Standard
    assert pf.topk_indices_dtype() == torch.int64
    assert pf.max_num_tokens_per_rank() is None
    assert pf.num_dispatchers() == 1 and pf.output_is_reduced() and pf.supports_async()
    assert DeepEPV2PrepareAndFinalize.maybe_roundup_layer_hidden_size(2048, torch.bfloat16) == 2048
    assert DeepEPV2PrepareAndFinalize.maybe_roundup_layer_hidden_size(2880, torch.bfloat16) == 3072
    assert DeepEPV2PrepareAndFinalize.maybe_roundup_layer_hidden_size(100, torch.float8_e4m3fn) == 512
    with pytest.raises(ValueError, match="rank_expert_offset"):
        DeepEPV2PrepareAndFinalize(_buffer(), 1, 1, 2, E, K)


def test_dp_bucket_from_stub_forward_context(monkeypatch):
    import deepep_ops.vllm._compat as compat
    import deepep_ops.vllm.prepare_finalize as vpf
    import deepep_ops
    from deepep_ops import token_bucket

    monkeypatch.setattr(compat, "is_forward_context_available", lambda: True)
    ctx = types.SimpleNamespace(dp_metadata=types.SimpleNamespace(num_tokens_across_dp_cpu=torch.tensor([3, 17, 9])))
    monkeypatch.setattr(compat, "get_forward_context", lambda: ctx)
    assert vpf.dp_num_tokens(3) == 17
    assert vpf.dp_num_tokens(3, sp_size=4) == 5  # cdiv(17, 4)
    assert vpf.dp_bucket(3, CAP) == 32
    assert vpf.dp_bucket(3, CAP, sp_size=4) == 8
    with pytest.raises(ValueError, match="exceed the buffer capacity"):
        vpf.dp_bucket(3, 16)
    # the in-graph op and the eager bucket, through the token source the adapter gives its buffer
    buf = deepep_ops.EPOpsBuffer(_buffer())
    pf = vpf.DeepEPV2PrepareAndFinalize(buf, 1, 1, 0, E, K, use_cudagraph=True, sp_size=2)
    assert token_bucket(torch.empty(3, 1), buf) == 16 == pf._bucket(torch.empty(3, 1))  # pow2(cdiv(17, 2) = 9)
    # another buffer: its own (local) count
    assert token_bucket(torch.empty(3, 1), deepep_ops.EPOpsBuffer(_buffer())) == 4
    ctx.dp_metadata = None
    assert token_bucket(torch.empty(3, 1), buf) == 4  # no DP: local T
    ctx.dp_metadata = types.SimpleNamespace(num_tokens_across_dp_cpu=torch.tensor([3, 70]))
    with pytest.raises(ValueError, match="capacity"):
        token_bucket(torch.empty(3, 1), buf)
    with pytest.raises(ValueError, match="sp_size"):
        vpf.DeepEPV2PrepareAndFinalize(buf, 1, 1, 0, E, K, use_cudagraph=True, sp_size=4)


@pytest.mark.parametrize("decode", [True, False])
def test_expert_tokens_metadata(decode):
    from deepep_ops.vllm import DeepEPV2PrepareAndFinalize
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG

    pf = DeepEPV2PrepareAndFinalize(_buffer(), 1, 1, 0, E, K, use_cudagraph=decode)
    x, w, ids = _inputs(5)
    a, s, meta, tid, tw = pf.prepare(x, w, ids, E, None, False, FUSED_MOE_UNQUANTIZED_CONFIG)
    assert s is None
    if decode:
        assert meta.expert_num_tokens is None and meta.expert_num_tokens_cpu is None
        assert meta.psum_recv_per_rank.tolist() == [5]
        assert a.shape == (8, H) and tid.shape == (8, K)  # M = pow2_bucket(5)
        assert (tid[5:] == -1).all()
    else:
        want = torch.bincount(ids.flatten(), minlength=E).int()
        assert torch.equal(meta.expert_num_tokens, want) and torch.equal(meta.expert_num_tokens_cpu, want)
        assert meta.psum_recv_per_rank is None
        assert a.shape == (2 * 5, H) and tid.shape == (10, 1)


def test_block_fp8_and_noop_reduce_and_unsupported_quant():
    from deepep_ops.vllm import DeepEPV2PrepareAndFinalize
    from deepep_ops.vllm.testing import block_fp8_quant_config, build_modular_kernel
    from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig

    x, w, ids = _inputs(6, seed=3)
    ref = _dense(x, w, ids, *_weights())
    # block fp8: quantized before dispatch, experts dequantize
    kernel, pf = build_modular_kernel(_buffer(), E, K, H, I, decode=True, quant_config=block_fp8_quant_config())
    out = _apply(kernel, x, w, ids)
    from dense_reference import dequant, quant_fp8  # independent 1x128 e4m3 quantization

    ref_fp8 = _dense(dequant(*quant_fp8(x.float())), w, ids, *_weights())
    torch.testing.assert_close(out.float(), ref_fp8.float(), rtol=2e-2, atol=2e-2)
    # experts that weight and reduce themselves (TopKWeightAndReduceNoOP)
    kernel, _ = build_modular_kernel(_buffer(), E, K, H, I, decode=False, reduce=True)
    torch.testing.assert_close(_apply(kernel, x, w, ids).float(), ref.float(), rtol=2e-2, atol=2e-2)
    # per-tensor fp8 would be quantized after dispatch by CUDA kernels
    pf = DeepEPV2PrepareAndFinalize(_buffer(), 1, 1, 0, E, K, use_cudagraph=True)
    with pytest.raises(NotImplementedError, match="post-dispatch quantization"):
        pf.prepare(x, w, ids, E, None, False, FusedMoEQuantConfig.make(torch.float8_e4m3fn))


def test_dbo_handle_slots(monkeypatch):
    import deepep_ops.vllm._compat as compat
    import deepep_ops.vllm.prepare_finalize as vpf
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG as QC

    pf = vpf.DeepEPV2PrepareAndFinalize(_buffer(), 1, 1, 0, E, K, use_cudagraph=True)
    assert pf.supports_dbo()
    monkeypatch.setattr(compat, "dbo_enabled", lambda: True)
    for ubatch, T in ((0, 3), (1, 5)):
        monkeypatch.setattr(compat, "dbo_current_ubatch_id", lambda u=ubatch: u)
        pf.prepare(*_inputs(T, seed=T), E, None, False, QC)
    assert [h.topk_idx.shape[0] for h in pf.handles] == [3, 5]


def test_defer_globalize(monkeypatch):
    """vLLM 0.33's deferred globalize: local ids + ``rank_expert_offset`` in the metadata,
    the same routing as the globalized ids once the offset is added (checked with a
    0.33-shaped ``ExpertTokensMetadata`` on 0.32, and on the real class where it exists)."""
    import dataclasses

    import deepep_ops.vllm._compat as compat
    from deepep_ops.vllm import DeepEPV2PrepareAndFinalize
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG as QC

    if not compat.HAS_RANK_EXPERT_OFFSET:
        pf = DeepEPV2PrepareAndFinalize(_buffer(), 1, 1, 0, E, K, use_cudagraph=True)
        pf.defer_globalize = True
        with pytest.raises(RuntimeError, match="0.33"):
            pf.prepare(*_inputs(3, seed=3), E, None, False, QC)

        @dataclasses.dataclass
        class ExpertTokensMetadata033:  # the fields of vLLM 0.33's class
            expert_num_tokens: Optional[torch.Tensor]
            expert_num_tokens_cpu: Optional[torch.Tensor]
            psum_recv_per_rank: Optional[torch.Tensor] = None
            rank_expert_offset: Optional[int] = None

        monkeypatch.setattr(compat, "HAS_RANK_EXPERT_OFFSET", True)
        monkeypatch.setattr(compat, "mk", types.SimpleNamespace(ExpertTokensMetadata=ExpertTokensMetadata033))
    x, w, ids = _inputs(5, seed=5)
    plain = DeepEPV2PrepareAndFinalize(_buffer(), 1, 1, 0, E, K, use_cudagraph=True)
    deferred = DeepEPV2PrepareAndFinalize(_buffer(), 1, 1, 0, E, K, use_cudagraph=True)
    deferred.defer_globalize = True
    _x0, _s0, meta0, ids0, w0 = plain.prepare(x, w, ids, E, None, False, QC)
    _x1, _s1, meta1, ids1, w1 = deferred.prepare(x, w, ids, E, None, False, QC)
    assert getattr(meta0, "rank_expert_offset", None) is None and meta1.rank_expert_offset == 0
    real = torch.arange(ids1.shape[0]).unsqueeze(1) < meta1.psum_recv_per_rank[-1]
    globalized = torch.where((ids1 >= 0) & real, ids1 + meta1.rank_expert_offset, -1)
    assert torch.equal(globalized, ids0) and torch.equal(w1[real.squeeze(1)], w0[real.squeeze(1)])
