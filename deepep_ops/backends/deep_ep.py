"""Real DeepEP v2: :class:`DeepEPBackend` over DeepEP's buffer, v2.1's
``deep_ep.ElasticBuffer`` or v2.5's ``deep_ep.EPBuffer``.

The only module that knows DeepEP's call keywords (``do_expand``,
``do_cpu_sync``, ...: the mode's DeepEP spelling), its 5-tuple returns, the
16-argument ``EPHandle`` constructor, ``get_theoretical_num_sms``, the logical
EP domain (``num_scaleout_ranks``) and how DeepEP sizes its hybrid-mode
channels (:func:`predict_num_channels`). ``deep_ep`` is imported lazily:
nothing here runs unless a DeepEP buffer is wrapped or built (:func:`new_buffer`).

DeepEP's API generations (:class:`DeepEPAPI`, told by feature, never by
version string; :func:`api_of`): v2.1 (``ElasticBuffer`` in
``deep_ep.buffers.elastic``) and v2.5 (``EPBuffer`` in ``deep_ep.buffers.ep``)
take the same keywords for what we call, except that v2.5 drops
``previous_event_before_epilogue`` (we never pass it) and adds
``defer_epilogue``; v2.5 asserts ``do_handle_copy=False`` (what we always
pass: the graph keeps ``topk_idx`` alive until combine) and rounds an explicit
``num_sms`` up to even. Its ``EPHandle`` keeps ``topk_idx`` by reference and
asserts, whenever it reads it, that the tensor's version counter has not moved
since the handle was built (inference tensors, which have none, are not
checked). That assertion cannot fire through deepep-ops: an eager handle keeps
the caller's ``topk_idx`` and checks its version itself before any call reaches
DeepEP (:func:`deepep_ops.validation.check_routing_unchanged`: a clear
ValueError; inside ``torch.inference_mode()`` the eager path keeps a copy of
the ids, and DeepEP checks nothing), and a handle rebuilt from graph values
(:meth:`DeepEPBackend._native_handle`) is built right before the one DeepEP
call that reads it.

Hybrid mode (docs/deepep_contract.md §9, several nodes with DeepEP's
``allow_hybrid_mode``): the handle gains two tensors whose shapes depend on the
channel count C, which DeepEP computes in C++ from the device's shared memory,
the token layout and ``num_sms``. The fake kernels need C at trace time, so
:meth:`DeepEPBackend.num_channels` predicts it with DeepEP's formula and every
dispatch's handle confirms it; a mismatch, or a C that cannot be predicted, is
an error that names the switch turning hybrid mode off (never a wrong shape).
The ``num_sms`` of a dispatch fixes C, so combine and cached dispatch pass the
dispatch's own (:meth:`DeepEPBackend.num_sms`).
"""

from __future__ import annotations

import inspect
import operator
import sys
from typing import NamedTuple, Optional

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
            f"EPOpsBuffer: the DeepEP buffer's logical domain {num_scaleout} scale-out x {num_scaleup} scale-up "
            f"ranks does not make its {num_ranks} ranks"
        )
    return num_scaleout, num_scaleup


# ------------------------------------------------------------------ DeepEP's API generations
class DeepEPAPI(NamedTuple):
    """What differs, for our calls, between DeepEP's Python API generations:
    v2.1's ``ElasticBuffer`` and v2.5's ``EPBuffer`` (:func:`api_of` tells them
    apart by feature). Everything else we call (keywords, 5-tuple and 3-tuple
    returns, the 16-argument ``EPHandle``) is the same in both.

    Attributes:
        buffer_name: the buffer class's name, for messages.
        defer_epilogue: whether ``dispatch`` / ``combine`` take ``defer_epilogue=``
            (v2.5, ``deep_ep/buffers/ep.py`` at ff924ed8, :573-594 and :781-791):
            with it and ``async_with_compute_stream=True`` they return only an
            ``EventOverlap`` whose ``wait()`` returns what the call would have
            (dispatch: ``(recv_x, recv_topk_idx, recv_topk_weights, handle)``;
            combine: ``(combined_x, combined_topk_weights)``). The one flag the
            asynchronous dispatch/combine read; without it (v2.1, the reference)
            there is only ``async_with_compute_stream=True`` and the returned
            event (``dispatch_async`` / ``combine_async`` pass it where true).
        num_sms_alignment: how DeepEP rounds an explicit ``num_sms`` before it
            runs with it and stores it in the handle: 2 in v2.5 (``align(num_sms,
            2)``, ep.py:654 and :827), 1 (as given) in v2.1. Not a feature Python
            can see: it comes with v2.5's API (``defer_epilogue``).
        handle_copy: whether ``dispatch(do_handle_copy=True)`` is allowed (v2.1,
            its default) or asserts (v2.5, ep.py:649). We always pass False; only
            the benchmarks' raw DeepEP calls read this.
    """

    buffer_name: str
    defer_epilogue: bool
    num_sms_alignment: int
    handle_copy: bool


