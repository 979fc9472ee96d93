"""The op codec: what the dispatch ops take and return, and the handle, written once.

A handle travels through graphs as plain values (the routing ``topk_idx``, five
int32 tensors, five static ints, and in hybrid mode two more int32 tensors):
no Python object per call, nothing mutable, so it flows through Dynamo and AOT
graphs like any other value.
:class:`DispatchHandle` is the one definition. Its field order is the order in
every schema (:func:`schema_args`, :func:`schema_returns`), in the op wrappers
(``tuple(handle)`` / ``DispatchHandle(*values)``), and :data:`HANDLE_TENSOR_SPECS`
gives every tensor's shape for validation and the fake kernels, in both
modes of the EP domain (docs/deepep_contract.md §9): *direct* (one scale-out
rank, S = 1, U = R) and *hybrid* (S > 1 scale-out ranks of U scale-up ranks
each, R = S·U, C channels). The two hybrid-only tensors are the last two fields,
``None`` in direct mode; :func:`handle_args` drops them from op calls then, so a
direct-mode graph records exactly the arguments it did before they existed.
Backends receive a :class:`DispatchHandle` and build their own handle object from it.

What each dispatch op returns (its flat outputs) is defined here too:
:func:`dispatch_schema_returns` writes the schema's returns,
:func:`pack_dispatch` builds the tuple (real and fake kernels), and
:func:`dispatch_handle` / :func:`unpack_dispatch` read it back (the Python
wrappers, autograd). No other module knows an output's position.

Shape letters are those of the glossary in :mod:`deepep_ops.layout`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch

from deepep_ops.layout import (
    IntLike,
    align,
    decode_num_expanded_tokens,
    forward_rows,
    recv_src_metadata_cols,
    token_metadata_cols,
    tokens_per_channel,
)


class DispatchArgs(NamedTuple):
    """One dispatch call's arguments (both ops take them; ``decode`` picks the op).

    - ``x`` [T, H] bf16, or float8_e4m3fn with ``x_scales`` [T, P] float32/int32.
    - ``topk_idx`` [T, K] topk_idx_t global expert ids, −1 for an empty slot.
    - ``topk_weights`` [T, K] float32.
    - ``num_experts`` E, ``num_max_tokens_per_rank`` M, ``expert_alignment`` A.
    - ``decode``: the mode (:mod:`deepep_ops.layout`).
    """

    x: torch.Tensor
    x_scales: Optional[torch.Tensor]
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    num_experts: int
    num_max_tokens_per_rank: IntLike
    expert_alignment: int
    decode: bool


class DispatchHandle(NamedTuple):
    """DeepEP's ``EPHandle`` as graph values (docs/deepep_contract.md §3; hybrid mode §9).

    Tensors are int32 on the tokens' device except ``topk_idx``; S, U, C, mtpc
    as in :mod:`deepep_ops.layout`:

    - ``topk_idx`` [T, K] topk_idx_t: the dispatched routing.
    - ``psum_num_recv_tokens_per_scaleup_rank`` [U] (direct mode: U = R):
      inclusive prefix sum of received tokens per scale-up peer (direct mode:
      per source rank); ``[-1]`` is the real N.
    - ``psum_num_recv_tokens_per_expert`` [EL].
    - ``num_unaligned_recv_tokens_per_expert`` [EL].
    - ``recv_src_metadata`` [N, K+2] (N = R·M in decode mode).
    - ``dst_buffer_slot_idx`` [T, K] direct, [C, S, mtpc, K] hybrid.
    - ``token_metadata_at_forward`` [C, S·mtpc+1, 2+2K] hybrid, None direct.
    - ``channel_linked_list`` [C, S·mtpc+1, U] hybrid, None direct.

    Static ints: E, M, A, the mode (``decode``) and X. C is the channel count
    of a hybrid handle, ``token_metadata_at_forward.shape[0]``.
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
    decode: bool
    num_expanded_tokens: IntLike
    # Hybrid mode only (several scale-out ranks); None in direct mode. Last, with
    # defaults, so that direct-mode op calls omit them (handle_args).
    token_metadata_at_forward: Optional[torch.Tensor] = None
    channel_linked_list: Optional[torch.Tensor] = None

    @property
    def tensors(self) -> tuple:
        """The five int32 tensors every handle has, in :data:`HANDLE_TENSORS` order."""
        return tuple(getattr(self, name) for name in HANDLE_TENSORS)

    @property
    def hybrid_tensors(self) -> tuple:
        """The two hybrid-only tensors (:data:`HYBRID_TENSORS` order); ``(None, None)`` in direct mode."""
        return (self.token_metadata_at_forward, self.channel_linked_list)

    @property
    def hybrid(self) -> bool:
        """Whether this is a hybrid-mode handle (it carries the hybrid-only tensors)."""
        return self.token_metadata_at_forward is not None

    @property
    def num_channels(self) -> int:
        """C of a hybrid handle (``token_metadata_at_forward.shape[0]``); 0 in direct mode."""
        return 0 if self.token_metadata_at_forward is None else self.token_metadata_at_forward.shape[0]


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
    #: ``topk_idx``'s version counter at dispatch (None: ``topk_idx`` is the handle's own copy).
    topk_idx_version = None
    #: The known-call entry (:class:`deepep_ops.known_calls.KnownDispatch`) when the
    #: dispatch was a known call of an agree-once buffer.
    known = None

    def _replace(self, **changes) -> DispatchHandle:
        return DispatchHandle(*self)._replace(**changes)


