"""vLLM 0.34's prepare/finalize behaviour, run by our adapter on the installed vLLM (0.32).

Each behaviour 0.34 changed is checked against an independent reference, with
0.34's own pieces injected through ``deepep_ops.vllm._compat``'s feature
detection where 0.32 lacks them (tests/vllm034_standins.py):

- ``activation_format``: ``PaddedStandard`` where vLLM has it, and experts
  accepted by ``is_superset``;
- post-dispatch quantization: ``per_act_token_quant`` passed through; in decode
  a run-time per-tensor scale over the received rows only
  (``masked_amax_scale(..., num_valid=psum[-1:])``), vLLM's function where it
  exists, a plain-torch one (same value) where not;
- ``finalize_async``: a bare receiver, run after the shared experts, as 0.34's
  modular kernel does.
"""

from __future__ import annotations

import types

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from vllm034_standins import activation_format_enum  # noqa: E402

E, K, H, I, CAP = 4, 2, 256, 16, 32
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max, written out


def _buffer():
    import deepep_ops

    return deepep_ops.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K)


def _inputs(T, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(T, H, generator=g)).bfloat16()
    w = torch.rand(T, K, generator=g).softmax(-1)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return x, w, ids


def _dense(x, w, ids, w1, w2):
    xf = x.float()
    out = torch.zeros_like(xf)
    for e in range(E):
        y = (torch.nn.functional.silu(xf @ w1[e, :I].float().t()) * (xf @ w1[e, I:].float().t())) @ w2[e].float().t()
        out += (w * (ids == e)).sum(-1, keepdim=True) * y
    return out


@pytest.fixture
def padded_standard(monkeypatch):
    """vLLM 0.34's ``FusedMoEActivationFormat`` (with ``PaddedStandard`` and ``is_superset``) in ``_compat``."""
    import deepep_ops.vllm._compat as compat

    fmt = activation_format_enum()
    monkeypatch.setattr(compat, "ActivationFormat", fmt)
    return fmt


# ---------------------------------------------------------- activation format


def test_activation_format_on_the_installed_vllm():
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from deepep_ops.vllm import DeepEPV2PrepareAndFinalize, _compat
    from deepep_ops.vllm.testing import TorchGatedExperts

    want = getattr(mk.FusedMoEActivationFormat, "PaddedStandard", mk.FusedMoEActivationFormat.Standard)
    for decode in (True, False):
        assert DeepEPV2PrepareAndFinalize(_buffer(), 1, 1, 0, E, K, use_cudagraph=decode).activation_format is want
    assert TorchGatedExperts.activation_format() is want
    assert _compat.accepts_activation_format(want, want)
    if not hasattr(mk.FusedMoEActivationFormat, "is_superset"):  # 0.32/0.33: equality
        assert not _compat.accepts_activation_format(mk.FusedMoEActivationFormat.BatchedExperts, want)


def test_padded_standard_and_superset_selection(padded_standard):
    from deepep_ops.vllm import DeepEPV2PrepareAndFinalize, _compat
    from deepep_ops.vllm.testing import TorchGatedExperts

    fmt = padded_standard
    for decode in (True, False):
        assert DeepEPV2PrepareAndFinalize(_buffer(), 1, 1, 0, E, K, use_cudagraph=decode).activation_format \
            is fmt.PaddedStandard
    # PaddedStandard experts take both; Standard experts (e.g. vLLM's CPU experts) not padded rows.
    accepts = _compat.accepts_activation_format
    assert accepts(fmt.PaddedStandard, fmt.PaddedStandard) and accepts(fmt.PaddedStandard, fmt.Standard)
    assert not accepts(fmt.Standard, fmt.PaddedStandard) and not accepts(fmt.BatchedExperts, fmt.PaddedStandard)
    assert accepts(TorchGatedExperts.activation_format(), fmt.PaddedStandard)


