"""docs/*.md work as pasted.

Every block a page marks runnable runs in a scratch directory (rules in
tests/doc_blocks.py); blocks that start vLLM engines are marked slow (the
exhaustive tier). Every bash block either runs or says why it cannot. The
offline data-parallel loop of docs/vllm_engine.md also runs here, fast, with a
stand-in ``python`` for the engines: a failing engine must make the loop fail
(and stop its peer), two good engines must let it pass.
"""

from __future__ import annotations

import os
import stat
import sys
import time

import pytest

from doc_blocks import REPO_ROOT, blocks, check_result, env_for_blocks, run_block, skip_reason

DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
ALL_BLOCKS = [b for page in DOCS for b in blocks(page)]
RUNNABLE = [b for b in ALL_BLOCKS if b.runnable]


def _param(b):
    return pytest.param(b, id=b.id, marks=[pytest.mark.slow] if "slow" in b.options else [])


def test_docs_mark_their_blocks():
    assert DOCS and RUNNABLE, "docs/ holds no runnable block"
    for b in ALL_BLOCKS:
        if b.lang == "bash":
            assert b.kind is not None, f"{b.id}: mark this bash block runnable or '<!-- not run: why -->'"
            # What a reader pastes must not hold placeholders or optional-argument brackets.
            for bad in ("[--", "<moe-model>", "/path/to/"):
                assert bad not in b.code, f"{b.id}: {bad!r} cannot be pasted:\n{b.code}"
        if b.lang == "python" and "import deepep_ops" in b.code and "print(" in b.code:
            assert b.runnable, f"{b.id}: a script-like python block is not marked runnable"


@pytest.mark.parametrize("block", [_param(b) for b in RUNNABLE])
def test_docs_block_runs(block, tmp_path):
    reason = skip_reason(block)
    if reason:
        pytest.skip(reason)
    timeout = 1500 if "slow" in block.options else 600
    check_result(block, run_block(block, tmp_path, timeout=timeout))


# ------------------------------------------------------- the offline DP loop's exit status

#: A ``python`` stand-in: the engine runner (``-m deepep_ops.tiny_model``) follows
#: FAKE_ENGINE_<rank> (``ok``, ``fail`` or ``hang``); writing the model succeeds at once;
#: anything else runs the real interpreter.
_FAKE_PYTHON = """#!/bin/sh
out=""; prev=""
for a in "$@"; do [ "$prev" = "--out" ] && out="$a"; prev="$a"; done
for a in "$@"; do
  case "$a" in
    tiny-model) exit 0 ;;
    deepep_ops.tiny_model)
      eval "mode=\\$FAKE_ENGINE_$VLLM_DP_RANK"
      case "$mode" in
        ok) echo '{"fake": true}' > "$out"; exit 0 ;;
        hang) exec sleep 300 ;;
        *) echo "engine rank $VLLM_DP_RANK failed" >&2; exit 3 ;;
      esac ;;
  esac
done
exec "{python}" "$@"
"""


def _offline_loops() -> list:
    page = REPO_ROOT / "docs" / "vllm_engine.md"
    loops = [b for b in blocks(page) if b.runnable and b.lang == "bash" and "deepep_ops.tiny_model" in b.code]
    assert len(loops) >= 2, "docs/vllm_engine.md: expected the offline loop for both layouts"
    return loops


@pytest.mark.parametrize("ranks,ok", [(("ok", "ok"), True), (("ok", "fail"), False), (("fail", "fail"), False),
                                      (("hang", "fail"), False)], ids=["both-ok", "rank1-fails", "both-fail",
                                                                        "rank1-fails-rank0-hangs"])
def test_offline_loop_fails_when_an_engine_fails(ranks, ok, tmp_path):
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text(_FAKE_PYTHON.replace("{python}", sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = env_for_blocks()
    env["PATH"] = os.pathsep.join((str(fake.parent), env["PATH"]))
    env.update({f"FAKE_ENGINE_{r}": mode for r, mode in enumerate(ranks)})
    for loop in _offline_loops():
        t0 = time.monotonic()
        proc = run_block(loop, tmp_path, timeout=120, env=env)
        assert (proc.returncode == 0) == ok, (loop.id, ranks, proc.returncode, proc.stdout, proc.stderr)
        # A failed rank stops its peer: the loop does not wait for the hanging one.
        assert time.monotonic() - t0 < 100, (loop.id, ranks)