def recv_rows(handle: DispatchHandle) -> IntLike:
    """Rows of the received tokens (``recv_x``), which combine's ``x`` must have:
    R·M in decode mode, X in prefill mode."""
    return handle.recv_src_metadata.shape[0] if handle.decode else handle.num_expanded_tokens


class HandleDims(NamedTuple):
    """The sizes a handle's tensors are made of (direct mode: S = 1, U = R, C = 0)."""

    num_ranks: int  # R
    num_local_experts: int  # EL
    num_recv_tokens: IntLike  # N (R·M in decode mode)
    num_tokens: IntLike  # T
    num_topk: int  # K
    num_max_tokens_per_rank: IntLike  # M
    num_scaleout_ranks: int  # S
    num_scaleup_ranks: int  # U
    num_channels: int  # C (hybrid mode), 0 in direct mode

    @property
    def hybrid(self) -> bool:
        return self.num_scaleout_ranks > 1


class HandleTensorSpec(NamedTuple):
    """Shape of one int32 handle tensor, its storage offset in decode mode, and
    whether only hybrid-mode handles have it.

    DeepEP returns the decode per-expert psum as a view at storage offset 1 of an
    [EL+1] buffer (contract §3); the reference and the fake do the same.
    """

    shape: Callable[[HandleDims], tuple]
    decode_storage_offset: int = 0
    hybrid_only: bool = False


def _dst_buffer_slot_idx_shape(d: HandleDims) -> tuple:
    # Direct: per (token, lane) of this rank. Hybrid: per (channel, source node,
    # scale-out slot, lane) of the tokens this rank forwards (contract §9; no T in it).
    if not d.hybrid:
        return (d.num_tokens, d.num_topk)
    return (d.num_channels, d.num_scaleout_ranks, tokens_per_channel(d.num_max_tokens_per_rank, d.num_channels),
            d.num_topk)


def _forward_rows(d: HandleDims) -> IntLike:
    return forward_rows(d.num_scaleout_ranks, d.num_max_tokens_per_rank, d.num_channels)


