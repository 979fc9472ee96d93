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
    """Exactly two set-up commands (install + demo; tests), and CI runs the test command as written."""
    demo, tests = _bash_blocks("Run the demo"), _bash_blocks("Run the tests")
    assert len(demo) == 1 and len(tests) == 1, (demo, tests)
    assert demo[0].endswith("python -m deepep_ops demo"), demo
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert tests[0] in ci.splitlines(), "README's test command is not a line of .ci/run"
    assert tests[0].endswith("python -m pytest -q tests"), tests
