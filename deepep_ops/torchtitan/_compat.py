"""Every torchtitan internal that deepep-ops uses, imported in one place.

Targets torchtitan 0.3.0 (which needs torch >= 2.14). A new torchtitan version
should touch this file only.
"""

from __future__ import annotations

from torchtitan.config import derive, override
from torchtitan.distributed.activation_checkpoint import SelectiveAC, _get_default_save_ops
from torchtitan.models.common.token_dispatcher import BaseEPTokenDispatcher, LocalTokenDispatcher

__all__ = [
    "BaseEPTokenDispatcher",
    "LocalTokenDispatcher",
    "SelectiveAC",
    "default_save_ops",
    "derive",
    "override",
]


def default_save_ops() -> set:
    """torchtitan's own selective-AC save list (compute + communication ops)."""
    return set(_get_default_save_ops())
