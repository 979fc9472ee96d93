"""Shared pytest setup.

- Makes the repository importable (here and in spawned ranks).
- vLLM required or optional: the ``tests/test_vllm_*.py`` files skip without
  vLLM (``pytest.importorskip``). Where vLLM is supposed to be installed that
  would hide a broken install behind seven quiet skips, so with
  ``DEEPEP_OPS_REQUIRE_VLLM=1`` (``.ci/run`` leg a), or ``CI=true`` unless
  ``DEEPEP_OPS_REQUIRE_VLLM=0`` says otherwise (leg b runs without vLLM), a
  failing ``import vllm`` stops the session with its traceback.
- Test tiers (``tests/tiers.py``): ``--exhaustive`` (or ``DEEPEP_OPS_EXHAUSTIVE=1``)
  runs every T of every sweep and the tests marked ``slow``; without it the
  sweeps are sampled and ``slow`` tests are skipped, naming the option.
- ``TORCHINDUCTOR_COMPILE_THREADS=1`` unless set: Inductor then compiles in the
  compiling process instead of starting a pool of compile workers in every
  process that compiles (each worker imports torch: CPU a 2-core machine does
  not have to spare; the generated code is the same).
- The fork server that ``tests/_dist.py`` forks ranks from stops at the end of
  the session, so its CPU time is accounted to pytest (``time``).
- ``--cpu-report`` (``tests/cpu_report.py``): wall and CPU seconds per file.
- Once collected, modules with a ``start_early()`` queue their expensive spawns
  in the background (``tests/_dist.py``), unless ``DEEPEP_OPS_TEST_EARLY=0``.
"""

import os
import sys
import traceback

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
for _p in (REPO_ROOT, TESTS_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)

pytest_plugins = ["cpu_report"]


def vllm_required() -> bool:
    flag = os.environ.get("DEEPEP_OPS_REQUIRE_VLLM")
    if flag is not None and flag != "":
        return flag not in ("0", "false", "False", "no")
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_addoption(parser):
    parser.addoption(
        "--exhaustive", action="store_true", default=False,
        help="exhaustive tier: every T of every sweep and the tests marked slow (default: sampled T, slow skipped)",
    )


def pytest_configure(config):
    import tiers

    if config.getoption("exhaustive"):
        # Before any test module is imported (parametrisations read it), and
        # inherited by spawned ranks and subprocesses.
        os.environ[tiers.EXHAUSTIVE_ENV] = "1"
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    try:  # a bad DEEPEP_OPS_EXHAUSTIVE / DEEPEP_OPS_SAMPLE_SEED stops the run here
        tiers.exhaustive()
        tiers.sample_seed()
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    _require_vllm()


def pytest_collection_finish(session):
    """Queue the expensive spawns of the collected modules that define ``start_early()``
    (tests/_dist.py, ``start_early``), in collection order; ``DEEPEP_OPS_TEST_EARLY=0`` turns it off."""
    if (session.config.option.collectonly or os.environ.get("DEEPEP_OPS_TEST_EARLY", "1") == "0"
            or session.config.getoption("cpu_report")):  # per-file CPU needs each spawn inside its own file
        return
    modules = []
    for item in session.items:
        module = getattr(item, "module", None)
        if module is None or module in modules or item.get_closest_marker("skip") is not None:
            continue
        modules.append(module)
    for module in modules:
        if hasattr(module, "start_early"):
            module.start_early()


def pytest_unconfigure(config):
    if "_dist" in sys.modules:
        sys.modules["_dist"].stop_background()
        sys.modules["_dist"].stop_fork_server()


def pytest_report_header(config):
    import tiers

    return tiers.describe()


def pytest_collection_modifyitems(config, items):
    import tiers

    if tiers.exhaustive():
        return
    skip = pytest.mark.skip(reason="exhaustive tier only: run with --exhaustive")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


def _require_vllm():
    if not vllm_required():
        return
    try:
        import vllm  # noqa: F401  (what the tests' importorskip("vllm") imports)
        import vllm.model_executor.layers.fused_moe  # noqa: F401  (where a CUDA torchvision breaks)
    except BaseException:  # noqa: BLE001
        raise pytest.UsageError(
            "vLLM is required here (DEEPEP_OPS_REQUIRE_VLLM=1, or CI=true without DEEPEP_OPS_REQUIRE_VLLM=0), "
            "but importing it failed, which would silently skip every tests/test_vllm_*.py:\n"
            + traceback.format_exc()
        ) from None