#: Every int32 tensor of the handle, in schema order (the hybrid-only ones last).
HANDLE_TENSOR_SPECS: dict = {
    "psum_num_recv_tokens_per_scaleup_rank": HandleTensorSpec(lambda d: (d.num_scaleup_ranks,)),
    "psum_num_recv_tokens_per_expert": HandleTensorSpec(lambda d: (d.num_local_experts,), decode_storage_offset=1),
    "num_unaligned_recv_tokens_per_expert": HandleTensorSpec(lambda d: (d.num_local_experts,)),
    "recv_src_metadata": HandleTensorSpec(lambda d: (d.num_recv_tokens, recv_src_metadata_cols(d.num_topk))),
    "dst_buffer_slot_idx": HandleTensorSpec(_dst_buffer_slot_idx_shape),
    "token_metadata_at_forward": HandleTensorSpec(
        lambda d: (d.num_channels, _forward_rows(d), token_metadata_cols(d.num_topk)), hybrid_only=True),
    "channel_linked_list": HandleTensorSpec(
        lambda d: (d.num_channels, _forward_rows(d), d.num_scaleup_ranks), hybrid_only=True),
}
#: The int32 tensors every handle has.
HANDLE_TENSORS = tuple(name for name, spec in HANDLE_TENSOR_SPECS.items() if not spec.hybrid_only)
#: The int32 tensors only hybrid-mode handles have (the handle's last fields).
HYBRID_TENSORS = tuple(name for name, spec in HANDLE_TENSOR_SPECS.items() if spec.hybrid_only)
#: Where the handle's tensors sit among its fields (after ``topk_idx``).
HANDLE_TENSOR_FIELDS = slice(1, 1 + len(HANDLE_TENSORS))
#: Where the hybrid-only tensors sit (the last fields).
HYBRID_TENSOR_FIELDS = slice(len(DispatchHandle._fields) - len(HYBRID_TENSORS), None)
#: The static ints, between the two.
HANDLE_STATIC_FIELDS = slice(HANDLE_TENSOR_FIELDS.stop, HYBRID_TENSOR_FIELDS.start)

#: Schema types of the handle's fields that are not int32 tensors.
_FIELD_SCHEMA_TYPES = {
    "topk_idx": "Tensor",
    "num_experts": "int",
    "num_max_tokens_per_rank": "SymInt",
    "expert_alignment": "int",
    "decode": "bool",
    "num_expanded_tokens": "SymInt",
}
assert DispatchHandle._fields[HANDLE_TENSOR_FIELDS] == HANDLE_TENSORS
assert DispatchHandle._fields[HYBRID_TENSOR_FIELDS] == HYBRID_TENSORS
assert set(DispatchHandle._fields) == set(HANDLE_TENSOR_SPECS) | {"topk_idx"} | set(_FIELD_SCHEMA_TYPES)


def schema_args() -> str:
    """Every handle field as schema arguments, in :class:`DispatchHandle` order
    (the hybrid-only tensors optional, defaulting to None)."""
    fields = DispatchHandle._fields[: HYBRID_TENSOR_FIELDS.start]
    args = [f"{_FIELD_SCHEMA_TYPES.get(name, 'Tensor')} {name}" for name in fields]
    args += [f"Tensor? {name}=None" for name in HYBRID_TENSORS]
    return ", ".join(args)


def schema_returns() -> str:
    """The handle tensors that dispatch returns (the rest comes from its inputs).
    The hybrid-only ones are None in direct mode."""
    return ", ".join([f"Tensor {name}" for name in HANDLE_TENSORS] + [f"Tensor? {name}" for name in HYBRID_TENSORS])


def handle_args(handle: DispatchHandle) -> tuple:
    """``handle``'s fields as op arguments: the trailing hybrid-only fields are left
    out when None (direct mode), so a direct-mode call records the arguments it
    did before hybrid mode existed. Every op call that takes a handle uses this."""
    values = tuple(handle)
    end = len(values)
    while end > HYBRID_TENSOR_FIELDS.start and values[end - 1] is None:
        end -= 1
    return values[:end]


def handle_dims(
    handle: DispatchHandle, num_ranks: int, num_scaleout_ranks: int = 1, num_channels: Optional[int] = None
) -> HandleDims:
    """The sizes ``handle``'s tensors must have (N read off ``recv_src_metadata``;
    in hybrid mode C off ``token_metadata_at_forward`` unless given)."""
    num_tokens, num_topk = handle.topk_idx.shape
    if num_channels is None:
        num_channels = handle.num_channels if num_scaleout_ranks > 1 else 0
    return HandleDims(
        num_ranks, handle.num_experts // num_ranks, handle.recv_src_metadata.shape[0], num_tokens, num_topk,
        handle.num_max_tokens_per_rank, num_scaleout_ranks, num_ranks // num_scaleout_ranks, num_channels,
    )


