"""``deepep_ops.warmup``: every bucket exactly once per mode and dtype, collectively.

A recording :class:`~deepep_ops.backends.Backend` (the reference one, logging the
``(mode, M)`` of every dispatch and combine it runs) checks what warm-up drives
through the ops; the expected buckets are written out by hand below, not
derived from the code under test. On 2 gloo ranks, a later sweep over every
T = 1..capacity (decode, both ranks the same T) must use only buckets warm-up
already ran.
"""

from __future__ import annotations

import pytest
import torch

import deepep_ops as D
from _dist import run_distributed
from deepep_ops.backends.reference import ReferenceBackend
from deepep_ops.warmup import warm_key, warmed_up, warmup_buckets

H, K, E = 256, 2, 4


class RecordingBackend(ReferenceBackend):
    """The reference backend, logging ``("dispatch"|"combine", "decode"|"prefill", M)``."""

    def __init__(self, buffer: D.ReferenceElasticBuffer) -> None:
        super().__init__(buffer)
        self.calls: list = []
        self.tokens: list = []  # x.shape[0] of each dispatch

    def dispatch(self, args):
        self.calls.append(("dispatch", "decode" if args.decode else "prefill", args.num_max_tokens_per_rank))
        self.tokens.append(args.x.shape[0])
        return super().dispatch(args)

    def combine(self, x, handle, out=None):
        self.calls.append(("combine", "decode" if handle.decode else "prefill", int(handle.num_max_tokens_per_rank)))
        return super().combine(x, handle, out)


def _buffer(group, capacity: int) -> tuple:
    rec = RecordingBackend(D.ReferenceElasticBuffer(group, num_max_tokens_per_rank=capacity, hidden=H, num_topk=K))
    return rec, D.EPOpsBuffer(rec)


def _steps(calls: list) -> list:
    """[(mode, M)] of dispatch/combine pairs; fails unless each dispatch is followed by its combine."""
    assert len(calls) % 2 == 0, calls
    pairs = list(zip(calls[::2], calls[1::2]))
    for d, c in pairs:
        assert d[0] == "dispatch" and c[0] == "combine" and d[1:] == c[1:], (d, c)
    return [d[1:] for d, _ in pairs]


@pytest.mark.parametrize("capacity, expected", [(1, [1]), (12, [1, 2, 4, 8, 12]), (16, [1, 2, 4, 8, 16])])
def test_warmup_buckets(capacity, expected):
    assert warmup_buckets(capacity) == expected
    # Independent check: each is what pow2_bucket can return for some n.
    assert sorted({D.pow2_bucket(n, capacity) for n in range(capacity + 1)}) == expected


def test_every_bucket_once_per_mode_and_dtype_world1():
    rec, buf = _buffer(None, 12)
    seen = []
    rows = D.warmup(
        buf, hidden=H, num_topk=K, num_experts=E, dispatch_dtypes=(torch.bfloat16, torch.float8_e4m3fn),
        progress=lambda i, n, row: seen.append((i, n, row.num_max_tokens_per_rank)),
    )
    per_dtype = [("decode", 1), ("decode", 2), ("decode", 4), ("decode", 8), ("decode", 12), ("prefill", 12)]
    assert _steps(rec.calls) == per_dtype * 2
    assert [(r.mode, r.num_max_tokens_per_rank) for r in rows] == per_dtype * 2
    assert [r.dtype for r in rows] == ["bfloat16"] * 6 + ["float8_e4m3fn"] * 6
    assert seen == [(i, 12, m) for i, (_, m) in enumerate(per_dtype * 2, 1)]
    assert all(r.seconds >= 0 for r in rows)
    table = D.format_warmup_table(rows)
    assert len(table.splitlines()) == 1 + 12 + 1 and "prefill" in table and "total" in table
    assert warm_key(H, K, E, 1, (torch.bfloat16, torch.float8_e4m3fn), ("decode", "prefill")) in warmed_up(buf)


def test_full_buckets_carry_M_tokens():
    """num_tokens="full": every step dispatches M tokens per rank (the prefill step the capacity)."""
    rec, buf = _buffer(None, 12)
    rows = D.warmup(buf, hidden=H, num_topk=K, num_experts=E, num_tokens="full")
    assert _steps(rec.calls) == [("decode", 1), ("decode", 2), ("decode", 4), ("decode", 8), ("decode", 12),
                                 ("prefill", 12)]
    assert rec.tokens == [1, 2, 4, 8, 12, 12]
    assert [r.num_tokens for r in rows] == [1, 2, 4, 8, 12, 12]


