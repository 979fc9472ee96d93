"""The one module that touches version-specific torch APIs.

torch 2.14 renamed opaque objects to *custom classes*: ``torch._custom_class_base
.CustomClassBase`` and ``register_custom_class(typ="symbolic")`` replace
``torch._opaque_base.OpaqueBase`` and ``register_opaque_type(typ="reference")``,
which remain as shims that log a deprecation warning. torch 2.11–2.13 have only
the old names. Nothing else in deepep-ops imports either.
"""

from __future__ import annotations

from typing import Iterable

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
    "install_stable_cache_keys",
    "opaque_type_name",
    "register_reference_type",
]


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
