"""The ``vllm.general_plugins`` entry point: vLLM's loader calls deepep_ops.vllm.plugin.register."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("vllm")


def test_entry_point_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("deepep_ops") == "deepep_ops.vllm.plugin:register", eps


def test_load_general_plugins_registers():
    # Fresh interpreter: vLLM loads plugins once per process.
    code = """
import sys
import vllm.plugins
assert "deepep_ops" not in sys.modules
vllm.plugins.load_general_plugins()
import deepep_ops, torch
from deepep_ops.vllm.passes import combine_into_pass
assert deepep_ops.vllm_combine_into_pass is combine_into_pass
assert hasattr(torch.ops.deepep_ops, "combine_into")
import deepep_ops.vllm.plugin as plugin
plugin.register()  # idempotent
assert deepep_ops.vllm_combine_into_pass is combine_into_pass
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=None)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
