"""Every rank fails safe (issue 13): disagreeing ranks, one rank's bad input, reused
or hand-made handles and meta inputs end with a Python exception naming the cause
on EVERY rank within seconds, or with the dense reference's answer; no rank dies
by a signal (gloo's uncatchable size-mismatch abort) and none waits for the
process-group timeout.

Scenarios run batched, one spawn per world size (2 and 3 gloo ranks), each case
timed on every rank. Results come back as plain data and are checked here
against :mod:`dense_reference` (an independent dense MoE).
"""

from __future__ import annotations

import random
import time

import pytest
import torch

import dense_reference as ref
from _dist import run_distributed

H, K, E, CAP = 256, 2, 12, 16  # E divisible by 2 and 3 ranks
#: Every rank must end within this many seconds per case, below the gloo timeout:
#: a rank that waited for the collective timeout fails the time limit (and a case
#: that hangs fails that case, not the whole file). Cases take well under a second
#: on an idle machine; the margin is for a busy one (load 10 on 2 cores: a rank
#: gets a fifth of a core), so slowness never reads as waiting for the timeout.
LIMIT_S = 45.0
GLOO_TIMEOUT_S = 60


# ----------------------------------------------------------------------------- rank-side helpers
def _buffer(world, *, num_scaleout_ranks=1, num_channels=2, **kw):
    import torch.distributed as dist

    import deepep_ops as D

    group = dist.group.WORLD if world > 1 else None
    return D.EPOpsBuffer(D.ReferenceElasticBuffer(group, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K,
                                               num_scaleout_ranks=num_scaleout_ranks, num_channels=num_channels),
                      **kw)


def _decode_moe(D, buf, inp, E_, M, experts, topk_idx=None, mutate=None):
    """dispatch -> experts on received rows -> combine; [T, H] float."""
    R, me = buf.num_ranks, buf.rank
    EL = E_ // R
    r = D.dispatch(inp.x, inp.topk_idx if topk_idx is None else topk_idx, inp.topk_weights, buf,
                   num_experts=E_, num_max_tokens_per_rank=M, x_scales=inp.x_scales)
    if mutate is not None:
        mutate()
    n = int(r.handle.psum_num_recv_tokens_per_scaleup_rank[-1])
    xf = ref.dequant(r.recv_x, r.recv_x_scales)
    rows = torch.zeros(xf.shape)
    for i in range(n):
        for k in range(r.recv_topk_idx.shape[1]):
            e = int(r.recv_topk_idx[i, k])
            if e >= 0:
                rows[i] += float(r.recv_topk_weights[i, k]) * experts(me * EL + e, xf[i : i + 1])[0]
    return D.combine(rows.bfloat16(), r.handle, buf).float()


def _prefill_moe(D, buf, inp, E_, experts):
    R, me = buf.num_ranks, buf.rank
    EL = E_ // R
    r = D.dispatch_exact(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E_,
                         num_max_tokens_per_rank=CAP, x_scales=inp.x_scales)
    xf = ref.dequant(r.recv_x, r.recv_x_scales)
    rows = torch.zeros(xf.shape)
    start = 0
    for e, c in enumerate(r.num_recv_tokens_per_expert.tolist()):
        if c:
            rows[start : start + c] = experts(me * EL + e, xf[start : start + c]) * r.recv_topk_weights[start : start + c, None]
        start += c
    return D.combine(rows.bfloat16(), r.handle, buf).float()


def _max_rel_err(out, inp, experts):
    want = ref.dense_moe(inp, experts).float()
    if want.numel() == 0:
        return 0.0
    return float((out - want).abs().max() / want.abs().max().clamp(min=1e-6))


def _inputs(seed, Ts, rank, H_=H, K_=K, E_=E, fp8=False, neg_frac=0.2):
    return ref.make_global_inputs(seed, Ts, H_, K_, E_, fp8=fp8, neg_frac=neg_frac)[rank]


