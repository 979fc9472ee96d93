"""The vLLM integration says when it is on, and when it is half on.

- On: the first adapter a process builds logs one INFO line through vLLM's
  logger (a child of ``vllm``, so it shows in vLLM's output): backend, buffer,
  layout; later adapters log nothing.
- Half on: without ``DEEPEP_OPS_VLLM=1``, where vLLM has no DeepEP v2
  prepare/finalize (CPU), the plugin gives the missing name a stand-in whose
  error names the switch, instead of vLLM's ``NameError``; the engine hooks
  replace it when installed and put it back when uninstalled.
- A whole engine (slow): two DP ranks with ``--all2all-backend deepep_v2`` and
  the switch unset fail with that message.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
E, K, H, CAP = 4, 2, 256, 32


@pytest.fixture
def engine():
    import vllm.model_executor.layers.fused_moe.all2all_utils as a2a

    from deepep_ops.vllm import engine

    was_installed = engine.installed()
    had = a2a.__dict__.get("DeepEPV2PrepareAndFinalize", None)
    yield engine
    if engine.installed() and not was_installed:
        engine.uninstall()
    if had is None:
        a2a.__dict__.pop("DeepEPV2PrepareAndFinalize", None)
    else:
        a2a.DeepEPV2PrepareAndFinalize = had


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records(engine):
    handler = _Records()
    log = logging.getLogger(engine.LOGGER_NAME)
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    announced = engine._state["announced"]
    engine._state["announced"] = False
    yield handler.records
    log.removeHandler(handler)
    log.setLevel(old_level)
    engine._state["announced"] = announced


def test_logger_is_a_child_of_vllms(engine):
    # vLLM's logging config gives the "vllm" logger its handler: our lines show with vLLM's.
    assert engine.LOGGER_NAME.split(".")[0] == "vllm"


@pytest.mark.parametrize("decode", [False, True])
def test_one_info_line_per_process(engine, records, decode):
    import deepep_ops

    def build():
        buf = deepep_ops.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K)
        return engine.EngineDeepEPV2PrepareAndFinalize(
            buf, num_dispatchers=1, dp_size=1, rank_expert_offset=0, num_experts=E, num_topk=K,
            use_cudagraph=decode, expert_ids="local_int32",
        )

    build()
    build()  # a second MoE layer: no second line
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert len(infos) == 1, infos
    line = infos[0]
    assert "\n" not in line
    for part in ("--all2all-backend deepep_v2 runs through deepep-ops", "backend ReferenceElasticBuffer",
                 f"capacity {CAP} tokens per rank", f"hidden {H}", f"top-{K}", "bf16 dispatch",
                 "layout decode" if decode else "layout prefill", "local int32 ids"):
        assert part in line, (part, line)


def test_half_on_error_names_the_switch(engine, monkeypatch):
    import vllm.model_executor.layers.fused_moe.all2all_utils as a2a
    from vllm.platforms import current_platform

    from deepep_ops.vllm import plugin

    if current_platform.is_cuda_alike() and "DeepEPV2PrepareAndFinalize" in a2a.__dict__:
        pytest.skip("this vLLM has its own DeepEP v2 prepare/finalize: nothing is half on")
    engine.uninstall()
    a2a.__dict__.pop("DeepEPV2PrepareAndFinalize", None)
    monkeypatch.delenv("DEEPEP_OPS_VLLM", raising=False)
    plugin.register()
    assert not engine.installed()
    stand_in = a2a.DeepEPV2PrepareAndFinalize
    assert stand_in is engine.DeepEPV2Unavailable
    # vLLM's first use of the name, for a deepep_v2 layer (FusedMoE.__init__), and its constructor.
    for call in (lambda: stand_in.maybe_roundup_layer_hidden_size(H, torch.bfloat16), lambda: stand_in(None)):
        with pytest.raises(RuntimeError, match="set DEEPEP_OPS_VLLM=1"):
            call()
    plugin.register()  # idempotent
    assert a2a.DeepEPV2PrepareAndFinalize is stand_in
    # Opting in replaces the stand-in with the adapter; uninstalling puts the stand-in back.
    monkeypatch.setenv("DEEPEP_OPS_VLLM", "1")
    plugin.register()
    assert a2a.DeepEPV2PrepareAndFinalize is engine.EngineDeepEPV2PrepareAndFinalize
    engine.uninstall()
    assert a2a.DeepEPV2PrepareAndFinalize is stand_in


def test_pass_name_resolves_after_import_deepep_ops_vllm():
    """vLLM resolves a configured pass name as ``__import__("deepep_ops").__dict__[name]``: a fresh
    process that imports ``deepep_ops.vllm`` (and runs no plugin loader) can configure it by name."""
    code = """
import sys
import vllm.plugins
from vllm.config import CompilationConfig
import deepep_ops.vllm
from deepep_ops.vllm.passes import combine_into_pass
assert not vllm.plugins.plugins_loaded
c = CompilationConfig(inductor_passes={"post_grad_custom_post_pass": "deepep_ops.vllm_combine_into_pass"})
assert deepep_ops.vllm_combine_into_pass is combine_into_pass
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


@pytest.mark.slow
def test_engine_without_the_switch_fails_naming_it(tmp_path):
    """Two DP ranks, expert parallel, --all2all-backend deepep_v2 on CPU, DEEPEP_OPS_VLLM unset:
    both ranks exit non-zero and their logs name the switch (not NameError)."""
    from deepep_ops.tiny_model import dp_env, write_tiny_mixtral

    write_tiny_mixtral(tmp_path / "model")
    procs = []
    for r in range(2):
        env = {k: v for k, v in os.environ.items() if k != "DEEPEP_OPS_VLLM"}
        env.update(dp_env(r, 2, 29571, "0|1"), VLLM_CPU_KVCACHE_SPACE="1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p))
        log = open(tmp_path / f"rank{r}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "deepep_ops.tiny_model", "--model", str(tmp_path / "model"),
             "--out", str(tmp_path / f"rank{r}.json"), "--ep", "--eager"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert all(c != 0 for c in codes), codes
    for log in logs:
        assert "set DEEPEP_OPS_VLLM=1" in log, log[-3000:]
        assert "NameError" not in log, log[-3000:]
