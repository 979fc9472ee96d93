"""vLLM 0.34 pieces the installed vLLM (0.32) lacks, for CPU tests of the adapter's 0.34 behaviour.

Where ``$DEEPEP_OPS_VLLM034_SRC`` (vLLM 0.34's extracted sources, set by
``.ci/run``) is available, each stand-in *is* 0.34's code, executed from the
wheel's source file; otherwise a copy of it written out here (the same lines;
tests/test_vllm_wheel_interface.py checks the parts our code relies on against
the wheel).
"""

from __future__ import annotations

import ast
import enum
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Optional

MK = "vllm/model_executor/layers/fused_moe/modular_kernel.py"
JIT = "vllm/model_executor/warmup/jit_warmup.py"


def src_034() -> Optional[Path]:
    src = os.environ.get("DEEPEP_OPS_VLLM034_SRC")
    return Path(src) if src else None


class _FusedMoEActivationFormat034(enum.Enum):
    """vLLM 0.34's ``modular_kernel.FusedMoEActivationFormat`` (copy)."""

    Standard = ("standard",)
    BatchedExperts = ("batched_experts",)
    PaddedStandard = ("padded_standard",)

    def is_superset(self, pf_format: "_FusedMoEActivationFormat034") -> bool:
        if self == pf_format:
            return True
        return (
            self == _FusedMoEActivationFormat034.PaddedStandard
            and pf_format == _FusedMoEActivationFormat034.Standard
        )

    @property
    def is_batched(self) -> bool:
        return self == _FusedMoEActivationFormat034.BatchedExperts


def activation_format_enum() -> type:
    """vLLM 0.34's ``FusedMoEActivationFormat`` (from the wheel's source where available)."""
    src = src_034()
    if src is None:
        return _FusedMoEActivationFormat034
    tree = ast.parse((src / MK).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FusedMoEActivationFormat")
    namespace: dict = {"Enum": enum.Enum}
    exec(compile(ast.Module(body=[cls], type_ignores=[]), str(src / MK), "exec"), namespace)
    return namespace["FusedMoEActivationFormat"]


def jit_warmup_034(monkeypatch) -> types.ModuleType:
    """vLLM 0.34's ``model_executor/warmup/jit_warmup.py``, loaded from the wheel's
    source (needs ``$DEEPEP_OPS_VLLM034_SRC``) under its own module name.

    Its ``JitWarmupRegistry.warmup`` imports ``jit_warmup_triton_helper`` for
    ``VllmTritonJitKernel`` (kernels compiled in parallel) and
    ``compile_triton_warmup``; those are stubbed for the duration of the test
    (the installed 0.32 has no ``compile_triton_warmup``; no Triton kernel is
    registered here).
    """
    src = src_034()
    assert src is not None
    name = "vllm034_jit_warmup"
    spec = importlib.util.spec_from_file_location(name, src / JIT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    helper = types.ModuleType("vllm.model_executor.warmup.jit_warmup_triton_helper")

    class VllmTritonJitKernel(module.VllmJitKernel):  # type: ignore[misc, valid-type]
        supports_parallel_compile = True

    def compile_triton_warmup(compile_all, num_keys):
        raise AssertionError("no Triton warm-up is registered in these tests")

    helper.VllmTritonJitKernel = VllmTritonJitKernel
    helper.compile_triton_warmup = compile_triton_warmup
    monkeypatch.setitem(sys.modules, helper.__name__, helper)
    return module
