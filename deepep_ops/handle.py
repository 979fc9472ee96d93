"""The dispatch handle codec, and what ``dispatch`` returns: written once.

A handle travels through graphs as plain values (the routing ``topk_idx``, five
int32 tensors, five static ints): no Python object per call, nothing mutable,
so it flows through Dynamo and AOT graphs like any other value.
:class:`DispatchHandle` is the one definition. Its field order is the order in
every schema (:func:`schema_args`, :func:`schema_returns`), in the op wrappers
(``tuple(handle)`` / ``DispatchHandle(*values)``), and :data:`HANDLE_TENSOR_SPECS`
gives every tensor's shape for validation and the fake kernels. Backends
receive a :class:`DispatchHandle` and build their own handle object from it.

Shape letters are those of the glossary in :mod:`deepep_ops.layout`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from deepep_ops.layout import IntLike, recv_src_metadata_cols


class DispatchHandle(NamedTuple):
    """DeepEP's ``EPHandle`` as graph values (spec §3, direct mode).

    Tensors are int32 on the tokens' device except ``topk_idx``:

    - ``topk_idx`` [T, K] topk_idx_t: the dispatched routing.
    - ``psum_num_recv_tokens_per_scaleup_rank`` [R]: inclusive prefix sum of
      received tokens per source rank; ``[-1]`` is the real N.
    - ``psum_num_recv_tokens_per_expert`` [EL].
    - ``num_unaligned_recv_tokens_per_expert`` [EL].
    - ``recv_src_metadata`` [N, K+2] (N = R·M in decode mode).
    - ``dst_buffer_slot_idx`` [T, K].

    Static ints: E, M, A, the mode (``do_expand``: prefill) and X.
    """

    topk_idx: torch.Tensor
    psum_num_recv_tokens_per_scaleup_rank: torch.Tensor
    psum_num_recv_tokens_per_expert: torch.Tensor
    num_unaligned_recv_tokens_per_expert: torch.Tensor
    recv_src_metadata: torch.Tensor
    dst_buffer_slot_idx: torch.Tensor
    num_experts: int
    num_max_tokens_per_rank: IntLike
    expert_alignment: int
    do_expand: bool
    num_expanded_tokens: IntLike

    @property
    def tensors(self) -> tuple:
        """The five int32 tensors, in :data:`HANDLE_TENSORS` order."""
        return tuple(getattr(self, name) for name in HANDLE_TENSORS)


class DispatchedHandle(DispatchHandle):
    """A :class:`DispatchHandle` exactly as an eager :func:`deepep_ops.dispatch` returned it.

    Its tensors were made by the op's kernel from validated inputs, so eager
    combine checks only the rows it is given against it, and hands the
    backend's own handle object (``native``, when the backend made one) back to
    the backend instead of rebuilding it. Editing it (``_replace``) gives a plain
    :class:`DispatchHandle`, checked in full again. Graphs never see this type:
    under ``torch.compile`` dispatch returns plain handles.
    """

    # No __slots__: the instance dict holds the three below.
    #: The backend's own handle object, if it made one.
    native = None
    #: ``topk_idx._version`` at dispatch (None: ``topk_idx`` is the handle's own copy).
    topk_idx_version = None
    #: The known-call entry (``deepep_ops.ops._KnownDispatch``) when the dispatch was
    #: a known call of an agree-once buffer (deepep_ops.ops' eager combine).
    known = None

    def _replace(self, **changes) -> DispatchHandle:
        return DispatchHandle(*self)._replace(**changes)


class HandleDims(NamedTuple):
    """The sizes a handle's tensors are made of."""

    num_ranks: int  # R
    num_local_experts: int  # EL
    num_recv_tokens: IntLike  # N (R·M in decode mode)
    num_tokens: IntLike  # T
    num_topk: int  # K


class HandleTensorSpec(NamedTuple):
    """Shape of one int32 handle tensor, and its storage offset in decode mode.

    DeepEP returns the decode per-expert psum as a view at storage offset 1 of an
    [EL+1] buffer (spec §3); the reference and the fake do the same.
    """

    shape: Callable[[HandleDims], tuple]
    decode_storage_offset: int = 0