@pytest.mark.parametrize("decode", [True, False])
def test_padded_rows_and_results_under_padded_standard(padded_standard, decode):
    """The PaddedStandard contract (padding rows: every topk lane -1) and the
    modular kernel's result against a dense MoE."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG as QC

    from deepep_ops.vllm.testing import build_modular_kernel, gated_expert_weights

    x, w, ids = _inputs(5, seed=2)
    kernel, pf = build_modular_kernel(_buffer(), E, K, H, I, decode=decode)
    _, _, meta, tid, _ = pf.prepare(x, w, ids, E, None, False, QC)
    if decode:
        n = int(meta.psum_recv_per_rank[-1])
        assert n == 5 and tid.shape[0] == 8 and (tid[n:] == -1).all() and (tid[:n] >= 0).any()
    w1, w2 = gated_expert_weights(E, H, I, seed=1)
    out = kernel.apply(x, w1, w2, w, ids, MoEActivation.SILU, E, None, False)
    torch.testing.assert_close(out.float(), _dense(x, w, ids, w1, w2), rtol=2e-2, atol=2e-2)


# ------------------------------------------------------- masked amax scale


def _reference_scale(rows: torch.Tensor, dtype_max: float, eps: float = 1e-10) -> torch.Tensor:
    amax = rows.double().abs().max().item() if rows.numel() else 0.0
    return torch.tensor([max(amax / dtype_max, eps)], dtype=torch.float32)


@pytest.mark.parametrize("quant_dtype, dtype_max", [(torch.float8_e4m3fn, 448.0), (torch.float8_e5m2, 57344.0),
                                                    (torch.int8, 127.0)])
@pytest.mark.parametrize("num_valid", [0, 1, 5, 12])
def test_masked_amax_scale_ignores_rows_past_num_valid(monkeypatch, quant_dtype, dtype_max, num_valid):
    import deepep_ops.vllm._compat as compat

    monkeypatch.setattr(compat, "vllm_masked_amax_scale", None)  # the plain-torch one (0.32/0.33)
    g = torch.Generator().manual_seed(num_valid)
    x = (5 * torch.randn(12, 64, generator=g)).bfloat16()
    x[num_valid:] = torch.tensor([float("nan"), float("inf"), 1e30, -1e30]).repeat(16).bfloat16()
    got = compat.masked_amax_scale(x, quant_dtype, num_valid=torch.tensor([num_valid], dtype=torch.int32))
    assert got.shape == (1,) and got.dtype == torch.float32
    torch.testing.assert_close(got, _reference_scale(x[:num_valid], dtype_max), rtol=1e-6, atol=0)


def test_masked_amax_scale_bad_input():
    import deepep_ops.vllm._compat as compat

    if compat.vllm_masked_amax_scale is not None:
        pytest.skip("vLLM's own masked_amax_scale checks its input")
    with pytest.raises(ValueError, match="x must be 2-D"):
        compat.masked_amax_scale(torch.zeros(2, 3, 4), torch.float8_e4m3fn, num_valid=torch.tensor([1]))
    with pytest.raises(ValueError, match="num_valid must hold 1 element"):
        compat.masked_amax_scale(torch.zeros(2, 3), torch.float8_e4m3fn, num_valid=torch.tensor([1, 2]))


def test_act_scale_is_tensor_wide():
    """The rule 0.34 uses, by hand: run-time per-tensor fp8/int8 scales only."""
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG, FusedMoEQuantConfig

    import deepep_ops.vllm._compat as compat

    make = FusedMoEQuantConfig.make
    cases = [
        (make(torch.float8_e4m3fn), None, True),
        (make(torch.float8_e4m3fn), torch.tensor([0.5]), False),  # static scale
        (make(torch.float8_e4m3fn, per_act_token_quant=True), None, False),
        (make(torch.float8_e4m3fn, block_shape=[128, 128]), None, False),
        (make(torch.int8), None, True),
        (FUSED_MOE_UNQUANTIZED_CONFIG, None, False),
    ]
    for qc, scale, want in cases:
        assert compat.act_scale_is_tensor_wide(qc, scale) is want, (qc, scale)
    # vLLM's own method where the config has one (0.34)
    stand_in = types.SimpleNamespace(act_scale_is_tensor_wide=lambda scale: "asked")
    assert compat.act_scale_is_tensor_wide(stand_in, None) is True


# -------------------------------------------- post-dispatch quantization


class _Quantizer:
    """A torch stand-in for vLLM's ``moe_kernel_quantize_input`` (fp8, per tensor
    or per token), recording its arguments (vLLM's is CUDA-only)."""

    def __init__(self) -> None:
        self.calls: list = []

    def __call__(self, A, A_scale, quant_dtype, per_act_token_quant, block_shape=None, is_scale_swizzled=True):
        self.calls.append(dict(rows=A.shape[0], A_scale=A_scale, per_act_token_quant=per_act_token_quant))
        assert quant_dtype == torch.float8_e4m3fn and block_shape is None
        if A_scale is None:
            amax = A.float().abs().amax(dim=-1, keepdim=True) if per_act_token_quant else A.float().abs().amax()
            A_scale = (amax / FP8_MAX).clamp_min(1e-10).reshape(-1, 1)
        return (A.float() / A_scale.reshape(-1, 1)).clamp(-FP8_MAX, FP8_MAX).to(quant_dtype), A_scale


@pytest.fixture
def quantizer(monkeypatch):
    import deepep_ops.vllm._compat as compat
    import deepep_ops.vllm.prepare_finalize as vpf

    q = _Quantizer()
    monkeypatch.setattr(compat, "moe_kernel_quantize_input", q)
    monkeypatch.setattr(vpf, "can_quantize_after_dispatch", lambda device: True)
    return q


def _poison_padding(monkeypatch, pf):
    """Fill decode rows past the received count with 1e4, as DeepEP leaves them
    uninitialised (the reference buffer zeroes them)."""
    inner = pf._pf[False]
    prepare = inner.prepare

    def poisoned(*args, **kwargs):
        p = prepare(*args, **kwargs)
        n = int(p.handle.psum_num_recv_tokens_per_scaleup_rank[-1])
        x = p.expert_x.clone()
        x[n:] = 1e4
        return p._replace(expert_x=x)

    monkeypatch.setattr(inner, "prepare", poisoned)


def test_decode_per_tensor_scale_covers_received_rows_only(monkeypatch, quantizer):
    from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig

    import deepep_ops.vllm._compat as compat
    from deepep_ops.vllm import DeepEPV2PrepareAndFinalize

    monkeypatch.setattr(compat, "vllm_masked_amax_scale", None)
    pf = DeepEPV2PrepareAndFinalize(_buffer(), 1, 1, 0, E, K, use_cudagraph=True)
    _poison_padding(monkeypatch, pf)
    x, w, ids = _inputs(5, seed=4, scale=3.0)
    a, scale, meta, _, _ = pf.prepare(x, w, ids, E, None, False, FusedMoEQuantConfig.make(torch.float8_e4m3fn))
    (call,) = quantizer.calls
    assert call["rows"] == 8 and call["per_act_token_quant"] is False
    # world size 1: the 5 received rows are the 5 tokens
    want = torch.tensor([x.float().abs().max().item() / FP8_MAX])
    torch.testing.assert_close(call["A_scale"], want, rtol=1e-6, atol=0)
    assert a.dtype == torch.float8_e4m3fn and scale is call["A_scale"]
    torch.testing.assert_close((a[:5].float() * scale).float(), x.float(), rtol=0.07, atol=0.02)


def test_vllms_masked_amax_scale_is_used_where_present(monkeypatch, quantizer):
    from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig

    import deepep_ops.vllm._compat as compat
    from deepep_ops.vllm import DeepEPV2PrepareAndFinalize

    seen = []

    def vllm_masked_amax_scale(x, quant_dtype, *, row_valid=None, num_valid=None, expert_num_tokens=None,
                               rows_per_expert=None, eps=1e-10):  # 0.34's signature
        seen.append((x.shape, quant_dtype, num_valid.clone(), eps))
        return torch.tensor([0.25])

    monkeypatch.setattr(compat, "vllm_masked_amax_scale", vllm_masked_amax_scale)
    pf = DeepEPV2PrepareAndFinalize(_buffer(), 1, 1, 0, E, K, use_cudagraph=True)
    pf.prepare(*_inputs(3, seed=5, scale=3.0), E, None, False, FusedMoEQuantConfig.make(torch.float8_e4m3fn))
    ((shape, dtype, num_valid, eps),) = seen
    assert shape == (4, H) and dtype == torch.float8_e4m3fn and num_valid.tolist() == [3] and eps == 1e-10
    assert quantizer.calls[0]["A_scale"].tolist() == [0.25]


def test_quantization_arguments_prefill_static_and_per_token(quantizer):
    """Prefill rows are exact (no mask: vLLM's dynamic scale over all rows); a
    static scale is passed as is; per-token quantization is passed through."""
    from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig

    from deepep_ops.vllm import DeepEPV2PrepareAndFinalize

    x, w, ids = _inputs(5, seed=6, scale=3.0)
    make = FusedMoEQuantConfig.make
    static = torch.tensor([0.125])
    cases = [
        (False, make(torch.float8_e4m3fn), None, False),
        (True, make(torch.float8_e4m3fn, a1_scale=static), static, False),
        (True, make(torch.float8_e4m3fn, per_act_token_quant=True), None, True),
        (False, make(torch.float8_e4m3fn, per_act_token_quant=True), None, True),
    ]
    for decode, qc, want_scale, want_per_token in cases:
        quantizer.calls.clear()
        pf = DeepEPV2PrepareAndFinalize(_buffer(), 1, 1, 0, E, K, use_cudagraph=decode)
        pf.prepare(x, w, ids, E, None, False, qc)
        (call,) = quantizer.calls
        assert call["A_scale"] is want_scale and call["per_act_token_quant"] is want_per_token, (decode, call)


def test_post_dispatch_quantization_still_refused_on_cpu():
    from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig

    from deepep_ops.vllm import DeepEPV2PrepareAndFinalize

    pf = DeepEPV2PrepareAndFinalize(_buffer(), 1, 1, 0, E, K, use_cudagraph=True)
    with pytest.raises(NotImplementedError, match="post-dispatch quantization"):
        pf.prepare(*_inputs(3), E, None, False, FusedMoEQuantConfig.make(torch.float8_e4m3fn))


# ------------------------------------------------------------ finalize_async


@pytest.mark.parametrize("decode", [True, False])
def test_finalize_async_in_034s_order(decode):
    """0.34's modular kernel: ``finalize_async``, then the shared experts, then
    the receiver (a bare callable here). The output is complete and right."""
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG as QC
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import TopKWeightAndReduceDelegate

    from deepep_ops.vllm import DeepEPV2PrepareAndFinalize
    from deepep_ops.vllm.testing import gated_expert_weights

    x, w, ids = _inputs(6, seed=7)
    w1, w2 = gated_expert_weights(E, H, I, seed=1)
    pf = DeepEPV2PrepareAndFinalize(_buffer(), 1, 1, 0, E, K, use_cudagraph=decode)
    a, _, _, tid, tw = pf.prepare(x, w, ids, E, None, False, QC)
    # unreduced expert rows [rows, lanes, H] in plain torch (zeros for lanes at -1)
    af = a.float()
    rows = torch.zeros(tid.shape + (H,))
    for e in range(E):
        y = (torch.nn.functional.silu(af @ w1[e, :I].float().t()) * (af @ w1[e, I:].float().t())) @ w2[e].float().t()
        rows += (tid == e).unsqueeze(-1) * y.unsqueeze(1)
    output = torch.full((6, H), float("nan"), dtype=torch.bfloat16)
    ret = pf.finalize_async(output, rows.bfloat16(), tw, tid, False, TopKWeightAndReduceDelegate())
    hook, receiver = ret if isinstance(ret, tuple) else (None, ret)
    assert hook is None and callable(receiver)
    # (0.34 runs the shared experts here, between finalize_async and the receiver)
    assert receiver() is None
    torch.testing.assert_close(output.float(), _dense(x, w, ids, w1, w2), rtol=2e-2, atol=2e-2)
