"""Hybrid mode (docs/deepep_contract.md §9) in one process: the codec's shapes in both modes,
DeepEP's channel formula, the rounding recipe's worked example, and the DeepEP backend's hybrid
paths against a stand-in that has ``deep_ep.ElasticBuffer``'s attributes and records its calls
(no real DeepEP here). The multi-rank hybrid tests live with their direct-mode counterparts
(``test_multirank.py``, ``test_fake_vs_real.py``, ``test_training.py``, ``test_fail_safe.py``).
"""

from __future__ import annotations

import types

import pytest
import torch

import deepep_ops as D
import dense_reference as ref
from deepep_ops.backends.deep_ep import (
    ELASTIC_BUFFER_API,
    DeepEPAPI,
    DeepEPBackend,
    logical_domain,
    predict_num_channels,
)
from deepep_ops.handle import HANDLE_TENSOR_SPECS, DispatchArgs, DispatchHandle, HandleDims, handle_args

SWITCH = r"allow_hybrid_mode=False.*VLLM_DEEPEP_V2_ALLOW_HYBRID_MODE=0.*--deepep-v2-mode direct"


# ----------------------------------------------------------------------------- the codec
def _shapes(dims, names=None):
    return {n: s.shape(dims) for n, s in HANDLE_TENSOR_SPECS.items() if names is None or n in names}


def test_handle_shapes_direct_and_hybrid():
    """Contract §3 (direct) and §9 (hybrid): psum [U] (U = R direct), the slot index [T, K] or
    [C, S, ceil(M/C), K], the hybrid-only tensors [C, S·ceil(M/C)+1, 2+2K] and [.., U]."""
    T, K, M, R, EL, N = 5, 3, 7, 4, 2, 28
    direct = HandleDims(R, EL, N, T, K, M, 1, R, 0)
    assert _shapes(direct, ("psum_num_recv_tokens_per_scaleup_rank", "dst_buffer_slot_idx", "recv_src_metadata")) == {
        "psum_num_recv_tokens_per_scaleup_rank": (4,), "dst_buffer_slot_idx": (5, 3), "recv_src_metadata": (28, 5)}
    hybrid = HandleDims(R, EL, N, T, K, M, 2, 2, 3)
    assert _shapes(hybrid) == {
        "psum_num_recv_tokens_per_scaleup_rank": (2,),
        "psum_num_recv_tokens_per_expert": (2,),
        "num_unaligned_recv_tokens_per_expert": (2,),
        "recv_src_metadata": (28, 5),
        "dst_buffer_slot_idx": (3, 2, 3, 3),  # ceil(7 / 3) = 3 tokens per channel
        "token_metadata_at_forward": (3, 7, 8),  # 2·3 + 1 rows, 2 + 2·3 columns
        "channel_linked_list": (3, 7, 2),
    }
    # No T in any hybrid-only shape, and none grows a new symbol: functions of C, S, U, M, K.
    assert _shapes(hybrid._replace(num_tokens=11))["dst_buffer_slot_idx"] == (3, 2, 3, 3)


def test_handle_args_leave_out_absent_hybrid_tensors():
    t = torch.zeros(1, dtype=torch.int32)
    direct = DispatchHandle(t, t, t, t, t, t, 8, 4, 1, True, 16)
    assert direct.token_metadata_at_forward is None and not direct.hybrid and direct.num_channels == 0
    assert handle_args(direct) == tuple(direct)[:11]
    forward, links = torch.zeros(3, 7, 8, dtype=torch.int32), torch.zeros(3, 7, 2, dtype=torch.int32)
    hybrid = direct._replace(token_metadata_at_forward=forward, channel_linked_list=links)
    assert handle_args(hybrid) == tuple(hybrid) and len(handle_args(hybrid)) == 13
    assert hybrid.hybrid and hybrid.num_channels == 3


def test_schema_hybrid_arguments_are_optional_and_last():
    schema = torch.ops.deepep_ops.combine.default._schema
    tail = [(a.name, str(a.type), a.default_value) for a in schema.arguments[-2:]]
    assert tail == [("token_metadata_at_forward", "Optional[Tensor]", None),
                    ("channel_linked_list", "Optional[Tensor]", None)]
    returns = [r.name for r in torch.ops.deepep_ops.dispatch.default._schema.returns]
    assert returns[-2:] == ["token_metadata_at_forward", "channel_linked_list"]