# ----------------------------------------------------------------------------- cases
# Each case: fn(rank, world) -> a plain value (checked in the test) or raises.
def case_disagree_M(rank, world):
    import deepep_ops as D

    buf, inp = _buffer(world), _inputs(1, [4] * world, rank)
    D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E, num_max_tokens_per_rank=[8, 16, 4][rank])


def case_disagree_H(rank, world):
    import deepep_ops as D

    inp = _inputs(2, [4] * world, rank, H_=H * (rank + 1))
    D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, _buffer(world), num_experts=E, num_max_tokens_per_rank=8)


def case_disagree_K(rank, world):
    import deepep_ops as D

    inp = _inputs(3, [4] * world, rank, K_=1 + rank % 2)
    D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, _buffer(world), num_experts=E, num_max_tokens_per_rank=8)


def case_disagree_dtype(rank, world):
    """bf16 [T, 256] on rank 0, fp8 [T, 512] (the same row bytes) elsewhere."""
    import deepep_ops as D

    inp = _inputs(4, [4] * world, rank, H_=H if rank == 0 else 2 * H, fp8=rank != 0)
    D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, _buffer(world), num_experts=E, num_max_tokens_per_rank=8,
               x_scales=inp.x_scales)


def case_disagree_E(rank, world):
    import deepep_ops as D

    E_ = E if rank == 0 else 2 * E
    inp = _inputs(5, [4] * world, rank)
    D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, _buffer(world), num_experts=E_, num_max_tokens_per_rank=8)


def case_disagree_domain(rank, world):
    """Rank 0's buffer is in hybrid mode (world nodes of 1 rank), its peers' in direct mode."""
    import deepep_ops as D

    inp = _inputs(16, [4] * world, rank)
    buf = _buffer(world, num_scaleout_ranks=world if rank == 0 else 1)
    D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E, num_max_tokens_per_rank=8)


def case_disagree_num_sms(rank, world):
    """Rank 0 pins DeepEP's kernels to 8 SMs, its peers leave the count to DeepEP."""
    import deepep_ops as D

    inp = _inputs(17, [4] * world, rank)
    buf = _buffer(world, num_sms=8 if rank == 0 else None)
    D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E, num_max_tokens_per_rank=8)


def case_disagree_channels(rank, world):
    """Hybrid mode everywhere, but rank 1 sizes its channels differently (DeepEP: another num_sms)."""
    import deepep_ops as D

    inp = _inputs(17, [4] * world, rank)
    buf = _buffer(world, num_scaleout_ranks=world, num_channels=3 if rank == 1 else 2)
    D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E, num_max_tokens_per_rank=8)


def case_direct_handle_on_hybrid_buffer_one_rank(rank, world):
    """Rank 0 combines on a hybrid buffer with a handle of a direct-mode buffer."""
    import deepep_ops as D

    inp = _inputs(18, [4] * world, rank)
    direct, hybrid = _buffer(world), _buffer(world, num_scaleout_ranks=world)
    kw = dict(num_experts=E, num_max_tokens_per_rank=4)
    r_direct = D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, direct, **kw)
    r_hybrid = D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, hybrid, **kw)
    r = r_direct if rank == 0 else r_hybrid
    D.combine(r.recv_x, r.handle, hybrid)


def case_bad_ids_one_rank(rank, world):
    import deepep_ops as D

    inp = _inputs(6, [4] * world, rank)
    idx = inp.topk_idx.clone()
    if rank == world - 1:
        idx[1, 0] = E + 3
    D.dispatch(inp.x, idx, inp.topk_weights, _buffer(world), num_experts=E, num_max_tokens_per_rank=8)


