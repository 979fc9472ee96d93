"""The adapter's DeepEP warm-up through vLLM's JIT warm-up registry.

vLLM's GPU model runner activates a ``JitWarmupRegistry`` while it loads the
model (where prepare/finalize objects are built) and runs it in
``kernel_warmup`` when ``kernel_config.enable_jit_warmup`` is on. The adapter
registers its per-bucket warm-up there instead of running it in its
constructor. Here the registry is vLLM's own module: the installed one (0.32)
and 0.34's, loaded from the wheel's source (``$DEEPEP_OPS_VLLM034_SRC``),
injected through ``_compat``'s feature detection; the platform check that
keeps vLLM's CPU worker (which never runs the registry) on the constructor path
is switched for the test. What the warm-up drives is recorded by the
reference backend (tests/test_warmup.py's ``RecordingBackend``); the expected
buckets are written out by hand.
"""

from __future__ import annotations

import logging
import os
import types

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from test_warmup import RecordingBackend, _steps  # noqa: E402
from vllm034_standins import jit_warmup_034  # noqa: E402

import deepep_ops as D  # noqa: E402

H, K, E, CAP = 256, 2, 4, 8
DECODE = [("decode", m) for m in (1, 2, 4, 8)]


def _buffer():
    rec = RecordingBackend(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K))
    return rec, D.EPOpsBuffer(rec)


def _config(enable_jit_warmup=True, enable_elastic_ep=False):
    return types.SimpleNamespace(kernel_config=types.SimpleNamespace(enable_jit_warmup=enable_jit_warmup),
                                 parallel_config=types.SimpleNamespace(enable_elastic_ep=enable_elastic_ep))


@pytest.fixture(params=["installed", "0.34"])
def registry_module(request, monkeypatch):
    """vLLM's ``jit_warmup`` module, as ``_compat`` detects it, on a platform whose worker runs it."""
    import deepep_ops.vllm._compat as compat

    if request.param == "installed":
        if compat.jit_warmup is None:
            pytest.skip("the installed vLLM has no JIT warm-up registry")
        module = compat.jit_warmup
    else:
        if not os.environ.get("DEEPEP_OPS_VLLM034_SRC"):
            if os.environ.get("DEEPEP_OPS_REQUIRE_VLLM") == "1":
                pytest.fail("DEEPEP_OPS_VLLM034_SRC must point at vLLM 0.34's sources in CI (.ci/run sets it)")
            pytest.skip("DEEPEP_OPS_VLLM034_SRC (vLLM 0.34 sources, set by .ci/run) not set")
        module = jit_warmup_034(monkeypatch)
        monkeypatch.setattr(compat, "jit_warmup", module)
    monkeypatch.setattr(compat, "runner_runs_jit_warmup", lambda: True)
    monkeypatch.delenv("DEEPEP_OPS_WARMUP", raising=False)
    return module


@pytest.fixture
def vllm_log():
    """Records of the adapter's logger (a child of ``vllm``: what vLLM's log shows)."""
    records: list = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("vllm.deepep_ops.vllm.prepare_finalize")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old)


def _adapter(buf, *, decode=True, fp8=False, warmup=True):
    from deepep_ops.vllm import DeepEPV2PrepareAndFinalize

    return DeepEPV2PrepareAndFinalize(buf, 1, 1, 0, E, K, use_fp8_dispatch=fp8, use_cudagraph=decode,
                                      device="cpu", warmup=warmup)