# ----------------------------------------------------------------------------- rounding (§9)
def test_refs_combine_worked_example():
    """The test helper's recipe gives DeepEP's refs.combine values on the research note's example
    (those were computed by running DeepEP's own refs.combine): hybrid 2.03125, direct 2.015625."""
    idx = torch.tensor([[5, 0, 4, 2]])
    y = torch.tensor([1.0, 1.0, 0.005859375, 0.01171875]).view(1, 4, 1).expand(1, 4, 256).contiguous()
    hybrid = ref.refs_combine(y, idx, 2, 2, 8, reduce_in_local=True, reduce_in_scaleup=True)
    direct = ref.refs_combine(y, idx, 2, 2, 8, reduce_in_local=True, reduce_in_scaleup=False)
    assert bool((hybrid.float() == 2.03125).all()) and bool((direct.float() == 2.015625).all())


def test_refs_combine_direct_recipe_is_spec_combine():
    """The recipe at (True, False) is contract §4's direct rounding (dense_reference.spec_combine)."""
    E, H, K = 8, 256, 3
    inp = ref.make_global_inputs(5, [9], H, K, E, neg_frac=0.2)[0]
    ex = ref.Experts(5, E, H, "diag")
    for expand in (False, True):
        y = ref.lane_values(inp, ex, True, expand=expand)
        got = ref.refs_combine(y, inp.topk_idx, 1, 4, E, reduce_in_local=True, reduce_in_scaleup=False)
        assert torch.equal(got, ref.spec_combine(inp, ex, 2, True, expand=expand))


# ----------------------------------------------------------------------------- DeepEP's channel count
@pytest.mark.parametrize("H,es,P,K,R,E,overlap,off", [
    (7168, 2, 0, 8, 16, 256, 7, 4),
    (7168, 1, 56, 8, 16, 256, 8, 4),
    (4096, 2, 0, 8, 16, 128, 8, 4),
    (2048, 2, 0, 4, 4, 16, 8, 4),
])
def test_predict_num_channels_matches_the_formula_table(H, es, P, K, R, E, overlap, off):
    """Channels per SM from buffer.hpp's formula with H100/H200 shared memory (232448 bytes):
    the research note's table (arithmetic, never run on a multi-node machine)."""
    kw = dict(shared_memory_bytes=232448, num_ranks=R, num_experts=E, hidden=H, x_element_size=es,
              num_scale_cols=P, num_topk=K)
    assert predict_num_channels(num_sms=1, prefer_overlap_with_compute=True, **kw) == overlap
    assert predict_num_channels(num_sms=1, prefer_overlap_with_compute=False, **kw) == off
    assert predict_num_channels(num_sms=64, prefer_overlap_with_compute=True, **kw) == 64 * overlap


# ----------------------------------------------------------------------------- the DeepEP backend
class StandInHandle:
    """``deep_ep.EPHandle``'s constructor (16 positional arguments), recorded."""

    FIELDS = ("do_expand", "num_experts", "expert_alignment", "num_max_tokens_per_rank", "num_sms", "topk_idx",
              "num_recv_tokens", "num_expanded_tokens", "num_recv_tokens_per_expert_list",
              "psum_num_recv_tokens_per_scaleup_rank", "psum_num_recv_tokens_per_expert",
              "num_unaligned_recv_tokens_per_expert", "recv_src_metadata", "dst_buffer_slot_idx",
              "token_metadata_at_forward", "channel_linked_list")

    def __init__(self, *args):
        assert len(args) == 16
        for name, value in zip(self.FIELDS, args):
            setattr(self, name, value)