def case_default_bucket_T_differs(rank, world):
    """prepare(decode) with no bucket and T = 3, 9, ... per rank: the default bucket
    is the max over the EP group, so the result matches the dense MoE."""
    import deepep_ops as D

    Ts = [3 + 6 * r for r in range(world)]
    inp = _inputs(7, Ts, rank)
    buf = _buffer(world)
    pf = D.DeepEPPrepareFinalize(buf, E, K, decode=True)
    experts = ref.Experts(7, E, H, "matrix")
    p = pf.prepare(inp.x, inp.topk_weights, inp.topk_idx)
    xf = p.expert_x.float()
    fused = torch.zeros(xf.shape[0], K, H)
    for i, row in enumerate(p.topk_ids.tolist()):
        for k, e in enumerate(row):
            if e >= 0:
                fused[i, k] = experts(e, xf[i : i + 1])[0]
    out = torch.empty(Ts[rank], H, dtype=torch.bfloat16)
    pf.finalize(out, fused.bfloat16(), p.topk_weights, p.topk_ids, p.handle)
    return _max_rel_err(out.float(), inp, experts)


def case_finalize_rejects_one_rank(rank, world):
    """The last rank's experts return float32 rows (finalize needs bf16): that rank's
    finalize rejects them before combine, and its peers, already in combine, raise
    the same cause (check mode, the CPU default) instead of waiting for the timeout."""
    import deepep_ops as D

    inp = _inputs(21, [4] * world, rank)
    pf = D.DeepEPPrepareFinalize(_buffer(world), E, K, decode=True)
    p = pf.prepare(inp.x, inp.topk_weights, inp.topk_idx, num_max_tokens_per_rank=8)
    fused = p.expert_x.float().unsqueeze(1).expand(-1, K, -1)
    out = torch.empty(4, H, dtype=torch.bfloat16)
    pf.finalize(out, fused if rank == world - 1 else fused.bfloat16(), p.topk_weights, p.topk_ids, p.handle)


def case_T0_K1_odd_strides(rank, world):
    """T=0 on rank 0, K=1 weights from topk(...).values * 2.5 (strides (1, 0) at T=0)."""
    import deepep_ops as D

    Ts = [0] + [3] * (world - 1)
    g = torch.Generator().manual_seed(8)
    inp = ref.make_global_inputs(8, Ts, H, 1, E)[rank]
    logits = torch.rand(Ts[rank], E, generator=g)
    vals, ids = torch.topk(logits, 1)
    inp.topk_idx, inp.topk_weights = ids, vals * 2.5
    experts = ref.Experts(8, E, H, "matrix")
    out = _decode_moe(D, _buffer(world), inp, E, 4, experts)
    return (tuple(inp.topk_weights.stride()), _max_rel_err(out, inp, experts))


def case_mutate_topk_after_dispatch(rank, world):
    import deepep_ops as D

    inp = _inputs(9, [4] * world, rank)
    experts = ref.Experts(9, E, H, "matrix")
    idx = inp.topk_idx.clone()
    out = _decode_moe(D, _buffer(world), inp, E, 4, experts, topk_idx=idx, mutate=lambda: idx.fill_(-1))
    return _max_rel_err(out, inp, experts)


def case_mutate_topk_after_dispatch_inference(rank, world):
    """Inference tensors have no version counter: the handle keeps a copy, so combine is right."""
    import deepep_ops as D

    with torch.inference_mode():
        inp = _inputs(9, [4] * world, rank)
        experts = ref.Experts(9, E, H, "matrix")
        idx = inp.topk_idx.clone()
        out = _decode_moe(D, _buffer(world), inp, E, 4, experts, topk_idx=idx, mutate=lambda: idx.fill_(-1))
    return _max_rel_err(out, inp, experts)


def case_meta_inputs_one_rank(rank, world):
    import deepep_ops as D

    inp = _inputs(10, [4] * world, rank)
    dev = "meta" if rank == 0 else "cpu"
    D.dispatch(inp.x.to(dev), inp.topk_idx.to(dev), inp.topk_weights.to(dev), _buffer(world), num_experts=E,
               num_max_tokens_per_rank=4)


def _decode_handle(D, buf, world, rank, seed):
    inp = _inputs(seed, [4] * world, rank)
    return D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E, num_max_tokens_per_rank=4)


def case_relabelled_handle(rank, world):
    """A decode handle relabelled decode=False (prefill) on every rank."""
    import deepep_ops as D

    buf = _buffer(world)
    r = _decode_handle(D, buf, world, rank, 11)
    h = r.handle._replace(decode=False)
    D.combine(torch.zeros(h.num_expanded_tokens, H, dtype=torch.bfloat16), h, buf)