def test_registered_then_run_by_the_registry(registry_module, vllm_log):
    rec, buf = _buffer()
    registry = registry_module.JitWarmupRegistry(_config())
    with registry.activate():
        _adapter(buf)
        _adapter(D.EPOpsBuffer(rec))  # another layer, another wrapper of the same buffer
        _adapter(buf, decode=False)
    assert rec.calls == [], "nothing runs while the model loads"
    assert len(registry) == 2  # one kernel for the buffer; two distinct specs (decode, prefill)
    registry.warmup()
    assert _steps(rec.calls) == DECODE + [("prefill", CAP)]
    messages = [r.getMessage() for r in vllm_log]
    assert any("DeepEP warm-up 4/4: decode bfloat16 M=8 (8 tokens)" in m for m in messages), messages
    assert any("DeepEP warm-up (4 steps" in m and "decode   bfloat16" in m and "total" in m for m in messages)
    # later layers on the warm buffer: nothing registered, nothing run
    rec.calls.clear()
    registry2 = registry_module.JitWarmupRegistry(_config())
    with registry2.activate():
        _adapter(buf)
    assert len(registry2) == 0
    registry2.warmup()
    assert rec.calls == []


def test_one_entry_per_underlying_buffer(registry_module):
    (rec1, buf1), (rec2, buf2) = _buffer(), _buffer()
    registry = registry_module.JitWarmupRegistry(_config())
    with registry.activate():
        _adapter(buf1)
        _adapter(buf2, fp8=True)
        _adapter(buf1)  # the same registration: deduplicated by vLLM's registry
    assert len(registry) == 2 and len(registry._registrations) == 2
    registry.warmup()
    assert _steps(rec1.calls) == DECODE
    assert _steps(rec2.calls) == DECODE * 2  # bf16, then block fp8


@pytest.mark.parametrize("enable_jit_warmup, warmup, registered", [(True, None, True), (False, True, False),
                                                                   (True, False, False)])
def test_honours_enable_jit_warmup_and_the_switch(registry_module, vllm_log, monkeypatch, enable_jit_warmup,
                                                  warmup, registered):
    """vLLM's ``enable_jit_warmup`` (off under ``enforce_eager``) and our switch
    (argument, then ``DEEPEP_OPS_WARMUP``) must both be on."""
    monkeypatch.setenv("DEEPEP_OPS_WARMUP", "1")
    rec, buf = _buffer()
    registry = registry_module.JitWarmupRegistry(_config(enable_jit_warmup=enable_jit_warmup))
    with registry.activate():
        _adapter(buf, warmup=warmup)
    assert rec.calls == [] and len(registry) == int(registered)
    registry.warmup()
    assert _steps(rec.calls) == (DECODE if registered else [])
    if not enable_jit_warmup:
        assert any("enable_jit_warmup is False" in r.getMessage() for r in vllm_log)


def test_constructor_path_without_a_registry_that_runs(registry_module, monkeypatch, vllm_log):
    """No active registry, vLLM's CPU worker (never runs it), or elastic EP (a
    joining engine runs it alone): the constructor warms up, as before."""
    import deepep_ops.vllm._compat as compat

    rec, buf = _buffer()
    _adapter(buf)  # no registry active
    assert _steps(rec.calls) == DECODE
    assert any("DeepEP warm-up 1/4: decode bfloat16 M=1" in r.getMessage() for r in vllm_log)

    rec, buf = _buffer()
    registry = registry_module.JitWarmupRegistry(_config(enable_elastic_ep=True))
    with registry.activate():
        _adapter(buf)
    assert _steps(rec.calls) == DECODE and len(registry) == 0

    monkeypatch.setattr(compat, "runner_runs_jit_warmup", lambda: False)
    rec, buf = _buffer()
    registry = registry_module.JitWarmupRegistry(_config())
    with registry.activate():
        _adapter(buf)
    assert _steps(rec.calls) == DECODE and len(registry) == 0


def test_cpu_worker_keeps_the_constructor_path():
    """On this (CPU) platform the real check says vLLM's worker never runs the registry."""
    import deepep_ops.vllm._compat as compat

    if compat.jit_warmup is None:
        pytest.skip("the installed vLLM has no JIT warm-up registry")
    assert compat.runner_runs_jit_warmup() is False
    with compat.jit_warmup.JitWarmupRegistry(_config()).activate():
        assert compat.jit_warmup_registry() is None