def test_empty_inputs_and_subsets():
    rec, buf = _buffer(None, 8)
    D.warmup(buf, hidden=H, num_topk=K, num_experts=E, num_tokens=0, modes=("decode",), buckets=[2, 8])
    assert _steps(rec.calls) == [("decode", 2), ("decode", 8)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(modes=("decode", "chunked")), "modes must be"),
        (dict(num_tokens=2), r"num_tokens must be .full. or an int in \[0, 1\]"),
        (dict(buckets=[3]), "buckets must be"),
        (dict(num_topk=5), "num_topk must be"),
        (dict(dispatch_dtypes=(torch.float16,)), "dispatch_dtypes must be"),
        (dict(hidden=0), "hidden must be an int >= 1"),
    ],
)
def test_bad_arguments_fail_before_any_call(kwargs, match):
    rec, buf = _buffer(None, 8)
    args = dict(hidden=H, num_topk=K, num_experts=E) | kwargs
    with pytest.raises(ValueError, match=match):
        D.warmup(buf, **args)
    assert rec.calls == []


CAP = 16
EXPECTED_DECODE = [1, 2, 4, 8, 16]


def _two_rank_warmup_then_sweep(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    rec, buf = _buffer(dist.group.WORLD, CAP)
    D.warmup(buf, hidden=H, num_topk=K, num_experts=E)
    warm = _steps(rec.calls)
    rec.calls.clear()
    pf = D.DeepEPPrepareFinalize(buf, E, K, decode=True)
    g = torch.Generator().manual_seed(rank)
    for t in range(1, CAP + 1):
        x = torch.randn(t, H, generator=g).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])
        w = torch.full((t, K), 0.5)
        p = pf.prepare(x, w, ids, num_max_tokens_per_rank=buf.bucket(t))
        out = torch.empty_like(x)
        pf.finalize(out, torch.zeros(p.topk_ids.shape + (H,), dtype=torch.bfloat16), p.topk_weights, p.topk_ids,
                    p.handle)
    return {"warm": warm, "sweep": _steps(rec.calls)}


def test_two_ranks_warm_every_bucket_and_sweep_finds_none_cold():
    results = run_distributed(_two_rank_warmup_then_sweep, 2)
    for r in results:
        assert r["warm"] == [("decode", m) for m in EXPECTED_DECODE] + [("prefill", CAP)]
        swept = {m for _, m in r["sweep"]}
        warmed = {m for mode, m in r["warm"] if mode == "decode"}
        assert swept <= warmed, f"cold buckets in the sweep: {swept - warmed}"
        assert swept == set(EXPECTED_DECODE)  # the sweep really used every bucket


@pytest.mark.parametrize(
    "env, override, use_cudagraph, fp8, expected",
    [
        (None, None, True, False, []),  # reference buffer: off by default
        ("0", True, True, False, [("decode", m) for m in (1, 2, 4, 8)]),  # the argument wins over the env
        ("1", None, True, True, [("decode", m) for m in (1, 2, 4, 8)] * 2),  # bf16 and block fp8
        ("1", None, False, False, [("prefill", 8)]),
        ("0", None, True, False, []),
    ],
)
def test_vllm_adapter_warms_up_at_construction(monkeypatch, env, override, use_cudagraph, fp8, expected):
    pytest.importorskip("vllm")
    from deepep_ops.vllm import DeepEPV2PrepareAndFinalize

    if env is None:
        monkeypatch.delenv("DEEPEP_OPS_WARMUP", raising=False)
    else:
        monkeypatch.setenv("DEEPEP_OPS_WARMUP", env)
    rec, buf = _buffer(None, 8)

    def build(**kw):
        return DeepEPV2PrepareAndFinalize(buf, 1, 1, 0, E, K, use_fp8_dispatch=fp8, use_cudagraph=use_cudagraph,
                                          device="cpu", warmup=override, **kw)

    build()
    assert _steps(rec.calls) == expected
    build()  # a second layer on the same buffer: nothing more
    assert _steps(rec.calls) == expected


def test_warmup_switch_rejects_bad_env(monkeypatch):
    from deepep_ops.warmup import warmup_enabled

    monkeypatch.setenv("DEEPEP_OPS_WARMUP", "yes")
    with pytest.raises(ValueError, match="DEEPEP_OPS_WARMUP must be 0 or 1, got 'yes'"):
        warmup_enabled(_buffer(None, 8)[1])