def case_relabelled_handle_one_rank(rank, world):
    import deepep_ops as D

    buf = _buffer(world)
    r = _decode_handle(D, buf, world, rank, 12)
    h = r.handle._replace(decode=False) if rank == 0 else r.handle
    D.combine(torch.zeros(h.num_expanded_tokens if rank == 0 else r.recv_x.shape[0], H, dtype=torch.bfloat16), h, buf)


def case_garbage_handle_one_rank(rank, world):
    import deepep_ops as D

    buf = _buffer(world)
    r = _decode_handle(D, buf, world, rank, 13)
    h = r.handle
    if rank == 0:
        h = h._replace(recv_src_metadata=torch.full_like(h.recv_src_metadata, 10**6))
    D.combine(torch.zeros(r.recv_x.shape, dtype=torch.bfloat16), h, buf)


def case_zero_handle_one_rank(rank, world):
    import deepep_ops as D

    buf = _buffer(world)
    r = _decode_handle(D, buf, world, rank, 14)
    h = r.handle
    if rank == world - 1:
        h = h._replace(psum_num_recv_tokens_per_scaleup_rank=torch.tensor([5, 2, 9][:world], dtype=torch.int32))
    D.combine(torch.zeros(r.recv_x.shape, dtype=torch.bfloat16), h, buf)


def case_prefill_ok_after_errors(rank, world):
    """Control after the failing cases: the group still works, prefill matches dense."""
    import deepep_ops as D

    Ts = [5 + r for r in range(world)]
    inp = _inputs(15, Ts, rank)
    experts = ref.Experts(15, E, H, "matrix")
    return _max_rel_err(_prefill_moe(D, _buffer(world), inp, E, experts), inp, experts)


def case_property(rank, world):
    """Random configs against the dense MoE: T per rank including 0, K=1 with odd
    strides, -1 slots, fp8, decode and prefill."""
    import deepep_ops as D

    rng = random.Random(1234)  # the same configs on every rank
    errs = []
    buf = _buffer(world)
    for trial in range(6):
        K_ = rng.choice([1, 2, 3])
        fp8 = rng.random() < 0.4
        Ts = [rng.choice([0, 1, 3, 7]) for _ in range(world)]
        inp = ref.make_global_inputs(100 + trial, Ts, H, K_, E, fp8=fp8, neg_frac=rng.choice([0.0, 0.3]))[rank]
        if K_ == 1:  # is_contiguous() with odd strides
            inp.topk_weights = inp.topk_weights.t().contiguous().t()
        experts = ref.Experts(100 + trial, E, H, "matrix")
        M = D.pow2_bucket(max(Ts), CAP)
        errs.append(_max_rel_err(_decode_moe(D, buf, inp, E, M, experts), inp, experts))
        errs.append(_max_rel_err(_prefill_moe(D, buf, inp, E, experts), inp, experts))
    return max(errs)


CASES = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}
# Errors first, the controls (which need a working group) last.
ORDER = [n for n in CASES if n not in ("prefill_ok_after_errors", "property")] + ["prefill_ok_after_errors", "property"]


