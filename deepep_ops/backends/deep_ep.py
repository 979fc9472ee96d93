"""Real DeepEP v2: :class:`DeepEPBackend` over ``deep_ep.ElasticBuffer``.

The only module that knows DeepEP's call keywords (``do_expand``,
``do_cpu_sync``, ...: the mode's DeepEP spelling), its 5-tuple returns, the
16-argument ``EPHandle`` constructor, ``get_theoretical_num_sms``, the logical
EP domain (``num_scaleout_ranks``) and how DeepEP sizes its hybrid-mode
channels (:func:`predict_num_channels`). ``deep_ep`` is imported lazily:
nothing here runs unless a DeepEP buffer is wrapped.

Hybrid mode (docs/deepep_contract.md §9, several nodes with DeepEP's
``allow_hybrid_mode``): the handle gains two tensors whose shapes depend on the
channel count C, which DeepEP computes in C++ from the device's shared memory,
the token layout and ``num_sms``. The fake kernels need C at trace time, so
:meth:`DeepEPBackend.num_channels` predicts it with DeepEP's formula and every
dispatch's handle confirms it; a mismatch, or a C that cannot be predicted, is
an error that names the switch turning hybrid mode off (never a wrong shape).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch

from deepep_ops.backends.base import Backend, DispatchOutput
from deepep_ops.handle import HANDLE_TENSOR_FIELDS, HANDLE_TENSORS, HYBRID_TENSORS, DispatchArgs, DispatchHandle
from deepep_ops.layout import TURN_HYBRID_MODE_OFF

#: The five int32 handle tensors off a native ``EPHandle``, in one C call.
_handle_tensors = operator.attrgetter(*HANDLE_TENSORS)
#: The two hybrid-only ones.
_hybrid_tensors = operator.attrgetter(*HYBRID_TENSORS)
_NO_HYBRID_TENSORS = (None,) * len(HYBRID_TENSORS)
_new_tuple = tuple.__new__

# DeepEP's channel sizing (csrc/elastic/buffer.hpp, dispatch(), "num_channels"; dd758ca).
_MAX_CHANNELS_PER_SM = 8  # kNumMaxChannelsPerSM
_NUM_NOTIFY_WARPS = 4  # kNumNotifyWarps: 32 warps per SM minus these
_NUM_CHANNELS_PER_SM_WITHOUT_OVERLAP = 4  # prefer_overlap_with_compute=False


def _align(v: int, a: int) -> int:
    return (v + a - 1) // a * a


def predict_num_channels(
    *,
    shared_memory_bytes: int,
    num_sms: int,
    num_ranks: int,
    num_experts: int,
    hidden: int,
    x_element_size: int,
    num_scale_cols: int,
    num_topk: int,
    prefer_overlap_with_compute: bool,
) -> int:
    """DeepEP's hybrid-mode channel count C = num_sms · channels per SM.

    The formula of DeepEP's ``buffer.hpp`` dispatch() (dd758ca), with the token
    layout sizes of ``layout.cuh`` and ``dispatch.hpp``: per-SM channels are
    bounded by the shared memory one dispatch token (with its metadata) and one
    combine token take, by the warps an SM has, halved (a sender and a forwarder
    warp per channel), at most 8, and at most 4 without
    ``prefer_overlap_with_compute``. ``shared_memory_bytes`` is the device's
    ``sharedMemPerBlockOptin`` (232448 on H100 and H200). Read from source, never
    run on a multi-node machine: :class:`DeepEPBackend` confirms it against
    every dispatch's handle.
    """
    notify_bytes = _align(num_ranks + num_experts, 128) * 4
    dispatch_token_bytes = (
        _align(hidden * x_element_size, 32) + _align(4 * num_scale_cols, 32)
        + _align(8 * num_topk + 4 * (1 + num_topk), 32) + 32
    )
    combine_token_bytes = _align(2 * hidden, 32) + _align(8 * num_topk, 32) + 32
    per_sm = min((shared_memory_bytes - notify_bytes) // dispatch_token_bytes, 32 - _NUM_NOTIFY_WARPS)
    per_sm = min(shared_memory_bytes // combine_token_bytes, per_sm)
    per_sm = min(per_sm // 2, _MAX_CHANNELS_PER_SM)
    if not prefer_overlap_with_compute:
        per_sm = min(per_sm, _NUM_CHANNELS_PER_SM_WITHOUT_OVERLAP)
    return num_sms * per_sm


def logical_domain(buffer: object, num_ranks: int) -> tuple:
    """``(S, U)`` of a DeepEP buffer: its ``num_scaleout_ranks`` / ``num_scaleup_ranks``
    (``get_logical_domain_size()`` where the attributes are missing); ``(1, R)``
    for an object that has neither (direct mode)."""
    num_scaleout = getattr(buffer, "num_scaleout_ranks", None)
    num_scaleup = getattr(buffer, "num_scaleup_ranks", None)
    if num_scaleout is None and hasattr(buffer, "get_logical_domain_size"):
        num_scaleout, num_scaleup = buffer.get_logical_domain_size()
    if num_scaleout is None:
        return 1, num_ranks
    num_scaleout = int(num_scaleout)
    num_scaleup = num_ranks // num_scaleout if num_scaleup is None else int(num_scaleup)
    if num_scaleout < 1 or num_scaleout * num_scaleup != num_ranks:
        raise ValueError(
            f"EPBuffer: the DeepEP buffer's logical domain {num_scaleout} scale-out x {num_scaleup} scale-up "
            f"ranks does not make its {num_ranks} ranks"
        )
    return num_scaleout, num_scaleup


class DeepEPBackend(Backend):
    """Wraps an object with ``deep_ep.ElasticBuffer``'s API.

    Args:
        buffer: the ``ElasticBuffer``.
        handle_class: its ``EPHandle`` class.
        topk_idx_dtype: ``deep_ep.topk_idx_t``.
    """

    #: DeepEP JIT-compiles its kernels per M, H, K, E, dtype and mode.
    needs_warmup = True

    def __init__(self, buffer: object, handle_class: type, topk_idx_dtype: torch.dtype) -> None:
        self.buffer = buffer
        self.handle_class = handle_class
        self.topk_idx_dtype = topk_idx_dtype
        self.num_ranks = buffer.num_ranks
        self.rank = buffer.rank_idx
        # DeepEP calls the capacity num_max_tokens_per_rank (its constructor's argument).
        self.capacity = buffer.num_max_tokens_per_rank
        # DeepEP and the reference buffer keep their process group there.
        self.group = getattr(buffer, "group", None)
        self.hidden = getattr(buffer, "hidden", None) or None
        # The logical domain: hybrid kernels and handles when S > 1 (contract §9).
        self.num_scaleout_ranks, _num_scaleup = logical_domain(buffer, self.num_ranks)
        self.hybrid = self.num_scaleout_ranks > 1
        # (E, K) -> get_theoretical_num_sms(E, K). DeepEP caches it too, but behind a
        # weak-reference LRU that costs more than a dict lookup; combine needs it every call.
        self._num_sms: dict = {}
        # Hybrid mode: (E, H, x element size, P, K) -> C predicted (or confirmed) for it.
        self._num_channels: dict = {}

    def dispatch(self, args: DispatchArgs) -> DispatchOutput:
        recv, recv_topk_idx, recv_topk_weights, handle, _event = self._dispatch(args)
        return self._dispatch_output(args, recv, recv_topk_idx, recv_topk_weights, handle)

    def _dispatch(self, args: DispatchArgs, **extra):
        """``buffer.dispatch`` of validated ``args`` in DeepEP's words (``extra``: the async keywords)."""
        prefill = not args.decode  # DeepEP's do_expand / do_cpu_sync
        return self.buffer.dispatch(
            args.x if args.x_scales is None else (args.x, args.x_scales),
            topk_idx=args.topk_idx,
            topk_weights=args.topk_weights,
            num_experts=args.num_experts,
            num_max_tokens_per_rank=args.num_max_tokens_per_rank,
            expert_alignment=args.expert_alignment,
            # What num_sms=0 would pick, without DeepEP's per-call lookup; combine
            # passes the same value through the handle.
            num_sms=self.num_sms(args.num_experts, args.topk_idx.shape[1]),
            # The graph keeps topk_idx alive until combine, which takes it as an input.
            do_handle_copy=False,
            do_cpu_sync=prefill,
            do_expand=prefill,
            # Zeroed padding rows keep garbage (NaN/Inf) out of expert compute.
            do_zero_padding=prefill,
            **extra,
        )

    def _dispatch_output(self, args: DispatchArgs, recv, recv_topk_idx, recv_topk_weights, handle) -> DispatchOutput:
        recv_x, recv_x_scales = recv if isinstance(recv, tuple) else (recv, None)
        hybrid_tensors = self._confirm_hybrid_handle(args, handle) if self.hybrid else _NO_HYBRID_TENSORS
        # tuple.__new__: the NamedTuple without its Python __new__ (eager dispatch's hot path).
        return _new_tuple(DispatchOutput, (
            recv_x,
            recv_x_scales,
            recv_topk_idx if args.decode else None,
            recv_topk_weights,
            _handle_tensors(handle),
            handle,
            hybrid_tensors,
        ))

    # ------------------------------------------------------------------ asynchrony
    # DeepEP v2.1 (async_with_compute_stream=True): the call launches its kernels on
    # DeepEP's communication stream and returns its (not yet valid) outputs with an
    # EventOverlap; the compute stream carries on, and the wait makes it wait for
    # the event (a stream join, legal inside one CUDA-graph capture). v2.5 and the
    # reference buffer also take defer_epilogue=True: the call returns only the
    # event, whose wait() runs the receiving epilogue and returns the results.
    def _defers_epilogue(self) -> bool:
        """Whether this DeepEP's dispatch/combine take ``defer_epilogue`` (v2.5, the reference)."""
        defers = self.__dict__.get("_defers")
        if defers is None:
            import inspect

            defers = self.__dict__["_defers"] = "defer_epilogue" in inspect.signature(self.buffer.dispatch).parameters
        return defers

    def dispatch_async(self, args: DispatchArgs) -> "_Pending":
        if self._defers_epilogue():
            event = self._dispatch(args, async_with_compute_stream=True, defer_epilogue=True)
            return _Pending(lambda: self._dispatch_output(args, *event.wait()))
        recv, recv_topk_idx, recv_topk_weights, handle, event = self._dispatch(args, async_with_compute_stream=True)

        def received() -> DispatchOutput:
            event.current_stream_wait()
            return self._dispatch_output(args, recv, recv_topk_idx, recv_topk_weights, handle)

        return _Pending(received)

    def combine_async(self, x, handle) -> "_Pending":
        native = self.native_handle(handle)
        if self._defers_epilogue():
            event = self.buffer.combine(x, handle=native, async_with_compute_stream=True, defer_epilogue=True)
            return _Pending(lambda: event.wait()[0])
        combined_x, _combined_weights, event = self.buffer.combine(x, handle=native, async_with_compute_stream=True)

        def received() -> torch.Tensor:
            event.current_stream_wait()
            return combined_x

        return _Pending(received)

    # ------------------------------------------------------------------ hybrid mode
    def _channels_key(self, args: DispatchArgs) -> tuple:
        x_scales = args.x_scales
        return (int(args.num_experts), int(args.x.shape[1]), args.x.element_size(),
                0 if x_scales is None else int(x_scales.shape[1]), int(args.topk_idx.shape[1]))

    def num_channels(self, args: DispatchArgs) -> int:
        """C of a hybrid dispatch of ``args`` (0 in direct mode): confirmed by an
        earlier handle of the same layout, else :func:`predict_num_channels` with
        the device's shared memory, the buffer's ``prefer_overlap_with_compute``
        and the ``num_sms`` this backend dispatches with."""
        if not self.hybrid:
            return 0
        key = self._channels_key(args)
        num_channels = self._num_channels.get(key)
        if num_channels is None:
            num_channels = self._num_channels[key] = self._predict_num_channels(args, key)
        return num_channels

    def _predict_num_channels(self, args: DispatchArgs, key: tuple) -> int:
        num_experts, hidden, element_size, num_scale_cols, num_topk = key
        prefer_overlap = getattr(self.buffer, "prefer_overlap_with_compute", None)
        device = args.x.device
        why = None
        if prefer_overlap is None:
            why = "the buffer has no prefer_overlap_with_compute attribute"
        elif device.type != "cuda" or not torch.cuda.is_available():
            why = f"the tokens are on {device}, not a CUDA device whose shared memory sizes DeepEP's channels"
        if why is not None:
            raise ValueError(
                f"DeepEP hybrid mode ({self.num_scaleout_ranks} scale-out x {self.num_scaleup_ranks} scale-up "
                f"ranks): cannot tell its channel count (which shapes the handle): {why}; {TURN_HYBRID_MODE_OFF}"
            )
        num_sms = self.num_sms(num_experts, num_topk)
        smem = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
        return predict_num_channels(
            shared_memory_bytes=smem, num_sms=num_sms, num_ranks=self.num_ranks, num_experts=num_experts,
            hidden=hidden, x_element_size=element_size, num_scale_cols=num_scale_cols, num_topk=num_topk,
            prefer_overlap_with_compute=bool(prefer_overlap),
        )

    def _confirm_hybrid_handle(self, args: DispatchArgs, handle: object) -> tuple:
        """The native hybrid handle's two hybrid-only tensors, once its channel
        count matches the one the fakes shaped the graph with."""
        hybrid_tensors = _hybrid_tensors(handle)
        forward = hybrid_tensors[0]
        expected = self.num_channels(args)
        got = None if forward is None else forward.shape[0]
        if got != expected:
            num_sms = self.num_sms(args.num_experts, args.topk_idx.shape[1])
            raise RuntimeError(
                f"DeepEP hybrid mode ({self.num_scaleout_ranks} scale-out x {self.num_scaleup_ranks} scale-up "
                f"ranks): the dispatch handle has {got} channels (token_metadata_at_forward.shape[0]), but deepep_ops "
                f"predicted {expected} from DeepEP's formula (num_sms={num_sms}) and shaped the handle with it; "
                f"{TURN_HYBRID_MODE_OFF}"
            )
        return hybrid_tensors

    def num_sms(self, num_experts: int, num_topk: int) -> int:
        """``buffer.get_theoretical_num_sms(E, K)``, computed once per (E, K)."""
        key = (num_experts, num_topk)
        num_sms = self._num_sms.get(key)
        if num_sms is None:
            num_sms = self._num_sms[key] = self.buffer.get_theoretical_num_sms(num_experts, num_topk)
        return num_sms

    def _native_handle(self, handle: DispatchHandle, per_expert_list: Optional[list] = None) -> object:
        """DeepEP's ``EPHandle`` with the fields combine reads (and, given
        ``per_expert_list``, those cached dispatch reads)."""
        return self.handle_class(
            not handle.decode,  # do_expand
            handle.num_experts,
            handle.expert_alignment,
            handle.num_max_tokens_per_rank,
            # The value dispatch ran with; combine must match it.
            self.num_sms(handle.num_experts, handle.topk_idx.shape[1]),
            handle.topk_idx,
            handle.recv_src_metadata.shape[0],
            handle.num_expanded_tokens,
            # The host-side per-expert list is only read by cached dispatch, not combine.
            [] if per_expert_list is None else per_expert_list,
            *handle[HANDLE_TENSOR_FIELDS],
            handle.token_metadata_at_forward,  # hybrid mode only (else None)
            handle.channel_linked_list,  # hybrid mode only (else None)
        )

    def native_handle(self, handle: DispatchHandle) -> object:
        """The ``EPHandle`` dispatch returned if ``handle`` carries it, else one rebuilt."""
        native = getattr(handle, "native", None)
        return self._native_handle(handle) if native is None else native

    def combine(self, x, handle, out=None):
        combined_x, _combined_weights, _event = self.buffer.combine(x, handle=self.native_handle(handle))
        if out is None:
            return combined_x
        # deep_ep's combine allocates its result; one copy, inside the op.
        return out.copy_(combined_x)

    def cached_dispatch(self, x, x_scales, handle):
        per_expert_list = []
        if not handle.decode:
            # Cached expand dispatch sizes its per-expert groups from the host list,
            # which the handle's graph values do not carry: rebuild it from the
            # device counts (one host sync; prefill already synced in forward).
            a = handle.expert_alignment
            unaligned = handle.num_unaligned_recv_tokens_per_expert.to(torch.int64)
            per_expert_list = ((unaligned + a - 1) // a * a).tolist()
        recv, _recv_topk_idx, _recv_topk_weights, _handle, _event = self.buffer.dispatch(
            x if x_scales is None else (x, x_scales),
            handle=self._native_handle(handle, per_expert_list),
            # DeepEP (dd758ca) reads num_experts before it takes it from the handle
            # (get_theoretical_num_sms(None, K) raises): give both, as the forward had them.
            num_experts=handle.num_experts,
            num_sms=self.num_sms(handle.num_experts, handle.topk_idx.shape[1]),
            do_handle_copy=False,
            do_cpu_sync=False,
            # DeepEP does not check do_expand against the handle's (docs/deepep_contract.md §1): pass the handle's.
            do_expand=not handle.decode,
            do_zero_padding=not handle.decode,
        )
        return recv if isinstance(recv, tuple) else (recv, None)

    def combine_with_weights(self, x, topk_weights, handle):
        combined_x, combined_weights, _event = self.buffer.combine(
            x, handle=self._native_handle(handle), topk_weights=topk_weights
        )
        return combined_x, combined_weights


class _Pending:
    """A started DeepEP call: ``wait()`` (once) returns its result."""

    __slots__ = ("_receive",)

    def __init__(self, receive) -> None:
        self._receive = receive

    def wait(self):
        return self._receive()


def from_object(obj: object) -> Optional[DeepEPBackend]:
    """A :class:`DeepEPBackend` for a ``deep_ep.ElasticBuffer``, else None."""
    if type(obj).__module__.split(".")[0] != "deep_ep":
        return None
    import deep_ep
    from deep_ep.buffers.elastic import EPHandle

    return DeepEPBackend(obj, EPHandle, getattr(deep_ep, "topk_idx_t", torch.int64))
