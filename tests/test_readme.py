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
    """Exactly two set-up commands (install + demo; tests), and CI runs the test command as written."""
    demo, tests = _bash_blocks("Run the demo"), _bash_blocks("Run the tests")
    assert len(demo) == 1 and len(tests) == 1, (demo, tests)
    assert demo[0].endswith("python -m deepep_ops demo"), demo
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert tests[0] in ci.splitlines(), "README's test command is not a line of .ci/run"
    assert tests[0].endswith("python -m pytest -q tests"), tests