#: DeepEP v2.1's ``ElasticBuffer`` (dd758ca), and the reference buffer, which mimics it.
ELASTIC_BUFFER_API = DeepEPAPI("ElasticBuffer", defer_epilogue=False, num_sms_alignment=1, handle_copy=True)


def api_of(buffer_class: type) -> DeepEPAPI:
    """The :class:`DeepEPAPI` of a DeepEP buffer class, told by feature: v2.5's
    ``dispatch`` takes ``defer_epilogue``, v2.1's does not."""
    try:
        params = inspect.signature(buffer_class.dispatch).parameters
    except (AttributeError, TypeError, ValueError):  # no (inspectable) dispatch: v2.1's shape
        params = {}
    if "defer_epilogue" in params:
        return DeepEPAPI(buffer_class.__name__, defer_epilogue=True, num_sms_alignment=2, handle_copy=False)
    return ELASTIC_BUFFER_API._replace(buffer_name=buffer_class.__name__)


def handle_class_of(buffer_class: type) -> type:
    """The ``EPHandle`` class that goes with a DeepEP buffer class: the one of the
    module that defines the buffer (v2.1: ``deep_ep.buffers.elastic``, v2.5:
    ``deep_ep.buffers.ep``), else ``deep_ep.EPHandle``.

    Raises:
        TypeError: neither has one.
    """
    module = sys.modules.get(buffer_class.__module__)
    handle_class = getattr(module, "EPHandle", None)
    if handle_class is None:
        handle_class = getattr(sys.modules.get("deep_ep"), "EPHandle", None)
    if handle_class is None:
        raise TypeError(
            f"EPOpsBuffer: no EPHandle class beside {buffer_class.__module__}.{buffer_class.__qualname__} "
            "(looked in its module and in deep_ep); deepep-ops drives DeepEP v2.1 (ElasticBuffer) and v2.5 (EPBuffer)"
        )
    return handle_class


def installed_buffer_class() -> type:
    """The installed DeepEP's buffer class: ``deep_ep.EPBuffer`` (v2.5) where the
    package has it, else ``deep_ep.ElasticBuffer`` (v2.1).

    Raises:
        ImportError: ``deep_ep`` is not installed, or has neither class (DeepEP v1).
    """
    import deep_ep  # lazy: only where users built DeepEP v2

    for name in ("EPBuffer", "ElasticBuffer"):
        buffer_class = getattr(deep_ep, name, None)
        if buffer_class is not None:
            return buffer_class
    raise ImportError(
        f"deepep_ops needs DeepEP v2 (deep_ep.ElasticBuffer, v2.1, or deep_ep.EPBuffer, v2.5); the installed deep_ep "
        f"{getattr(deep_ep, '__version__', '(no __version__)')} has neither"
    )


def new_buffer(group: object, **kwargs: object) -> object:
    """A DeepEP buffer over ``group`` of whichever API the installed DeepEP has
    (:func:`installed_buffer_class`): ``EPBuffer(group, **kwargs)`` or
    ``ElasticBuffer(group, **kwargs)``. Give everything but the group by keyword:
    v2.1's third positional argument (``num_cpu_bytes``) is gone in v2.5.

    Raises:
        TypeError: a keyword the installed buffer does not take (named, with the
            DeepEP version), before anything is allocated.
    """
    buffer_class = installed_buffer_class()
    params = inspect.signature(buffer_class).parameters
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        version = getattr(sys.modules.get("deep_ep"), "__version__", "?")
        raise TypeError(
            f"new_buffer: deep_ep.{buffer_class.__name__} (DeepEP {version}) takes no {', '.join(unknown)}; "
            f"it takes {', '.join(n for n in params if n != 'group')}"
        )
    return buffer_class(group, **kwargs)