def empty_handle_tensors(like: torch.Tensor, dims: HandleDims, decode: bool) -> tuple:
    """Uninitialised int32 handle tensors (:data:`HANDLE_TENSORS`) with the layout
    DeepEP returns (for fakes)."""
    out = []
    for name in HANDLE_TENSORS:
        spec = HANDLE_TENSOR_SPECS[name]
        shape = spec.shape(dims)
        offset = spec.decode_storage_offset if decode else 0
        if offset:
            out.append(like.new_empty((shape[0] + offset,) + shape[1:], dtype=torch.int32)[offset:])
        else:
            out.append(like.new_empty(shape, dtype=torch.int32))
    return tuple(out)


def empty_hybrid_tensors(like: torch.Tensor, dims: HandleDims) -> tuple:
    """Uninitialised hybrid-only handle tensors (:data:`HYBRID_TENSORS`) for fakes:
    ``(None, None)`` in direct mode."""
    if not dims.hybrid:
        return (None,) * len(HYBRID_TENSORS)
    return tuple(like.new_empty(HANDLE_TENSOR_SPECS[name].shape(dims), dtype=torch.int32) for name in HYBRID_TENSORS)


# ---------------------------------------------------------------------------
# What the dispatch ops return.
# ---------------------------------------------------------------------------


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


#: The outputs of ``deepep_ops::dispatch`` (decode) before the handle tensors.
_DECODE_OUTPUTS = (
    ("Tensor", "recv_x"), ("Tensor?", "recv_x_scales"), ("Tensor", "recv_topk_idx"), ("Tensor", "recv_topk_weights"),
)
#: The outputs of ``deepep_ops::dispatch_exact`` (prefill) before the handle tensors.
#: N and X come first, as SymInts: see ``schemas.DISPATCH_EXACT``.
_PREFILL_OUTPUTS = (
    ("SymInt", "num_recv_tokens"), ("SymInt", "num_expanded_tokens"), ("Tensor", "recv_x"),
    ("Tensor?", "recv_x_scales"), ("Tensor", "recv_topk_weights"), ("Tensor", "num_recv_tokens_per_expert"),
)


def _outputs(decode: bool) -> tuple:
    return _DECODE_OUTPUTS if decode else _PREFILL_OUTPUTS


def dispatch_schema_returns(decode: bool) -> str:
    """The returns of the dispatch op of this mode, as schema text."""
    return ", ".join(f"{typ} {name}" for typ, name in _outputs(decode)) + ", " + schema_returns()


_UNALIGNED = HANDLE_TENSORS.index("num_unaligned_recv_tokens_per_expert")
_RECV_SRC_METADATA = HANDLE_TENSORS.index("recv_src_metadata")


def prefill_counts(handle_tensors: tuple, expert_alignment: int) -> torch.Tensor:
    """Prefill's aligned rows per local expert, [EL] int32 on the tokens' device:
    ``align(c_e, A)`` of the unaligned counts c_e among a dispatch's
    ``handle_tensors`` (what the backend's host list holds, contract §3),
    computed on the device. Not ``torch.tensor(host list, device=cuda)``: a copy
    from pageable memory synchronises the stream, so the host would wait for
    the dispatch's payload kernels before it could queue anything after them."""
    unaligned = handle_tensors[_UNALIGNED]
    if expert_alignment == 1:
        return unaligned.clone()
    return align(unaligned, expert_alignment)


def pack_dispatch(
    decode: bool,
    recv_x: torch.Tensor,
    recv_x_scales: Optional[torch.Tensor],
    recv_topk_idx: Optional[torch.Tensor],
    recv_topk_weights: torch.Tensor,
    handle_tensors: tuple,
    expert_alignment: int,
    num_recv_tokens_per_expert: Optional[torch.Tensor] = None,
    hybrid_tensors: tuple = (None, None),
) -> tuple:
    """The flat outputs of the dispatch op of this mode.

    ``recv_x_scales`` is None without scales, and so are the ``hybrid_tensors``
    (:data:`HYBRID_TENSORS`) in direct mode: the schemas return ``Tensor?``
    there, so a call allocates no placeholder and a compiled graph checks no
    size of one. Prefill's N and X are read off ``recv_src_metadata`` and ``recv_x``, and its
    per-expert counts computed from the handle (:func:`prefill_counts`) unless
    given (the fake kernel).
    """
    hybrid = tuple(hybrid_tensors)
    if decode:
        return (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights) + tuple(handle_tensors) + hybrid
    if num_recv_tokens_per_expert is None:
        num_recv_tokens_per_expert = prefill_counts(handle_tensors, expert_alignment)
    sizes = (handle_tensors[_RECV_SRC_METADATA].shape[0], recv_x.shape[0])
    return (sizes + (recv_x, recv_x_scales, recv_topk_weights, num_recv_tokens_per_expert) + tuple(handle_tensors)
            + hybrid)


