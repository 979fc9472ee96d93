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

__all__ = ["OpaqueBase", "register_reference_type", "opaque_type_name"]


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