class StandInElasticBuffer:
    """``deep_ep.ElasticBuffer``'s attributes (2 nodes x 2 ranks by default) and calls, recorded.
    Its dispatch returns a hybrid handle with ``channels`` channels."""

    def __init__(self, num_scaleout_ranks=2, num_ranks=4, channels=448, prefer_overlap_with_compute=True,
                 theoretical_num_sms=64, num_sms_alignment=1):
        self.num_ranks, self.rank_idx, self.group = num_ranks, 0, None
        self.num_max_tokens_per_rank, self.hidden = 16, 7168
        self.num_scaleout_ranks = num_scaleout_ranks
        self.num_scaleup_ranks = num_ranks // num_scaleout_ranks
        self.prefer_overlap_with_compute = prefer_overlap_with_compute
        self.channels = channels
        self.theoretical_num_sms = theoretical_num_sms
        self.num_sms_alignment = num_sms_alignment  # v2.5 rounds an explicit num_sms up to even
        self.calls = []

    def get_theoretical_num_sms(self, num_experts, num_topk):
        return self.theoretical_num_sms

    def dispatch(self, x, **kw):
        self.calls.append(("dispatch", kw))
        x, sf = x if isinstance(x, tuple) else (x, None)
        if kw.get("handle") is not None:
            return (x if sf is None else (x, sf)), None, None, kw["handle"], None
        T, K = kw["topk_idx"].shape
        M, E = kw["num_max_tokens_per_rank"], kw["num_experts"]
        S, U, R = self.num_scaleout_ranks, self.num_scaleup_ranks, self.num_ranks
        C = self.channels
        mtpc = -(-M // C)
        i32 = dict(dtype=torch.int32)
        handle = types.SimpleNamespace(
            num_sms=-(-kw["num_sms"] // self.num_sms_alignment) * self.num_sms_alignment,
            psum_num_recv_tokens_per_scaleup_rank=torch.zeros(U, **i32),
            psum_num_recv_tokens_per_expert=torch.zeros(E // R, **i32),
            num_unaligned_recv_tokens_per_expert=torch.zeros(E // R, **i32),
            recv_src_metadata=torch.zeros(R * M, K + 2, **i32),
            dst_buffer_slot_idx=torch.zeros(C, S, mtpc, K, **i32) if S > 1 else torch.zeros(T, K, **i32),
            token_metadata_at_forward=torch.zeros(C, S * mtpc + 1, 2 + 2 * K, **i32) if S > 1 else None,
            channel_linked_list=torch.zeros(C, S * mtpc + 1, U, **i32) if S > 1 else None,
        )
        return torch.zeros(R * M, x.shape[1], dtype=x.dtype), torch.zeros(R * M, K, dtype=torch.int64), \
            torch.zeros(R * M, K), handle, None

    def combine(self, x, handle, topk_weights=None, **kw):
        self.calls.append(("combine", dict(kw, handle=handle)))
        T = handle.topk_idx.shape[0]
        return torch.zeros(T, x.shape[1], dtype=torch.bfloat16), None, None


def _args(T=3, H=7168, K=8, E=256, M=16, dtype=torch.bfloat16, device=None):
    x = torch.zeros(T, H, dtype=dtype)
    if device is not None:  # only the device is read by the prediction: a duck-typed x
        x = types.SimpleNamespace(device=torch.device(device), shape=(T, H), element_size=lambda: 2, dtype=dtype)
    idx = torch.arange(T * K).reshape(T, K) % E
    return DispatchArgs(x, None, idx, torch.ones(T, K), E, M, 1, True)


def test_logical_domain():
    assert logical_domain(StandInElasticBuffer(2), 4) == (2, 2)
    assert logical_domain(types.SimpleNamespace(), 8) == (1, 8)  # no domain attributes: direct
    get = types.SimpleNamespace(get_logical_domain_size=lambda: (4, 2))
    assert logical_domain(get, 8) == (4, 2)
    with pytest.raises(ValueError, match=r"3 scale-out x 2 scale-up ranks does not make its 4 ranks"):
        logical_domain(types.SimpleNamespace(num_scaleout_ranks=3, num_scaleup_ranks=2), 4)


def test_direct_mode_needs_no_channels_and_builds_direct_handles():
    buf = StandInElasticBuffer(num_scaleout_ranks=1)
    backend = DeepEPBackend(buf, StandInHandle, torch.int64)
    assert (backend.num_scaleout_ranks, backend.num_scaleup_ranks) == (1, 4)
    args = _args()
    assert backend.num_channels(args) == 0
    out = backend.dispatch(args)
    assert out.hybrid_tensors == (None, None)


def test_hybrid_channels_cannot_be_told_off_a_gpu():
    """On tokens that are not on a CUDA device, C cannot be predicted: one clear error naming the switch."""
    backend = DeepEPBackend(StandInElasticBuffer(), StandInHandle, torch.int64)
    with pytest.raises(ValueError, match=r"DeepEP hybrid mode \(2 scale-out x 2 scale-up ranks\): cannot tell its "
                                         r"channel count.*tokens are on cpu.*" + SWITCH):
        backend.num_channels(_args())
    no_attr = StandInElasticBuffer()
    del no_attr.prefer_overlap_with_compute
    with pytest.raises(ValueError, match=r"no prefer_overlap_with_compute attribute.*" + SWITCH):
        DeepEPBackend(no_attr, StandInHandle, torch.int64).num_channels(_args())


@pytest.mark.parametrize("overlap,C", [(True, 64 * 7), (False, 64 * 4)])
def test_hybrid_channels_predicted_from_the_device(monkeypatch, overlap, C):
    """bf16, H = 7168, K = 8, E = 256 on 4 ranks, num_sms = get_theoretical_num_sms = 64, the
    device's shared memory read through torch.cuda (232448: H100/H200)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(shared_memory_per_block_optin=232448))
    backend = DeepEPBackend(StandInElasticBuffer(prefer_overlap_with_compute=overlap), StandInHandle, torch.int64)
    assert backend.num_channels(_args(device="cuda")) == C


def _hybrid_backend(monkeypatch, predicted=448, channels=448):
    buf = StandInElasticBuffer(channels=channels)
    backend = DeepEPBackend(buf, StandInHandle, torch.int64)
    monkeypatch.setattr(backend, "_predict_num_channels", lambda args, key: predicted)
    return buf, backend


def test_hybrid_dispatch_confirms_the_channel_count(monkeypatch):
    buf, backend = _hybrid_backend(monkeypatch)
    out = backend.dispatch(_args())
    forward, links = out.hybrid_tensors
    assert forward.shape == (448, 2 * 1 + 1, 18) and links.shape == (448, 3, 2)
    assert buf.calls[-1][1]["num_sms"] == 64
    # A handle whose channel count is not the one the graph was shaped with: a clear error.
    buf, backend = _hybrid_backend(monkeypatch, predicted=448, channels=256)
    with pytest.raises(RuntimeError, match=r"handle has 256 channels .* predicted 448 .*num_sms=64.*" + SWITCH):
        backend.dispatch(_args())


def test_hybrid_native_handle_carries_the_hybrid_tensors(monkeypatch):
    """Combine, weighted combine and cached dispatch hand DeepEP an EPHandle with the two hybrid
    tensors and the dispatch's num_sms."""
    buf, backend = _hybrid_backend(monkeypatch)
    args = _args()
    out = backend.dispatch(args)
    handle = DispatchHandle(args.topk_idx, *out.handle_tensors, args.num_experts, args.num_max_tokens_per_rank,
                            args.expert_alignment, True, 0, *out.hybrid_tensors)
    rows = torch.zeros(out.recv_x.shape[0], 7168, dtype=torch.bfloat16)
    backend.combine(rows, handle)
    backend.combine_with_weights(rows, torch.zeros(rows.shape[0], 8), handle)
    backend.cached_dispatch(torch.zeros(3, 7168, dtype=torch.bfloat16), None, handle)
    native = [kw["handle"] for name, kw in buf.calls[1:]]
    assert len(native) == 3
    for h in native:
        assert h.token_metadata_at_forward is out.hybrid_tensors[0]
        assert h.channel_linked_list is out.hybrid_tensors[1]
        assert h.psum_num_recv_tokens_per_scaleup_rank.shape == (2,) and h.num_sms == 64
    assert buf.calls[-1][1]["num_sms"] == 64  # cached dispatch: the dispatch's SM count


@pytest.mark.parametrize("api,num_sms", [(ELASTIC_BUFFER_API, 63), (DeepEPAPI("EPBuffer", True, 2, False), 64)],
                         ids=["v2.1", "v2.5"])
def test_hybrid_channels_and_calls_use_the_dispatchs_num_sms(monkeypatch, api, num_sms):
    """get_theoretical_num_sms answers 63: v2.1 runs with 63, v2.5 with 64 (even). The predicted C
    (7 channels per SM, bf16 H = 7168), the dispatch, and the combine, weighted combine and cached
    dispatch of a handle rebuilt from graph values all use that count."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(shared_memory_per_block_optin=232448))
    buf = StandInElasticBuffer(channels=7 * num_sms, theoretical_num_sms=63, num_sms_alignment=api.num_sms_alignment)
    backend = DeepEPBackend(buf, StandInHandle, torch.int64, api)
    args = _args(device="cuda")
    assert backend.num_channels(args) == 7 * num_sms
    out = backend.dispatch(args)  # confirms C against the handle
    assert out.hybrid_tensors[0].shape[0] == 7 * num_sms
    handle = DispatchHandle(args.topk_idx, *out.handle_tensors, args.num_experts, args.num_max_tokens_per_rank,
                            args.expert_alignment, True, 0, *out.hybrid_tensors)
    rows = torch.zeros(out.recv_x.shape[0], 7168, dtype=torch.bfloat16)
    backend.combine(rows, handle)
    backend.combine_with_weights(rows, torch.zeros(rows.shape[0], 8), handle)
    backend.cached_dispatch(torch.zeros(3, 7168, dtype=torch.bfloat16), None, handle)
    (_, dispatched), *later = buf.calls
    assert dispatched["num_sms"] == num_sms and out.native_handle.num_sms == num_sms
    assert [kw["handle"].num_sms for _, kw in later] == [num_sms] * 3
    assert later[-1][1]["num_sms"] == num_sms  # cached dispatch passes it explicitly (DeepEP PR #685)

def test_hybrid_fakes_use_the_backends_channel_count(monkeypatch):
    """Under FakeTensorMode an EPOpsBuffer over a hybrid DeepEP buffer returns the hybrid shapes with
    the backend's C (what it will confirm at the first real dispatch)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _buf, backend = _hybrid_backend(monkeypatch, predicted=6)
    ep = D.EPOpsBuffer(backend)
    assert (ep.num_scaleout_ranks, ep.num_scaleup_ranks, ep.hybrid) == (2, 2, True)
    args = _args(T=3, H=256, K=2, E=8, M=8)
    with FakeTensorMode() as mode:
        r = D.dispatch(mode.from_tensor(args.x), mode.from_tensor(args.topk_idx),
                       mode.from_tensor(args.topk_weights), ep, num_experts=8, num_max_tokens_per_rank=8)
    h = r.handle
    assert tuple(h.psum_num_recv_tokens_per_scaleup_rank.shape) == (2,)
    assert tuple(h.dst_buffer_slot_idx.shape) == (6, 2, 2, 2)
    assert tuple(h.token_metadata_at_forward.shape) == (6, 5, 6)
    assert tuple(h.channel_linked_list.shape) == (6, 5, 2)
    assert tuple(r.recv_x.shape) == (32, 256)  # R·M rows, as in direct mode


def test_hybrid_limits_are_checked_before_dispatch(monkeypatch):
    """DeepEP's hybrid kernels need U + EL <= 128 (a JIT failure otherwise): a clear error first."""
    buf, backend = _hybrid_backend(monkeypatch)
    ep = D.EPOpsBuffer(backend)
    args = _args(T=2, H=256, K=2, E=4 * 127, M=4)  # EL = 127
    with pytest.raises(ValueError, match=r"scale-up ranks \+ num_experts / num_ranks in hybrid mode \(2 scale-out x "
                                         r"2 scale-up ranks\) must be <= 128; .*" + SWITCH + ", got 129"):
        D.dispatch(args.x, args.topk_idx, args.topk_weights, ep, num_experts=4 * 127, num_max_tokens_per_rank=4)
    assert buf.calls == []  # nothing reached DeepEP


def test_reference_domain_arguments():
    with pytest.raises(ValueError, match=r"num_scaleout_ranks must be a positive int dividing the group size 1"):
        D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=4, num_scaleout_ranks=2)
    with pytest.raises(ValueError, match=r"num_channels must be a positive int, got 0"):
        D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=4, num_channels=0)
    ref_buf = D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=4)
    assert ref_buf.get_logical_domain_size() == (1, 1) and D.EPOpsBuffer(ref_buf).hybrid is False
