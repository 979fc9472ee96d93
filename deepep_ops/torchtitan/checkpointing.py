"""Selective activation checkpointing that keeps the ``deepep_ops::`` communication outputs.

torchtitan's ``SelectiveAC`` saves the outputs of the ops in its save list
(``_get_default_save_ops``: matmuls, attention, ``all_to_all_single``,
``deepep::dispatch/combine``, ...) and recomputes everything else in the
backward. Our ops are not in that list, so the backward would re-run every
MoE layer's dispatch and combine: a second round of communication per layer.
:func:`save_ops` adds them; :class:`DeepEPOpsSelectiveAC` is ``SelectiveAC``
with that list (installed by ``deepep_ops.torchtitan.overrides.selective_ac``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import deepep_ops  # noqa: F401  (registers the ops)
from deepep_ops.schemas import NAMESPACE
from deepep_ops.torchtitan._compat import SelectiveAC, default_save_ops

#: The ops whose outputs must be saved: each communicates (or, ``token_bucket``,
#: exchanges token counts across ranks), so recomputing it costs a collective.
#: ``combine_with_weights`` runs only in backward, ``combine_into`` (vLLM's
#: in-place combine) not in training.
COMMUNICATION_OPS = ("dispatch", "dispatch_exact", "combine", "cached_dispatch", "token_bucket")


def communication_ops() -> set:
    """The ``OpOverload``s of :data:`COMMUNICATION_OPS` (``torch.ops.deepep_ops.<name>.default``)."""
    namespace = getattr(torch.ops, NAMESPACE)
    return {getattr(namespace, name).default for name in COMMUNICATION_OPS}


def save_ops() -> set:
    """torchtitan's default selective-AC save list plus :func:`communication_ops`."""
    return default_save_ops() | communication_ops()


class DeepEPOpsSelectiveAC(SelectiveAC):
    """torchtitan's ``SelectiveAC`` that also saves the ``deepep_ops::`` communication outputs."""

    @dataclass(kw_only=True, slots=True)
    class Config(SelectiveAC.Config):
        pass

    def get_save_ops(self) -> set:
        return save_ops()
