"""File-based graph snapshots: ``assert_graph_snapshot(name, text)`` against ``graphs/<name>.txt``.

- ``EXPECTTEST_ACCEPT=1``: (re)write ``graphs/<name>.txt`` with ``text`` and pass.
- otherwise: fail with a unified diff when the text drifted, and fail (not
  pass, not skip) when the file does not exist.

Regenerate everything with::

    EXPECTTEST_ACCEPT=1 python -m pytest tests/test_graph_snapshots.py

How the snapshots in ``graphs/`` are captured (``tests/test_graph_snapshots.py``):
``torch.compile(fn, backend=torch._dynamo.testing.AotEagerAndRecordGraphs(),
fullgraph=True, dynamic=True)`` where ``fn`` is prepare → a deterministic expert
stand-in (dequantize if fp8, times 2, broadcast over the lane dim) → finalize of
:class:`deepep_ops.prepare_finalize.DeepEPPrepareFinalize`, on the reference
buffer at **world size 1** (``group=None``: R = 1, so decode receives M rows,
and the graphs look the same for any rank), E=8, K=2, H=256, capacity 1024,
first (and only) call at T=3 so the one graph is the dynamic one. Decode passes
the bucket M = ``pow2_bucket(T, capacity)`` from the host (a SymInt in the
graph). ``<case>.dynamo.txt`` is Dynamo's graph (``.graphs[0]``),
``<case>.aot_fw.txt`` the AOT forward graph (``.fw_graphs[0]``), both as
``normalize_gm(gm.print_readable(print_output=False))``, which drops every
comment line (the ``# File: /abs/path:line`` provenance), plus
:func:`sanitize`. Symbol names (``s77``) are stable across runs but depend on
the torch version: the snapshots are of torch ``SNAPSHOT_TORCH`` (CI leg (a)
installs it from ``.ci/constraints-torch-2.13.txt``); under any other torch the
comparison skips, saying so (``requires_snapshot_torch``).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import normalize_gm

REPO_ROOT = Path(__file__).resolve().parent.parent
GRAPHS_DIR = REPO_ROOT / "graphs"

#: The torch release graphs/*.txt were generated with (keep in step with .ci/constraints-torch-2.13.txt).
SNAPSHOT_TORCH = "2.13.0"
RUNNING_TORCH = torch.__version__.split("+")[0]
SNAPSHOT_SKIP_REASON = (
    f"graph snapshots are of torch {SNAPSHOT_TORCH}: symbol names (s77, u0) and op spellings depend on the "
    f"torch version, and this is torch {torch.__version__}"
)
#: Mark for tests whose assertions are snapshot comparisons.
requires_snapshot_torch = pytest.mark.skipif(RUNNING_TORCH != SNAPSHOT_TORCH, reason=SNAPSHOT_SKIP_REASON)


def accepting() -> bool:
    return os.environ.get("EXPECTTEST_ACCEPT", "") not in ("", "0")


def sanitize(text: str) -> str:
    """Remove what could still differ between machines: absolute paths, object addresses."""
    text = text.replace(str(REPO_ROOT) + os.sep, "")
    text = re.sub(r"0x[0-9a-fA-F]{6,}", "0x?", text)
    return text.rstrip("\n") + "\n"


def graph_text(gm: torch.fx.GraphModule) -> str:
    """A GraphModule as stable, path-free text."""
    return sanitize(normalize_gm(gm.print_readable(print_output=False)))


def assert_graph_snapshot(name: str, text: str) -> None:
    """Compare ``text`` with ``graphs/<name>.txt`` (rewrite it under ``EXPECTTEST_ACCEPT=1``)."""
    path = GRAPHS_DIR / f"{name}.txt"
    text = text.rstrip("\n") + "\n"
    if RUNNING_TORCH != SNAPSHOT_TORCH:
        pytest.skip(SNAPSHOT_SKIP_REASON)  # not even under EXPECTTEST_ACCEPT: the files are 2.13's
    if accepting():
        if not path.exists() or path.read_text() != text:
            GRAPHS_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return
    if not path.exists():
        raise AssertionError(
            f"graph snapshot {path.relative_to(REPO_ROOT)} does not exist; create it with "
            "EXPECTTEST_ACCEPT=1 python -m pytest tests/test_graph_snapshots.py"
        )
    expected = path.read_text()
    if expected != text:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=f"{path.relative_to(REPO_ROOT)} (snapshot)",
                tofile=f"{name} (this run)",
            )
        )
        raise AssertionError(
            f"graph {name} drifted from its snapshot (accept with EXPECTTEST_ACCEPT=1):\n{diff}"
        )