#: Every int32 tensor of the handle, in schema order.
HANDLE_TENSOR_SPECS: dict = {
    "psum_num_recv_tokens_per_scaleup_rank": HandleTensorSpec(lambda d: (d.num_ranks,)),
    "psum_num_recv_tokens_per_expert": HandleTensorSpec(lambda d: (d.num_local_experts,), decode_storage_offset=1),
    "num_unaligned_recv_tokens_per_expert": HandleTensorSpec(lambda d: (d.num_local_experts,)),
    "recv_src_metadata": HandleTensorSpec(lambda d: (d.num_recv_tokens, recv_src_metadata_cols(d.num_topk))),
    "dst_buffer_slot_idx": HandleTensorSpec(lambda d: (d.num_tokens, d.num_topk)),
}
HANDLE_TENSORS = tuple(HANDLE_TENSOR_SPECS)

#: Schema types of the handle's fields that are not int32 tensors.
_FIELD_SCHEMA_TYPES = {
    "topk_idx": "Tensor",
    "num_experts": "int",
    "num_max_tokens_per_rank": "SymInt",
    "expert_alignment": "int",
    "do_expand": "bool",
    "num_expanded_tokens": "SymInt",
}
assert DispatchHandle._fields[1 : 1 + len(HANDLE_TENSORS)] == HANDLE_TENSORS
assert set(DispatchHandle._fields) == set(HANDLE_TENSORS) | set(_FIELD_SCHEMA_TYPES)


def schema_args() -> str:
    """Every handle field as schema arguments, in :class:`DispatchHandle` order."""
    return ", ".join(f"{_FIELD_SCHEMA_TYPES.get(name, 'Tensor')} {name}" for name in DispatchHandle._fields)


def schema_returns() -> str:
    """The handle tensors that dispatch returns (the rest comes from its inputs)."""
    return ", ".join(f"Tensor {name}" for name in HANDLE_TENSORS)


def handle_dims(handle: DispatchHandle, num_ranks: int) -> HandleDims:
    """The sizes ``handle``'s tensors must have (N read off ``recv_src_metadata``)."""
    num_tokens, num_topk = handle.topk_idx.shape
    return HandleDims(
        num_ranks, handle.num_experts // num_ranks, handle.recv_src_metadata.shape[0], num_tokens, num_topk
    )


def empty_handle_tensors(like: torch.Tensor, dims: HandleDims, decode: bool) -> tuple:
    """Uninitialised int32 handle tensors with the layout DeepEP returns (for fakes)."""
    out = []
    for spec in HANDLE_TENSOR_SPECS.values():
        shape = spec.shape(dims)
        offset = spec.decode_storage_offset if decode else 0
        if offset:
            out.append(like.new_empty((shape[0] + offset,) + shape[1:], dtype=torch.int32)[offset:])
        else:
            out.append(like.new_empty(shape, dtype=torch.int32))
    return tuple(out)


class DispatchResult(NamedTuple):
    """Decode-mode dispatch output. Rows ≥ ``handle.psum_num_recv_tokens_per_scaleup_rank[-1]``
    are padding with unspecified content.

    - ``recv_x`` [R·M, H], the dtype of x.
    - ``recv_x_scales`` [R·M, P] (None without scales).
    - ``recv_topk_idx`` [R·M, K]: local expert ids, −1 where the expert is elsewhere.
    - ``recv_topk_weights`` [R·M, K] float32 (lanes of other ranks unspecified).
    """

    recv_x: torch.Tensor
    recv_x_scales: Optional[torch.Tensor]
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    handle: DispatchHandle


class ExactDispatchResult(NamedTuple):
    """Prefill-mode (expanded) dispatch output; X is data-dependent.

    - ``recv_x`` [X, H]: rows grouped by local expert, each group padded to
      ``expert_alignment`` (padding rows are zero).
    - ``recv_x_scales`` [X, P] (None without scales).
    - ``recv_topk_weights`` [X] float32: the weight of the (token, expert) pair of each row.
    - ``num_recv_tokens_per_expert`` [EL] int32: aligned rows per local expert (sum X).
    """

    recv_x: torch.Tensor
    recv_x_scales: Optional[torch.Tensor]
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert: torch.Tensor
    handle: DispatchHandle