def _run_cases(rank, world, names):
    """Spawned: every case timed; (outcome, type, message or value, seconds) per case."""
    import torch.distributed as dist

    out = {}
    for name in names:
        t0 = time.monotonic()
        try:
            value = CASES[name](rank, world)
            out[name] = ("ok", None, value, time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001 - the outcome is the data
            out[name] = ("error", type(e).__name__, str(e), time.monotonic() - t0)
        # Keep ranks in step between cases (and prove the group still works).
        dist.barrier()
    return out


_RESULTS = {}


def _results(world):
    if world not in _RESULTS:
        _RESULTS[world] = run_distributed(_run_cases, world, ORDER, gloo_timeout_s=GLOO_TIMEOUT_S)
    return _RESULTS[world]


#: case -> regex every rank's error must match.
EXPECT_ERROR = {
    "disagree_M": r"num_max_tokens_per_rank must be the same on every EP rank, got rank 0: 8, rank 1: 16",
    "disagree_H": r"x.shape\[1\] \(hidden\) must be the same on every EP rank, got rank 0: 256, rank 1: 512",
    "disagree_K": r"num_topk\) must be the same on every EP rank, got rank 0: 1, rank 1: 2",
    "disagree_dtype": r"x.dtype must be the same on every EP rank, got rank 0: 'torch.bfloat16', rank 1: 'torch.float8_e4m3fn'",
    "disagree_E": r"num_experts must be the same on every EP rank, got rank 0: 12, rank 1: 24",
    "disagree_domain": r"num_scaleout_ranks \(EP domain\) must be the same on every EP rank, got rank 0: 2, rank 1: 1",
    "disagree_num_sms": r"EPOpsBuffer num_sms \(None: DeepEP's choice\) must be the same on every EP rank, "
                        r"got rank 0: 8, rank 1: None",
    "disagree_channels": r"num_channels \(hybrid mode\) must be the same on every EP rank, got rank 0: 2, rank 1: 3",
    "direct_handle_on_hybrid_buffer_one_rank": r"handle.token_metadata_at_forward must be a tensor: the buffer is "
                                               r"in hybrid mode \(2 scale-out ranks\); is this a handle of a "
                                               r"direct-mode buffer\?|rank 0 of 2 rejected its input",
    "bad_ids_one_rank": r"topk_idx\[1, 0\] must be -1 or in \[0, num_experts=12\), got 15",
    "meta_inputs_one_rank": r"meta-device tensors outside tracing",
    "relabelled_handle": r"is this a dispatch \(decode\) handle\?",
    "relabelled_handle_one_rank": r"is this a dispatch \(decode\) handle\?|mode must be the same",
    "garbage_handle_one_rank": r"handle.recv_src_metadata\[:, 0\] \(source token ids\) must be in \[0, R\*M=8\)",
    "zero_handle_one_rank": r"handle.psum_num_recv_tokens_per_scaleup_rank must be a non-decreasing prefix sum",
    "mutate_topk_after_dispatch": r"handle.topk_idx must be unchanged between dispatch and combine .*"
                                  r"got version 1, dispatched at version 0",
    "finalize_rejects_one_rank": r"finalize: DeepEP combine needs bfloat16 expert outputs, got reduced expert "
                                 r"outputs of dtype torch.float32",
}


#: Cases that also run on 3 ranks (where a third rank changes what must happen).
THREE_RANK_ERRORS = ("bad_ids_one_rank", "disagree_M", "zero_handle_one_rank", "finalize_rejects_one_rank")


@pytest.mark.parametrize(
    "world,name", [(2, n) for n in sorted(EXPECT_ERROR)] + [(3, n) for n in THREE_RANK_ERRORS]
)
def test_every_rank_raises_the_cause(world, name):
    import re

    per_rank = _results(world)
    for r, res in enumerate(per_rank):
        outcome, typ, msg, secs = res[name]
        assert outcome == "error", f"rank {r}: no error, returned {msg!r}"
        pattern = EXPECT_ERROR[name]
        if world == 3:
            pattern = pattern.replace(", got rank 0: 8, rank 1: 16", ", got rank 0: 8, rank 1: 16, rank 2: 4")
            pattern = pattern.replace("R\\*M=8", "R\\*M=12")
        assert typ in ("ValueError", "TypeError") and re.search(pattern, msg), f"rank {r}: {typ}: {msg}"
        assert secs < LIMIT_S, f"rank {r}: {secs:.1f} s to fail"


@pytest.mark.parametrize("world", [2, 3])
def test_one_rank_rejection_names_the_rank(world):
    """The peers of the rank with bad ids say which rank rejected and why."""
    per_rank = _results(world)
    bad = world - 1
    for r, res in enumerate(per_rank):
        for case in ("bad_ids_one_rank", "finalize_rejects_one_rank"):
            msg = res[case][2]
            if r != bad:
                assert f"rank {bad} of {world} rejected its input" in msg, (case, msg)


_DENSE_CASES = ["default_bucket_T_differs", "T0_K1_odd_strides", "mutate_topk_after_dispatch_inference",
                "prefill_ok_after_errors", "property"]


@pytest.mark.parametrize(
    "world,name", [(2, n) for n in _DENSE_CASES] + [(3, "default_bucket_T_differs"), (3, "property")]
)
def test_matches_dense_reference(world, name):
    for r, res in enumerate(_results(world)):
        outcome, typ, value, secs = res[name]
        assert outcome == "ok", f"rank {r}: {typ}: {value}"
        if name == "T0_K1_odd_strides":
            strides, value = value
            if r == 0:
                assert strides == (1, 0)  # the odd layout really was exercised
        assert value < 0.03, f"rank {r}: relative error {value}"


# ----------------------------------------------------------------------------- one process
def _one_rank_buffer():
    import deepep_ops as D

    return D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K))


