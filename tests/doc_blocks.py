"""Code blocks of README.md and docs/*.md, and how the tests run them as pasted.

A block runs when the line before its fence is an HTML comment starting
``<!-- runnable``; words in parentheses after it say what it needs::

    <!-- runnable: what the reader may expect -->                  python or bash
    <!-- runnable (needs vllm): ... -->                            skipped without vLLM
    <!-- runnable (slow, needs vllm): ... -->                      the exhaustive tier only

A ``python`` block runs in a fresh interpreter and must exit 0 with a last line
starting with "ok". A ``bash`` block runs with ``bash -e -o pipefail`` (every
command must succeed, as a reader pasting it expects) in a scratch directory,
with this interpreter's ``python`` first on ``PATH``. A bash block that cannot
run here says why instead: ``<!-- not run: why -->``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent

_FENCE = re.compile(
    r"^(?:<!-- (?P<kind>runnable|not run)(?:\s*\((?P<opts>[^)]*)\))?[^\n]*-->\n)?"
    r"```(?P<lang>\w+)\n(?P<code>.*?)^```",
    re.S | re.M,
)
KNOWN_OPTIONS = {"slow", "needs vllm"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    code: str
    kind: Optional[str]  # "runnable", "not run" or None (no marker)
    options: frozenset

    @property
    def runnable(self) -> bool:
        return self.kind == "runnable"

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path`` at the start of a line (indented fences are not blocks)."""
    text = path.read_text()
    out = []
    for m in _FENCE.finditer(text):
        opts = frozenset(o.strip() for o in (m["opts"] or "").split(",") if o.strip())
        unknown = opts - KNOWN_OPTIONS
        if unknown:
            raise ValueError(f"{path}: unknown runnable option(s) {sorted(unknown)}; known: {sorted(KNOWN_OPTIONS)}")
        line = text.count("\n", 0, m.start("lang")) + 1  # the fence's line
        out.append(Block(path, line, m["lang"], m["code"], m["kind"], opts))
    return out


def has_vllm() -> bool:
    """vLLM installed (not imported here: tests/conftest.py reports a broken install where CI needs it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def env_for_blocks() -> dict:
    """This tree importable, this interpreter's ``python`` first on PATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return env


def run_block(block: Block, workdir: Path, *, timeout: float, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run ``block`` as pasted, in ``workdir``; the finished process (never raises on a failure)."""
    env = env_for_blocks() if env is None else env
    if block.lang == "python":
        script = workdir / f"block_{block.line}.py"
        script.write_text(block.code)
        cmd = [sys.executable, str(script)]
    elif block.lang == "bash":
        script = workdir / f"block_{block.line}.sh"
        script.write_text(block.code)
        cmd = ["bash", "-e", "-o", "pipefail", str(script)]
    else:
        raise ValueError(f"{block.id}: cannot run a {block.lang!r} block")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=workdir, env=env,
                          start_new_session=True)


def check_result(block: Block, proc: subprocess.CompletedProcess) -> None:
    """A python block: exit 0, last line "ok..."; a bash block: exit 0."""
    assert proc.returncode == 0, f"{block.id} failed (exit {proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    if block.lang == "python":
        lines = proc.stdout.strip().splitlines()
        assert lines and lines[-1].startswith("ok"), f"{block.id}: last line is not 'ok...':\n{proc.stdout[-3000:]}"


def skip_reason(block: Block) -> Optional[str]:
    if "needs vllm" in block.options and not has_vllm():
        return "needs vLLM (not importable here)"
    return None