class DeepEPBackend(Backend):
    """Wraps an object with the API of DeepEP v2.1's ``ElasticBuffer`` or v2.5's ``EPBuffer``.

    Args:
        buffer: the ``ElasticBuffer`` / ``EPBuffer``.
        handle_class: its ``EPHandle`` class.
        topk_idx_dtype: ``deep_ep.topk_idx_t``.
        api: its :class:`DeepEPAPI` (:func:`api_of`); v2.1's by default.
        num_sms: the SMs every dispatch and combine runs on (DeepEP's
            ``num_sms``; rounded as ``api`` says), or None: DeepEP's
            ``get_theoretical_num_sms`` per (E, K), which is every SM of the GPU
            at R = 1 (no traffic to model). Fewer leave SMs to compute that runs
            beside the communication (the async ops' overlap, docs/overlap.md).

    Attributes:
        api: the :class:`DeepEPAPI`; ``api.defer_epilogue`` says whether the
            buffer's dispatch and combine take ``defer_epilogue=``.
    """

    #: DeepEP JIT-compiles its kernels per M, H, K, E, dtype and mode.
    needs_warmup = True

    def __init__(
        self, buffer: object, handle_class: type, topk_idx_dtype: torch.dtype, api: DeepEPAPI = ELASTIC_BUFFER_API,
        num_sms: Optional[int] = None,
    ) -> None:
        self.buffer = buffer
        self.handle_class = handle_class
        self.topk_idx_dtype = topk_idx_dtype
        self.api = api
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
        # (E, K) -> the num_sms every dispatch of (E, K) runs with (num_sms()). DeepEP
        # caches get_theoretical_num_sms too, but behind a weak-reference LRU that costs
        # more than a dict lookup; combine needs it every call.
        self._num_sms: dict = {}
        # Hybrid mode: (E, H, x element size, P, K) -> C predicted (or confirmed) for it.
        self._num_channels: dict = {}
        if num_sms is not None:
            check_num_sms(num_sms, _device_sm_count(buffer))
            a = api.num_sms_alignment
            self.fixed_num_sms = (num_sms + a - 1) // a * a

    def dispatch(self, args: DispatchArgs) -> DispatchOutput:
        recv, recv_topk_idx, recv_topk_weights, handle, _event = self._dispatch(args)
        return self._dispatch_output(args, recv, recv_topk_idx, recv_topk_weights, handle)

    def _dispatch(self, args: DispatchArgs, **extra):
        """``buffer.dispatch`` of validated ``args`` in DeepEP's words (``extra``: the async keywords)."""
        prefill = not args.decode  # DeepEP's do_expand / do_cpu_sync
        num_sms = self.num_sms(args.num_experts, args.topk_idx.shape[1])
        return self.buffer.dispatch(
            args.x if args.x_scales is None else (args.x, args.x_scales),
            topk_idx=args.topk_idx,
            topk_weights=args.topk_weights,
            num_experts=args.num_experts,
            num_max_tokens_per_rank=args.num_max_tokens_per_rank,
            expert_alignment=args.expert_alignment,
            # What num_sms=0 would pick, without DeepEP's per-call lookup; combine
            # and cached dispatch pass the same value (the handle's, below).
            num_sms=num_sms,
            # The graph keeps topk_idx alive until combine, which takes it as an input
            # (and v2.5 asserts False: its handles keep topk_idx by reference).
            do_handle_copy=False,
            do_cpu_sync=prefill,
            do_expand=prefill,
            # Zeroed padding rows keep garbage (NaN/Inf) out of expert compute.
            do_zero_padding=prefill,
            **extra,
        )

    def _dispatch_output(self, args: DispatchArgs, recv, recv_topk_idx, recv_topk_weights, handle) -> DispatchOutput:
        recv_x, recv_x_scales = recv if isinstance(recv, tuple) else (recv, None)
        if handle.num_sms != self.num_sms(args.num_experts, args.topk_idx.shape[1]):
            # DeepEP ran with another count than we passed (a rounding DeepEPAPI does not
            # know): graph handles must give combine and cached dispatch the count the
            # dispatch really used, so from now on pass DeepEP's own.
            self._num_sms[args.num_experts, args.topk_idx.shape[1]] = handle.num_sms
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
    # async_with_compute_stream=True (v2.1 and v2.5): the call launches its kernels on
    # DeepEP's communication stream and returns its (not yet valid) outputs with an
    # EventOverlap; the compute stream carries on, and the wait makes it wait for
    # the event (a stream join, legal inside one CUDA-graph capture) and runs the
    # hook DeepEP registered on it (the deterministic sort). Where the API has
    # defer_epilogue (v2.5, DeepEPAPI), the call returns only the event, whose
    # wait() runs the receiving epilogue and returns the results.
    def dispatch_async(self, args: DispatchArgs) -> "_Pending":
        if self.api.defer_epilogue:
            event = self._dispatch(args, async_with_compute_stream=True, defer_epilogue=True)
            return _Pending(lambda: self._dispatch_output(args, *event.wait()))
        recv, recv_topk_idx, recv_topk_weights, handle, event = self._dispatch(args, async_with_compute_stream=True)

        def received() -> DispatchOutput:
            event.current_stream_wait()
            return self._dispatch_output(args, recv, recv_topk_idx, recv_topk_weights, handle)

        return _Pending(received)

    def combine_async(self, x, handle) -> "_Pending":
        native = self.native_handle(handle)
        if self.api.defer_epilogue:
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
        """The SM count every dispatch of (E, K) runs with, and so the ``num_sms``
        of its handles: ``buffer.get_theoretical_num_sms(E, K)`` (what DeepEP's
        ``num_sms=0`` picks), rounded as DeepEP rounds an explicit count
        (:attr:`DeepEPAPI.num_sms_alignment`), computed once per (E, K) (and
        replaced by the handle's own if a dispatch ever ran with another).

        Combine and cached dispatch of a handle rebuilt from graph values pass
        this value: DeepEP's combine would otherwise use the rebuilt handle's, and
        its cached dispatch recomputes ``get_theoretical_num_sms`` before it reads
        ``num_experts`` from the handle (DeepEP PR #685, open: a TypeError with
        the default). In hybrid mode it fixes the channel count C, so a
        different value would not match the dispatch's handle tensors.
        """
        key = (num_experts, num_topk)
        num_sms = self._num_sms.get(key)
        if num_sms is None:
            num_sms = self.fixed_num_sms or self.buffer.get_theoretical_num_sms(num_experts, num_topk)
            a = self.api.num_sms_alignment
            num_sms = self._num_sms[key] = (num_sms + a - 1) // a * a
        return num_sms

    def handle_num_sms(self, handle: DispatchHandle) -> int:
        """The ``num_sms`` of ``handle``'s dispatch: its native ``EPHandle``'s when it
        carries one (an eager dispatch's), else :meth:`num_sms` of its (E, K)."""
        native = getattr(handle, "native", None)
        if native is not None:
            return native.num_sms
        return self.num_sms(handle.num_experts, handle.topk_idx.shape[1])

    def _native_handle(self, handle: DispatchHandle, per_expert_list: Optional[list] = None) -> object:
        """DeepEP's ``EPHandle`` with the fields combine reads (and, given
        ``per_expert_list``, those cached dispatch reads)."""
        return self.handle_class(
            not handle.decode,  # do_expand
            handle.num_experts,
            handle.expert_alignment,
            handle.num_max_tokens_per_rank,
            # The value dispatch ran with (what combine's num_sms=0 reads); hybrid mode needs it.
            self.handle_num_sms(handle),
            # v2.5's EPHandle records its version here and asserts it at its one read,
            # in the DeepEP call this handle is built for.
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
            # DeepEP (v2.1 dd758ca, v2.5 ff924ed8: PR #685, open) settles num_sms before it
            # takes num_experts from the handle (get_theoretical_num_sms(None, K) raises):
            # give both, as the forward had them. The dispatch's num_sms, not a recomputed
            # one: in hybrid mode it fixes the channel count of the handle's tensors.
            num_experts=handle.num_experts,
            num_sms=self.handle_num_sms(handle),
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


def check_num_sms(num_sms: object, device_sms: Optional[int]) -> None:
    """``num_sms`` must be an int in 1..``device_sms`` (None: no upper bound).

    Raises:
        TypeError / ValueError: naming ``num_sms``, the range and the value.
    """
    bound = "" if device_sms is None else f" and <= {device_sms} (this GPU's SMs)"
    if isinstance(num_sms, bool) or not isinstance(num_sms, int):
        raise TypeError(f"EPOpsBuffer: num_sms must be an int >= 1{bound} or None, got {num_sms!r}")
    if num_sms < 1 or (device_sms is not None and num_sms > device_sms):
        raise ValueError(f"EPOpsBuffer: num_sms must be >= 1{bound}, got {num_sms}")


def _device_sm_count(buffer: object) -> Optional[int]:
    """The SMs of the GPU a DeepEP buffer runs on (the current device, as DeepEP's
    own ``get_theoretical_num_sms`` reads it); None off CUDA (the reference buffer)."""
    if type(buffer).__module__.split(".")[0] != "deep_ep" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def from_object(obj: object, num_sms: Optional[int] = None) -> Optional[DeepEPBackend]:
    """A :class:`DeepEPBackend` for a DeepEP buffer (v2.1's ``deep_ep.ElasticBuffer``,
    v2.5's ``deep_ep.EPBuffer``: any object of a ``deep_ep`` class, its API told
    by :func:`api_of`), running on ``num_sms`` SMs (None: DeepEP's choice), else None."""
    buffer_class = type(obj)
    if buffer_class.__module__.split(".")[0] != "deep_ep":
        return None
    topk_idx_dtype = getattr(sys.modules.get("deep_ep"), "topk_idx_t", torch.int64)
    return DeepEPBackend(obj, handle_class_of(buffer_class), topk_idx_dtype, api_of(buffer_class), num_sms)