def num_expanded_tokens(args: DispatchArgs, num_ranks: int, prefill_rows: Optional[IntLike] = None) -> IntLike:
    """X of the handle that a dispatch of ``args`` makes, the one value a handle
    derives: in decode the worst case of R, M, K, E, A
    (:func:`~deepep_ops.layout.decode_num_expanded_tokens`: what DeepEP's handle
    carries without CPU sync), in prefill the ``prefill_rows`` the dispatch returned."""
    if not args.decode:
        return prefill_rows
    return decode_num_expanded_tokens(
        num_ranks, args.num_max_tokens_per_rank, args.topk_idx.shape[1], args.num_experts, args.expert_alignment
    )


def dispatch_handle(args: DispatchArgs, outputs: tuple, num_ranks: int, hybrid: bool = False) -> DispatchHandle:
    """The handle that the dispatch op's flat ``outputs`` and its ``args`` make.

    ``hybrid``: the buffer's mode (``num_scaleout_ranks > 1``, a trace-time
    constant). Only then are the hybrid-only outputs read: a direct-mode graph
    gets no ``getitem`` of them, and its handle carries None there.
    """
    first = len(_outputs(args.decode))
    handle_tensors = outputs[first : first + len(HANDLE_TENSORS)]
    if hybrid:
        start = first + len(HANDLE_TENSORS)
        hybrid_tensors = tuple(outputs[start : start + len(HYBRID_TENSORS)])
    else:
        hybrid_tensors = (None,) * len(HYBRID_TENSORS)
    # Prefill's X is the op's own SymInt output (see schemas.DISPATCH_EXACT), not recv_x's size read back.
    x_rows = num_expanded_tokens(args, num_ranks, None if args.decode else outputs[1])
    return DispatchHandle(
        args.topk_idx, *handle_tensors, args.num_experts, args.num_max_tokens_per_rank, args.expert_alignment,
        args.decode, x_rows, *hybrid_tensors,
    )


def dispatch_result(
    decode: bool,
    recv_x: torch.Tensor,
    recv_x_scales: Optional[torch.Tensor],
    recv_topk_idx: Optional[torch.Tensor],
    recv_topk_weights: torch.Tensor,
    num_recv_tokens_per_expert: Optional[torch.Tensor],
    handle: DispatchHandle,
) -> Union[DispatchResult, ExactDispatchResult]:
    """The result the Python entry points return for this mode."""
    if decode:
        return DispatchResult(recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, handle)
    return ExactDispatchResult(recv_x, recv_x_scales, recv_topk_weights, num_recv_tokens_per_expert, handle)


def unpack_dispatch(
    args: DispatchArgs, outputs: tuple, num_ranks: int, hybrid: bool = False
) -> Union[DispatchResult, ExactDispatchResult]:
    """The dispatch op's flat ``outputs`` as the result of the call ``args``
    (``hybrid`` as in :func:`dispatch_handle`)."""
    decode = args.decode
    handle = dispatch_handle(args, outputs, num_ranks, hybrid)
    if decode:
        recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights = outputs[:4]
        counts = None
    else:
        recv_x, recv_x_scales, recv_topk_weights, counts = outputs[2:6]
        recv_topk_idx = None
    return dispatch_result(
        decode, recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights,
        counts, handle,
    )


def dispatch_output_index(decode: bool, name: str) -> int:
    """Where output ``name`` (as in :func:`dispatch_schema_returns`) sits among the
    dispatch op's flat outputs (autograd reads its gradients there)."""
    return [n for _t, n in _outputs(decode)].index(name)
