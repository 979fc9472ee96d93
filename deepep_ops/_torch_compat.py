"""The one module that touches version-specific torch APIs.

torch 2.14 renamed opaque objects to *custom classes*: ``torch._custom_class_base
.CustomClassBase`` and ``register_custom_class(typ="symbolic")`` replace
``torch._opaque_base.OpaqueBase`` and ``register_opaque_type(typ="reference")``,
which remain as shims that log a deprecation warning. torch 2.11–2.13 have only
the old names. Nothing else in deepep-ops imports either.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, TypeVar

import torch
from torch._C import _are_functorch_transforms_active, _is_torch_function_mode_enabled, _len_torch_dispatch_stack
from torch._C._autograd import _profiler_enabled
from torch._C._dynamo.eval_frame import set_eval_frame
from torch._library.opaque_object import MemberType, get_opaque_type_name

try:  # torch >= 2.14
    from torch._custom_class_base import CustomClassBase as OpaqueBase
    from torch._library.opaque_object import register_custom_class as _register

    _REFERENCE_KIND = "symbolic"
except ImportError:  # torch 2.11 - 2.13
    from torch._opaque_base import OpaqueBase
    from torch._library.opaque_object import register_opaque_type as _register

    _REFERENCE_KIND = "reference"

__all__ = [
    "OpaqueBase",
    "STABLE_CACHE_KEY_METHOD",
    "dispatcher_is_a_no_op",
    "install_stable_cache_keys",
    "opaque_type_name",
    "register_reference_type",
    "without_dynamo",
]

_F = TypeVar("_F", bound=Callable)


def register_reference_type(cls: type, trace_time_members: Iterable[str]) -> None:
    """Register ``cls`` (an :class:`OpaqueBase` subclass) as an opaque reference type.

    Objects of it become graph inputs under ``torch.compile``; the members named
    in ``trace_time_members`` are read off the real object while tracing and
    baked into the graph.
    """
    _register(cls, typ=_REFERENCE_KIND, members={m: MemberType.USE_REAL for m in trace_time_members})


def opaque_type_name(cls: type) -> str:
    """The name op schemas use for a registered opaque type."""
    return get_opaque_type_name(cls)


# ---------------------------------------------------------------------------
# Stable compile-cache keys for opaque reference objects.
#
# Inductor's FX-graph cache and the AOT-autograd cache key a graph by pickling
# its inputs and nodes (FxGraphCachePickler; AOTAutogradCachePickler subclasses
# it). A FakeScriptObject whose opaque type has members is pickled as its real
# object, after switching the pickler out of fast mode (torch 2.13: "opaque
# types may have cyclic references"). Measured on 2.13 with EPBuffer: the key
# then differs from process to process (memo references depend on object
# identity), so every new process misses; and a buffer holding a ProcessGroup
# cannot be pickled at all ("Failed to pickle cache key", a bypass). Objects
# whose class defines ``STABLE_CACHE_KEY_METHOD`` are keyed by that method's
# plain-data result instead, in fast mode. Nothing here runs for other types.
# ---------------------------------------------------------------------------

#: ``obj.<this>() -> tuple`` of plain data describing what a graph may bake in.
STABLE_CACHE_KEY_METHOD = "_deepep_ops_cache_key"


def _stable_cache_key_ident(*description: object) -> tuple:
    # Never called: cache keys are hashed, not loaded. Module-level so it pickles by name.
    return description


def install_stable_cache_keys() -> bool:
    """Make Inductor/AOT-autograd cache keys use ``STABLE_CACHE_KEY_METHOD`` where defined.

    Idempotent. Returns False (and changes nothing) on a torch whose cache
    pickler has no ``_reduce_fake_script_object`` hook.
    """
    try:
        from torch._inductor.codecache import FxGraphCachePickler
    except ImportError:  # pragma: no cover - torch without Inductor
        return False
    original = getattr(FxGraphCachePickler, "_reduce_fake_script_object", None)
    if original is None:
        return False
    if getattr(original, "_deepep_ops_stable", False):
        return True

    def _reduce_fake_script_object(self, t):  # type: ignore[no-untyped-def]
        key_fn = getattr(type(getattr(t, "real_obj", None)), STABLE_CACHE_KEY_METHOD, None)
        if key_fn is None:
            return original(self, t)
        return (_stable_cache_key_ident, (t.script_class_name,) + tuple(key_fn(t.real_obj)))

    _reduce_fake_script_object._deepep_ops_stable = True  # type: ignore[attr-defined]
    FxGraphCachePickler._reduce_fake_script_object = _reduce_fake_script_object
    return True
def without_dynamo(fn: _F) -> _F:
    """``fn`` run with Dynamo's frame hook off (what ``torch.library.register_kernel``
    does through ``torch._disable_dynamo``), for about 0.3 µs instead of ~9 µs.

    An op kernel that runs eagerly while Dynamo's hook is live (code after a
    graph break inside a compiled function) must not have its own frames traced.
    ``torch._disable_dynamo`` does this through four Python frames, a stance
    lookup and an export check per call; the kernels only need the hook off,
    which is ``set_eval_frame(None)`` around the call and the prior hook back
    after it (the core of ``torch._dynamo.eval_frame.DisableContext``, torch
    2.11-2.13).
    """

    @functools.wraps(fn)
    def kernel(*args, **kwargs):
        prior = set_eval_frame(None)
        try:
            return fn(*args, **kwargs)
        finally:
            set_eval_frame(prior)

    return kernel  # type: ignore[return-value]


def dispatcher_is_a_no_op(*tensors: torch.Tensor) -> bool:
    """Whether calling an op's ``CompositeExplicitAutograd`` kernel directly does what
    the dispatcher would do with these tensor arguments: plain eager execution.

    False while Dynamo traces (the call must be recorded as the op), under any
    torch-function or torch-dispatch mode (fake tensors, make_fx, export,
    DebugMode, FlopCounter), functorch transforms, the profiler (it should see
    the op), for tensor subclasses and meta tensors, and when autograd would
    record (an input needs grad): each of those is what the dispatcher is for. ~0.5 µs.
    """
    if (
        _is_compiling()
        or _is_torch_function_mode_enabled()
        or _len_torch_dispatch_stack()
        or _are_functorch_transforms_active()
        or _profiler_enabled()
    ):
        return False
    plain = torch.Tensor
    # Meta tensors go to the ops' Meta kernels (the fakes), which reject them
    # outside tracing after telling the peers (deepep_ops.agreement).
    if _is_grad_enabled():
        for t in tensors:
            if type(t) is not plain or t.requires_grad or t.is_meta:
                return False
        return True
    for t in tensors:
        if type(t) is not plain or t.is_meta:
            return False
    return True


_is_compiling = torch.compiler.is_compiling
_is_grad_enabled = torch.is_grad_enabled
