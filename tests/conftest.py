"""Shared pytest setup.

- Makes the repository importable (here and in spawned ranks).
- vLLM required or optional: the ``tests/test_vllm_*.py`` files skip without
  vLLM (``pytest.importorskip``). Where vLLM is supposed to be installed that
  would hide a broken install behind seven quiet skips, so with
  ``DEEPEP_OPS_REQUIRE_VLLM=1`` (``.ci/run`` leg a), or ``CI=true`` unless
  ``DEEPEP_OPS_REQUIRE_VLLM=0`` says otherwise (leg b runs without vLLM), a
  failing ``import vllm`` stops the session with its traceback.
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


def vllm_required() -> bool:
    flag = os.environ.get("DEEPEP_OPS_REQUIRE_VLLM")
    if flag is not None and flag != "":
        return flag not in ("0", "false", "False", "no")
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_configure(config):
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
