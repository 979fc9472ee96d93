"""vLLM's modular MoE kernel + deepep_ops' DeepEPV2PrepareAndFinalize on 2 gloo ranks.

Each rank runs ``FusedMoEKernel.apply`` (vLLM 0.32) over the adapter, the
reference buffer and torch-native experts, under a real vLLM ``ForwardContext``
whose ``dp_metadata`` holds both ranks' token counts (different per rank), and
compares with an independent dense MoE of its own tokens. Decode (eager),
prefill (eager), and decode compiled with ``fullgraph=True, dynamic=True`` over
a sweep of batch sizes (frame count, equality with eager, bucket = DP-global max).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

import _dist  # noqa: E402
from _dist import run_distributed  # noqa: E402

import deepep_ops  # noqa: E402

E, K, H, I, CAP = 8, 2, 256, 32, 128
WORLD = 2
SWEEP = [1, 2, 3, 5, 8, 13, 21, 34, 55]


def make_inputs(seed: int, T: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).bfloat16()
    logits = torch.randn(T, E, generator=g)
    w, ids = torch.topk(torch.softmax(logits, -1), K, dim=-1)
    return x, (w / w.sum(-1, keepdim=True)).float(), ids.long()


def dense_moe(x, w, ids, w1, w2):
    """Single-process float32 MoE: Σ_k w[t,k]·silu(x W_gate)·(x W_up) W_down of expert ids[t,k]."""
    xf = x.float()
    out = torch.zeros_like(xf)
    for e in range(E):
        gate, up = w1[e, :I].float(), w1[e, I:].float()
        y = (torch.nn.functional.silu(xf @ gate.t()) * (xf @ up.t())) @ w2[e].float().t()
        out += (w * (ids == e)).sum(-1, keepdim=True) * y
    return out.bfloat16()


class RecordingBuffer(deepep_ops.ReferenceElasticBuffer):
    """The reference backend, noting the ``num_max_tokens_per_rank`` each dispatch really got."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_m: list = []

    def dispatch(self, *args, **kwargs):
        self.seen_m.append(kwargs["num_max_tokens_per_rank"])
        return super().dispatch(*args, **kwargs)


def _forward_context(counts):
    from vllm.forward_context import DPMetadata, ForwardContext, override_forward_context

    ctx = ForwardContext(no_compile_layers={}, attn_metadata={}, slot_mapping={},
                         dp_metadata=DPMetadata(torch.tensor(counts, dtype=torch.int32)))
    return override_forward_context(ctx)


def _close(got, want, what):
    err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    scale = want.float().abs().max().item() if want.numel() else 1.0
    assert err <= 0.02 * max(scale, 1e-3) + 1e-2, f"{what}: max |err| {err} (max |ref| {scale})"


def _rank_main(rank, world):
    return {mode: _run_mode(rank, world, mode) for mode in ("decode", "prefill", "compile")}


def _run_mode(rank, world, mode):
    import torch.distributed as dist
    from torch._dynamo.testing import CompileCounterWithBackend

    from deepep_ops.vllm.testing import build_modular_kernel, expert_map_for, gated_expert_weights
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    buf = RecordingBuffer(dist.group.WORLD, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K)
    w1_all, w2_all = gated_expert_weights(E, H, I)
    EL = E // world
    w1, w2 = w1_all[rank * EL:(rank + 1) * EL], w2_all[rank * EL:(rank + 1) * EL]
    emap = expert_map_for(E, rank, world)
    kernel, adapter = build_modular_kernel(buf, E, K, H, I, decode=mode != "prefill")

    def fwd(x, w, ids):
        return kernel.apply(x, w1, w2, w, ids, MoEActivation.SILU, E, emap, False)

    report = {}
    if mode in ("decode", "prefill"):
        counts = [3, 6] if mode == "decode" else [4, 11]
        x, w, ids = make_inputs(100 + rank, counts[rank])
        with _forward_context(counts):
            out = fwd(x, w, ids)
        _close(out, dense_moe(x, w, ids, w1_all, w2_all), f"{mode} rank {rank}")
        assert adapter.handles == [None, None], "finalize must free its handle slot"
        report["M"] = buf.seen_m[-1]
        return report

    # compiled decode sweep: rank r holds T + r tokens; the bucket must follow max over DP.
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fwd, fullgraph=True, dynamic=True, backend=cnt)
    buckets = []
    for T in SWEEP:
        counts = [T, T + 1]
        x, w, ids = make_inputs(1000 * T + rank, counts[rank])
        with _forward_context(counts):
            got = compiled(x, w, ids)
            m = buf.seen_m[-1]
            assert adapter.handles == [None, None], "compiled finalize must free its handle slot"
            eager = fwd(x, w, ids)
        torch.testing.assert_close(got, eager, rtol=0, atol=0, msg=f"T={T}: compiled != eager")
        _close(got, dense_moe(x, w, ids, w1_all, w2_all), f"compiled T={T}")
        buckets.append(m)
    report["frames"] = cnt.frame_count
    report["buckets"] = buckets
    return report


def _spawn():
    per_rank = run_distributed(_rank_main, WORLD)  # one spawn for every mode
    return {mode: [r[mode] for r in per_rank] for mode in ("decode", "prefill", "compile")}


def start_early() -> None:
    """Called by tests/conftest.py once collected: the spawn runs in the background."""
    _dist.start_early("test_vllm_multirank", _spawn)


@pytest.fixture(scope="module")
def results():
    return _dist.result_once("test_vllm_multirank", _spawn)


def test_decode_eager_matches_dense_and_buckets_dp_max(results):
    # DP counts [3, 6]: both ranks dispatch with M = pow2_bucket(6) = 8, not their local T.
    assert [r["M"] for r in results["decode"]] == [8, 8]


def test_prefill_eager_matches_dense(results):
    # Prefill dispatches at the buffer capacity (expand + CPU sync).
    assert [r["M"] for r in results["prefill"]] == [CAP, CAP]


def test_compiled_decode_no_recompiles_and_dp_bucket(results):
    from deepep_ops import pow2_bucket

    res = results["compile"]
    expected = [pow2_bucket(T + 1, CAP) for T in SWEEP]
    for r in res:
        assert r["frames"] <= 2, f"{r['frames']} compiled frames over T={SWEEP}"
        assert r["buckets"] == expected