def _valid():
    return ref.make_global_inputs(20, [4], H, K, E)[0]


def test_unclear_errors_are_clear():
    import deepep_ops as D

    buf = _one_rank_buffer()
    inp = _valid()
    fp8 = ref.make_global_inputs(21, [4], H, K, E, fp8=True)[0]
    with pytest.raises(ValueError, match=r"x_scales.shape\[1\] \(scale columns\) must be >= 1, got 0"):
        D.dispatch(fp8.x, fp8.topk_idx, fp8.topk_weights, buf, num_experts=E, num_max_tokens_per_rank=4,
                   x_scales=fp8.x_scales[:, :0])
    with pytest.raises(TypeError, match=r"buffer must be a deepep_ops.EPOpsBuffer .*ReferenceElasticBuffer"):
        D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, buf.backend.buffer, num_experts=E,
                   num_max_tokens_per_rank=4)
    with pytest.raises(ValueError, match=r"tokens must be a tensor of >= 1 dimension"):
        D.token_bucket(torch.tensor(3), buf)
    with pytest.raises(TypeError, match=r"num_experts must be an int, not a bool, got True"):
        D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=True, num_max_tokens_per_rank=4)
    with pytest.raises(TypeError, match=r"expert_alignment must be an int, not a bool, got True"):
        D.dispatch(inp.x, inp.topk_idx, inp.topk_weights, buf, num_experts=E, num_max_tokens_per_rank=4,
                   expert_alignment=True)
    pf = D.DeepEPPrepareFinalize(buf, E, K, decode=True, use_fp8_dispatch=True)
    x200 = torch.randn(4, 192).bfloat16()
    with pytest.raises(ValueError, match=r"must be a multiple of 128 for block-fp8 dispatch, got 192"):
        pf.prepare(x200, inp.topk_weights, inp.topk_idx)
    pf = D.DeepEPPrepareFinalize(buf, E, K, decode=True)
    p = pf.prepare(inp.x, inp.topk_weights, inp.topk_idx)
    rows = p.expert_x.shape[0]
    with pytest.raises(ValueError, match=r"fused_expert_output must hold rows\*k"):
        pf.finalize(torch.empty(4, H, dtype=torch.bfloat16), torch.zeros(rows - 1, K, H, dtype=torch.bfloat16),
                    p.topk_weights, p.topk_ids, p.handle)


def test_eager_meta_inputs_raise_but_tracing_works():
    import deepep_ops as D

    buf = _one_rank_buffer()
    inp = _valid()
    with pytest.raises(ValueError, match="meta-device tensors outside tracing"):
        D.dispatch(inp.x.to("meta"), inp.topk_idx.to("meta"), inp.topk_weights.to("meta"), buf, num_experts=E,
                   num_max_tokens_per_rank=4)
    # Under fake tensors (what torch.compile traces with) the fake kernel answers.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(inp.x)
        r = D.dispatch(fx, mode.from_tensor(inp.topk_idx), mode.from_tensor(inp.topk_weights), buf,
                       num_experts=E, num_max_tokens_per_rank=4)
    assert tuple(r.recv_x.shape) == (4, H)
