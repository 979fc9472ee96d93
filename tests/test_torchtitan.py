"""deepep-ops as torchtitan's expert-parallel token dispatcher (issue 30).

Skips without torchtitan, and under a torch that torchtitan 0.3 does not run
on (it calls ``torch.distributed.set_timeout``, new in 2.14): CI leg b
(torch 2.15) runs it, leg a (torch 2.13 + vLLM) skips it. With
``DEEPEP_OPS_REQUIRE_TORCHTITAN=1`` a missing torchtitan or too old a torch is
an error instead of a skip.

- In the spawned ranks (tests/torchtitan_moe.py, one spawn for all scenarios;
  torchtitan is never imported in the pytest process): the override
  factories' and the config's checks (rank 0), then on 2 gloo ranks:
  torchtitan's own MoE trained 3 SGD steps with uneven tokens per rank,
  ours vs torchtitan's all-to-all vs EP=1 (outputs, input and every parameter
  gradient within bf16 tolerance), also with expert_alignment=8 and steps
  where a rank has no token; ours again through torchtitan's own
  ``MoE.parallelize`` (spmd_types, its default backend), eager and compiled,
  bitwise equal to the hand-wired run; compiled as torchtitan compiles blocks
  (``fullgraph=True``): aot_eager one frame, no break, bitwise equal to eager;
  torchtitan's SelectiveAC with its save list and with ours: calls of the
  reference buffer per step (ours: no dispatch recomputed in backward), eager
  and compiled; the command lines of docs/torchtitan.md parsed by torchtitan's
  ConfigManager, overridden as the Trainer does and built on the meta device.
- ``-m slow``: Inductor, and token counts that change between steps.
"""

from __future__ import annotations

import os

import pytest
import torch

#: Where torchtitan is supposed to be installed (CI leg b) a broken install must
#: fail the run rather than skip this file quietly.
REQUIRED = os.environ.get("DEEPEP_OPS_REQUIRE_TORCHTITAN", "") not in ("", "0", "false", "False", "no")
if REQUIRED:
    import torchtitan  # noqa: F401
else:
    pytest.importorskip("torchtitan", reason="torchtitan is not installed (pip install 'deepep-ops[torchtitan]'; CI leg b)")
if not hasattr(torch.distributed, "set_timeout"):
    reason = f"torchtitan 0.3 needs torch >= 2.14 (it calls torch.distributed.set_timeout); this is {torch.__version__}"
    if REQUIRED:
        raise RuntimeError(f"DEEPEP_OPS_REQUIRE_TORCHTITAN is set, but {reason}")
    pytest.skip(reason, allow_module_level=True)

import torchtitan_moe as tm  # noqa: E402
from _dist import run_distributed, run_scenarios  # noqa: E402

# torchtitan is imported in the spawned ranks only, never here: importing its
# modules patches torch (torchtitan.distributed.compile replaces
# FakeTensorMode.__init__), which the rest of the suite must not run under.


# ------------------------------------------------------------------------------ 2 gloo ranks
DEFAULT = tuple(n for n in tm.SCENARIOS if n not in tm.SLOW_SCENARIOS)
_RUNS: dict = {}


def _scenario(name: str, names: tuple, timeout: float) -> None:
    """Run ``names`` once (one spawn, cached) and fail with ``name``'s tracebacks."""
    if names not in _RUNS:
        try:
            # Compile scenarios: one rank may still compile while the other waits.
            _RUNS[names] = run_distributed(run_scenarios, 2, "torchtitan_moe", names, timeout=timeout,
                                           gloo_timeout_s=timeout / 2)
        except Exception as e:  # noqa: BLE001 - the whole spawn failed: every scenario reports it
            _RUNS[names] = [{n: str(e) for n in names}] * 2
    failures = [f"--- rank {r} ---\n{res[name]}" for r, res in enumerate(_RUNS[names]) if res[name] is not None]
    if failures:
        raise AssertionError(f"scenario {name!r} failed:\n" + "\n".join(failures))


@pytest.mark.parametrize("name", DEFAULT)
def test_torchtitan_moe(name):
    _scenario(name, DEFAULT, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("name", tm.SLOW_SCENARIOS)
def test_torchtitan_moe_slow(name):
    _scenario(name, tm.SLOW_SCENARIOS, timeout=1800)


def test_torchtitan_modules_stay_out_of_this_process():
    """The scenarios import torchtitan in the ranks; this process (the rest of the suite) never."""
    import sys

    assert not [m for m in sys.modules if m.startswith("torchtitan.")], "a torchtitan module was imported here"
