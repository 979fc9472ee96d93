"""Stand-ins for DeepEP's Python API, v2.5 (``deep_ep.EPBuffer``) and v2.1
(``deep_ep.ElasticBuffer``), over the reference buffer: no real DeepEP here.

:func:`install` puts a fake ``deep_ep`` package into ``sys.modules`` (through
pytest's ``monkeypatch``, so it is gone after the test), with the modules and
names deepep-ops looks for: v2.5's ``deep_ep.EPBuffer`` / ``deep_ep.EPHandle``
in ``deep_ep.buffers.ep``, or v2.1's ``deep_ep.ElasticBuffer`` in
``deep_ep.buffers.elastic`` (with its ``EPHandle``), and ``topk_idx_t``.

v2.5's classes have its exact signatures, read from ``deepseek-ai/DeepEP``:
``deep_ep/buffers/ep.py`` at commit ff924ed808a56b0f1880f219a21916e41a5c99f7
(line numbers below), ``deep_ep/__init__.py`` with ``__version__ = '2.5.0'`` at
1a1ffbac1f9ba94e1f731f7647b5d6353fb38ade, ``deep_ep/utils/event.py`` at
def865146e95aa9ea223e277c0a8a4c6b81e5ac7. Their Python bodies follow ep.py's
where they decide something we depend on, and enforce its contract:

- ``dispatch(do_handle_copy=True)`` asserts (ep.py:649);
- ``EPHandle`` keeps ``topk_idx`` by reference and asserts its version counter
  is unchanged whenever it is read (ep.py:104-111; not for inference tensors),
  which cached dispatch (ep.py:653, :666) and every combine (ep.py:835) do;
- cached dispatch settles ``num_sms`` before it takes ``num_experts`` from the
  handle (ep.py:653-654 before :668; DeepEP PR #685, open): ``num_sms=0`` with
  ``handle=`` and no ``num_experts`` raises as DeepEP does (a TypeError from
  ``get_theoretical_num_sms(None, ...)``); an explicit ``num_sms`` is rounded up
  to even (``align(num_sms, 2)``, ep.py:654, and combine's :827);
- ``defer_epilogue=True`` returns only an ``EventOverlap`` whose ``wait()``
  returns the results (ep.py:761-764, :848-850; event.py:39-64), and needs
  ``async_with_compute_stream=True`` (the documented requirement, ep.py:634-635).

The data movement, which DeepEP's C++ runtime (``_C.EPBuffer``) does, is a
:class:`ReferenceRuntime` over :class:`deepep_ops.ReferenceElasticBuffer`,
which records the ``num_sms`` of every dispatch, cached dispatch and combine.
What the stand-ins cannot say: anything below the Python API (kernels, JIT,
events on streams, DeepEP's row order, which the reference fixes to the
deterministic one).

The stand-ins' only additions to DeepEP's API are class attributes a test sets:
:attr:`StandInBuffer.THEORETICAL_NUM_SMS` (what ``get_theoretical_num_sms``
answers; DeepEP computes it from the device), ``NUM_SCALEOUT_RANKS`` (the
simulated nodes; DeepEP reads its NVLink domain) and ``CHANNELS_PER_SM`` (hybrid
mode: C = num_sms · CHANNELS_PER_SM, so that a call with another ``num_sms`` than
its dispatch's fails, as DeepEP's channel-shaped handle tensors would); and
``group=None`` means world size 1 (DeepEP needs a process group).
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

from deepep_ops.reference.elastic import EPHandle as ReferenceHandle
from deepep_ops.reference.elastic import ReferenceElasticBuffer

#: The ten ``EPHandle`` constructor arguments after ``topk_idx``, in order (ep.py:64-79).
HANDLE_FIELDS_AFTER_TOPK_IDX = (
    "num_recv_tokens", "num_expanded_tokens", "num_recv_tokens_per_expert_list",
    "psum_num_recv_tokens_per_scaleup_rank", "psum_num_recv_tokens_per_expert",
    "num_unaligned_recv_tokens_per_expert", "recv_src_metadata", "dst_buffer_slot_idx",
    "token_metadata_at_forward", "channel_linked_list",
)


def _align(v: int, a: int) -> int:
    return (v + a - 1) // a * a


# ----------------------------------------------------------------------------- v2.5 classes
class EventHandle:
    """``deep_ep._C.EventHandle`` (CPU: nothing to wait for)."""

    __module__ = "deep_ep._C"

    def current_stream_wait(self) -> None:
        return None


class EventOverlap:
    """``deep_ep.utils.event.EventOverlap`` (event.py:8): ``current_stream_wait()``
    and ``wait()`` return the registered hook's result (event.py:39-64); one hook
    at most (event.py:66)."""

    __module__ = "deep_ep.utils.event"

    def __init__(self, event: Optional[EventHandle] = None,
                 extra_tensors: Optional[Tuple[torch.Tensor]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors
        self.hook_after_wait: Optional[Callable] = None

    def current_stream_wait(self, release_handle: bool = False) -> Any:
        assert self.event is not None
        self.event.current_stream_wait()
        hook, self.hook_after_wait = self.hook_after_wait, None
        result = hook() if hook is not None else None
        if release_handle:
            self.event = None
        return result

    def wait(self) -> Any:
        return self.current_stream_wait()

    def register_hook_after_wait(self, hook_after_wait: Callable) -> None:
        assert self.hook_after_wait is None, "a hook is already registered"
        self.hook_after_wait = hook_after_wait


class EPHandle:
    """``deep_ep.EPHandle`` (ep.py:27): the 16-argument constructor of v2.1's
    handle (ep.py:64-79), but ``topk_idx`` is kept by reference and read
    through a property that asserts its ``_version`` is unchanged (ep.py:104-111);
    inference-mode tensors are not checked."""

    __module__ = "deep_ep.buffers.ep"

    def __init__(self,
                 do_expand: bool,
                 num_experts: int, expert_alignment: int,
                 num_max_tokens_per_rank: int,
                 num_sms: int,
                 topk_idx: torch.Tensor,
                 num_recv_tokens: int,
                 num_expanded_tokens: int,
                 num_recv_tokens_per_expert_list: list,
                 psum_num_recv_tokens_per_scaleup_rank: torch.Tensor,
                 psum_num_recv_tokens_per_expert: torch.Tensor,
                 num_unaligned_recv_tokens_per_expert: torch.Tensor,
                 recv_src_metadata: torch.Tensor,
                 dst_buffer_slot_idx: torch.Tensor,
                 token_metadata_at_forward: Optional[torch.Tensor],
                 channel_linked_list: Optional[torch.Tensor]):
        assert topk_idx is not None
        self.do_expand = do_expand
        self.num_experts = num_experts
        self.expert_alignment = expert_alignment
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_sms = num_sms
        self.psum_num_recv_tokens_per_scaleup_rank = psum_num_recv_tokens_per_scaleup_rank
        self.psum_num_recv_tokens_per_expert = psum_num_recv_tokens_per_expert
        self.num_unaligned_recv_tokens_per_expert = num_unaligned_recv_tokens_per_expert
        self.num_recv_tokens_per_expert_list = num_recv_tokens_per_expert_list
        self.recv_src_metadata = recv_src_metadata
        self.dst_buffer_slot_idx = dst_buffer_slot_idx
        self.token_metadata_at_forward = token_metadata_at_forward
        self.channel_linked_list = channel_linked_list
        self.num_recv_tokens = num_recv_tokens
        self.num_expanded_tokens = num_expanded_tokens
        self.cached_recv_src_metadata_before_sort = None
        self._topk_idx = topk_idx
        self._topk_idx_version = None if topk_idx.is_inference() else topk_idx._version

    @property
    def topk_idx(self) -> torch.Tensor:
        assert self._topk_idx_version is None or self._topk_idx._version == self._topk_idx_version, \
            "`topk_idx` must not be modified while the EP handle is in use"
        return self._topk_idx


# ----------------------------------------------------------------------------- the runtime
class ReferenceRuntime:
    """The role of DeepEP's ``_C.EPBuffer``: the data movement, here by a
    :class:`ReferenceElasticBuffer`, and a record of every call's ``num_sms``.

    Attributes:
        calls: ``(op, num_sms)`` per call, op in ``"dispatch"``,
            ``"cached_dispatch"``, ``"combine"``.
    """

    def __init__(self, reference: ReferenceElasticBuffer, channels_per_sm: int) -> None:
        self.reference = reference
        self.channels_per_sm = channels_per_sm
        self.calls: List[Tuple[str, int]] = []

    def _at(self, op: str, num_sms: int) -> None:
        self.calls.append((op, num_sms))
        if self.reference.num_scaleout_ranks > 1:
            # DeepEP's C = num_sms x channels per SM: the reference checks a handle's
            # channel count against this at cached dispatch and combine.
            self.reference.num_channels = num_sms * self.channels_per_sm

    @staticmethod
    def reference_handle(handle: object, topk_idx: torch.Tensor) -> ReferenceHandle:
        return ReferenceHandle(handle.do_expand, handle.num_experts, handle.expert_alignment,
                               handle.num_max_tokens_per_rank, handle.num_sms, topk_idx,
                               *(getattr(handle, f) for f in HANDLE_FIELDS_AFTER_TOPK_IDX))

    def dispatch(self, x, sf, topk_idx, topk_weights, handle, num_max_tokens_per_rank, num_experts,
                 expert_alignment, num_sms, do_cpu_sync, do_expand, do_zero_padding, deferred: bool) -> tuple:
        """``(result, event, deferred_epilogue)`` as ``_C.EPBuffer.dispatch`` (ep.py:690-713):
        ``result`` = ``(recv_x, recv_sf, recv_topk_idx, recv_topk_weights, *the ten
        handle fields)``, or None and a callable that makes it."""
        payload = x if sf is None else (x, sf)
        if handle is not None:
            self._at("cached_dispatch", num_sms)
            recv, _, _, _, _ = self.reference.dispatch(
                payload, handle=self.reference_handle(handle, topk_idx), topk_weights=topk_weights,
                num_sms=num_sms, do_handle_copy=False, do_cpu_sync=False, do_expand=do_expand,
                do_zero_padding=do_zero_padding)
            recv_x, recv_sf = recv if isinstance(recv, tuple) else (recv, None)
            result = (recv_x, recv_sf, None, None) + tuple(getattr(handle, f) for f in HANDLE_FIELDS_AFTER_TOPK_IDX)
        else:
            self._at("dispatch", num_sms)
            recv, recv_topk_idx, recv_topk_weights, h, _ = self.reference.dispatch(
                payload, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=num_experts,
                num_max_tokens_per_rank=num_max_tokens_per_rank, expert_alignment=expert_alignment,
                num_sms=num_sms, do_handle_copy=False, do_cpu_sync=do_cpu_sync, do_expand=do_expand,
                do_zero_padding=do_zero_padding)
            recv_x, recv_sf = recv if isinstance(recv, tuple) else (recv, None)
            result = (recv_x, recv_sf, recv_topk_idx, recv_topk_weights) + tuple(
                getattr(h, f) for f in HANDLE_FIELDS_AFTER_TOPK_IDX)
        return (None, EventHandle(), lambda: result) if deferred else (result, EventHandle(), None)

    def combine(self, x, topk_weights, bias, handle, topk_idx, num_sms, deferred: bool) -> tuple:
        """``(result, event, deferred_epilogue)`` as ``_C.EPBuffer.combine`` (ep.py:832-846):
        ``result`` = ``(combined_x, combined_topk_weights)``."""
        self._at("combine", num_sms)
        combined_x, combined_topk_weights, _ = self.reference.combine(
            x, self.reference_handle(handle, topk_idx), topk_weights=topk_weights, bias=bias, num_sms=num_sms)
        result = (combined_x, combined_topk_weights)
        return (None, EventHandle(), lambda: result) if deferred else (result, EventHandle(), None)


class StandInBuffer:
    """What both stand-in buffers share: the simulated device and domain."""

    #: What ``get_theoretical_num_sms`` answers (DeepEP: a bandwidth model of the device).
    THEORETICAL_NUM_SMS = 24
    #: The simulated nodes S (DeepEP reads them off its NVLink domain).
    NUM_SCALEOUT_RANKS = 1
    #: Hybrid mode: C = num_sms x this.
    CHANNELS_PER_SM = 1

    def _make_runtime(self, group, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch, allow_hybrid_mode,
                      allow_multiple_reduction, prefer_overlap_with_compute) -> ReferenceRuntime:
        reference = ReferenceElasticBuffer(
            group, num_max_tokens_per_rank=num_max_tokens_per_rank, hidden=hidden, num_topk=num_topk,
            use_fp8_dispatch=use_fp8_dispatch, allow_hybrid_mode=allow_hybrid_mode,
            allow_multiple_reduction=allow_multiple_reduction, prefer_overlap_with_compute=prefer_overlap_with_compute,
            num_scaleout_ranks=self.NUM_SCALEOUT_RANKS)
        self.rank_idx, self.num_ranks = reference.rank_idx, reference.num_ranks
        self.num_scaleout_ranks, self.num_scaleup_ranks = reference.get_logical_domain_size()
        self.num_rdma_ranks, self.num_nvlink_ranks = reference.get_physical_domain_size()
        self.scaleout_rank_idx = self.rank_idx // self.num_scaleup_ranks
        self.scaleup_rank_idx = self.rank_idx % self.num_scaleup_ranks
        return ReferenceRuntime(reference, self.CHANNELS_PER_SM)

    def get_logical_domain_size(self) -> Tuple[int, int]:
        return self.num_scaleout_ranks, self.num_scaleup_ranks

    def get_physical_domain_size(self) -> Tuple[int, int]:
        return self.num_rdma_ranks, self.num_nvlink_ranks


class EPBuffer(StandInBuffer):
    """``deep_ep.EPBuffer`` (ep.py:208; a ``BufferBase`` subclass there), its Python level."""

    __module__ = "deep_ep.buffers.ep"

    def __init__(self,
                 group,
                 num_bytes: Optional[int] = None,
                 num_max_tokens_per_rank: int = 0,
                 hidden: int = 0,
                 num_topk: int = 0,
                 use_fp8_dispatch: bool = False,
                 lb_allocation_plan_or_num_bytes: Union[Any, int] = 0,
                 deterministic: bool = False,
                 allow_hybrid_mode: bool = True,
                 allow_multiple_reduction: bool = True,
                 prefer_overlap_with_compute: bool = True,
                 sl_idx: Optional[int] = None,
                 num_allocated_qps: int = 0,
                 num_cpu_timeout_secs: int = 300, num_gpu_timeout_secs: int = 100,
                 explicitly_destroy: bool = False):
        # ep.py:242-261 (v2.1's ElasticBuffer had `num_cpu_bytes` third, positionally).
        self.group = group
        self.allow_hybrid_mode = allow_hybrid_mode
        self.allow_multiple_reduction = allow_multiple_reduction
        self.prefer_overlap_with_compute = prefer_overlap_with_compute
        self.deterministic = deterministic
        self.num_bytes = num_bytes
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_allocated_qps = num_allocated_qps or (65 if allow_hybrid_mode else 17)
        self.explicitly_destroy = explicitly_destroy
        self.runtime = self._make_runtime(group, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch,
                                          allow_hybrid_mode, allow_multiple_reduction, prefer_overlap_with_compute)

    def destroy(self) -> None:  # ep.py:365
        self.runtime = None

    @staticmethod
    def capture() -> EventHandle:
        return EventHandle()

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int,
                                num_scaleout_topk: int = 0,
                                rdma_gbs: float = 0, nvlink_gbs: float = 0,
                                sm_read_gbs: float = 0, sm_write_gbs: float = 0) -> int:  # ep.py:430-431
        # DeepEP's model starts with `num_experts % num_groups` (get_expected_topk): None raises TypeError.
        assert num_experts % self.num_ranks == 0
        return self.THEORETICAL_NUM_SMS

    def get_theoretical_num_qps(self, num_sms: int) -> int:  # ep.py:554
        num_qps = num_sms * 16 + 1 if self.allow_hybrid_mode else min(num_sms, 8 + 1)
        return min(num_qps, self.num_allocated_qps)

    def dispatch(self,
                 x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
                 topk_idx: Optional[torch.Tensor] = None,
                 topk_weights: Optional[torch.Tensor] = None,
                 cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                 num_experts: Optional[int] = None,
                 num_max_tokens_per_rank: Optional[int] = None,
                 expert_alignment: Optional[int] = None,
                 num_sms: int = 0, num_qps: int = 0,
                 previous_event: Optional[EventHandle] = None,
                 async_with_compute_stream: bool = False,
                 allocate_on_comm_stream: bool = False,
                 handle: Optional[EPHandle] = None,
                 do_handle_copy: bool = False,
                 do_cpu_sync: Optional[bool] = None,
                 do_expand: bool = False,
                 do_zero_padding: bool = False,
                 use_tma_aligned_col_major_sf: bool = False,
                 defer_epilogue: bool = False) \
            -> Union[Tuple[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
                           Optional[torch.Tensor], Optional[torch.Tensor],
                           EPHandle, EventOverlap], EventOverlap]:  # ep.py:573-594
        assert not do_handle_copy, "`do_handle_copy` must be False; handle copying is no longer supported"  # :649
        assert not defer_epilogue or async_with_compute_stream, "`defer_epilogue` requires `async_with_compute_stream`"
        # ep.py:652-655: SM and QP counts first, before a cached handle fills num_experts in.
        num_topk = (handle.topk_idx if topk_idx is None else topk_idx).shape[1]
        num_sms = self.get_theoretical_num_sms(num_experts, num_topk) if num_sms == 0 else _align(num_sms, 2)
        num_qps = self.get_theoretical_num_qps(num_sms) if num_qps == 0 else num_qps
        assert num_qps <= self.num_allocated_qps, "Allocated QPs are not enough"
        x, sf = x if isinstance(x, tuple) else (x, None)
        if handle is not None:  # ep.py:663-676
            assert topk_idx is None
            assert do_cpu_sync is None or not do_cpu_sync, "Cannot do CPU sync with cached handle"
            topk_idx = handle.topk_idx
            num_max_tokens_per_rank = handle.num_max_tokens_per_rank if num_max_tokens_per_rank is None \
                else num_max_tokens_per_rank
            num_experts = handle.num_experts if num_experts is None else num_experts
            expert_alignment = handle.expert_alignment if expert_alignment is None else expert_alignment
            do_cpu_sync = False
            assert (num_experts, expert_alignment, num_max_tokens_per_rank) == \
                (handle.num_experts, handle.expert_alignment, handle.num_max_tokens_per_rank)
        num_max_tokens_per_rank = self.num_max_tokens_per_rank if num_max_tokens_per_rank is None \
            else num_max_tokens_per_rank
        expert_alignment = 1 if expert_alignment is None else expert_alignment
        do_cpu_sync = True if do_cpu_sync is None else do_cpu_sync
        result, event, deferred_epilogue = self.runtime.dispatch(
            x, sf, topk_idx, topk_weights, handle, num_max_tokens_per_rank, num_experts, expert_alignment,
            num_sms, do_cpu_sync, do_expand, do_zero_padding, defer_epilogue)
        event_overlap = EventOverlap(event)

        def finalize_dispatch(r: tuple):  # ep.py:715-759 (the deterministic sort: the reference's order)
            recv_x, recv_sf, recv_topk_idx, recv_topk_weights, *fields = r
            new = handle if handle is not None else EPHandle(
                do_expand, num_experts, expert_alignment, num_max_tokens_per_rank, num_sms, topk_idx, *fields)
            return ((recv_x, recv_sf) if recv_sf is not None else recv_x), recv_topk_idx, recv_topk_weights, new

        if deferred_epilogue is not None:  # ep.py:761-764
            event_overlap.register_hook_after_wait(lambda: finalize_dispatch(deferred_epilogue()))
            return event_overlap
        assert result is not None
        return (*finalize_dispatch(result), event_overlap)  # ep.py:768

    def combine(self,
                x: torch.Tensor,
                handle: EPHandle,
                topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]] = None,
                num_sms: int = 0, num_qps: int = 0,
                previous_event: EventHandle = None,
                async_with_compute_stream: bool = False,
                allocate_on_comm_stream: bool = False,
                defer_epilogue: bool = False) \
            -> Union[Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap], EventOverlap]:  # ep.py:781-791
        assert not defer_epilogue or async_with_compute_stream, "`defer_epilogue` requires `async_with_compute_stream`"
        num_sms = handle.num_sms if num_sms == 0 else _align(num_sms, 2)  # ep.py:827
        num_qps = self.get_theoretical_num_qps(num_sms) if num_qps == 0 else num_qps
        assert num_qps <= self.num_allocated_qps, "Allocated QPs are not enough"
        # ep.py:835: handle.topk_idx is read (and version-checked) on every combine.
        result, event, deferred_epilogue = self.runtime.combine(
            x, topk_weights, bias, handle, handle.topk_idx, num_sms, defer_epilogue)
        event_overlap = EventOverlap(event)
        if deferred_epilogue is not None:  # ep.py:848-850
            event_overlap.register_hook_after_wait(deferred_epilogue)
            return event_overlap
        assert result is not None
        combined_x, combined_topk_weights = result
        return combined_x, combined_topk_weights, event_overlap  # ep.py:854

    def lb_prefetch_weights(self, redundant_expert_weights: Union[Sequence[torch.Tensor], torch.Tensor],
                            expert_weights: Union[Sequence[torch.Tensor], torch.Tensor],
                            redundancy_mapping: torch.Tensor, num_sms: int = 0,
                            previous_event: Optional[EventHandle] = None) -> EventOverlap:
        raise NotImplementedError("v2.5's load-balance region: not used by deepep-ops")


# ----------------------------------------------------------------------------- v2.1
class ElasticBuffer(StandInBuffer):
    """DeepEP v2.1's ``deep_ep.ElasticBuffer`` (dd758ca) over the same runtime: the
    reference buffer's API, which is v2.1's (``do_handle_copy=True`` by default,
    ``previous_event_before_epilogue``, ``num_cpu_bytes``, no ``defer_epilogue``),
    an explicit ``num_sms`` used as given, and v2.1's handle (the reference's
    ``EPHandle``: the same 16-argument constructor, ``topk_idx`` a plain attribute)."""

    __module__ = "deep_ep.buffers.elastic"

    def __init__(self, group, num_bytes: Optional[int] = None, num_cpu_bytes: int = 0,
                 num_max_tokens_per_rank: int = 0, hidden: int = 0, num_topk: int = 0,
                 use_fp8_dispatch: bool = False, deterministic: bool = False, allow_hybrid_mode: bool = True,
                 allow_multiple_reduction: bool = True, prefer_overlap_with_compute: bool = True,
                 explicitly_destroy: bool = False):
        self.group = group
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.hidden = hidden
        self.prefer_overlap_with_compute = prefer_overlap_with_compute
        self.runtime = self._make_runtime(group, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch,
                                          allow_hybrid_mode, allow_multiple_reduction, prefer_overlap_with_compute)

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int) -> int:
        assert num_experts % self.num_ranks == 0  # as v2.5's: None raises TypeError (PR #685)
        return self.THEORETICAL_NUM_SMS

    def dispatch(self, x, topk_idx=None, topk_weights=None, cumulative_local_expert_recv_stats=None, num_experts=None,
                 num_max_tokens_per_rank=None, expert_alignment=None, num_sms: int = 0, num_qps: int = 0,
                 previous_event=None, previous_event_before_epilogue=None, async_with_compute_stream: bool = False,
                 allocate_on_comm_stream: bool = False, handle=None, do_handle_copy: bool = True,
                 do_cpu_sync=None, do_expand: bool = False, do_zero_padding: bool = False,
                 use_tma_aligned_col_major_sf: bool = False):
        num_topk = (handle.topk_idx if topk_idx is None else topk_idx).shape[1]
        num_sms = self.get_theoretical_num_sms(num_experts, num_topk) if num_sms == 0 else num_sms
        self.runtime._at("dispatch" if handle is None else "cached_dispatch", num_sms)
        return self.runtime.reference.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=num_experts,
            num_max_tokens_per_rank=num_max_tokens_per_rank, expert_alignment=expert_alignment, num_sms=num_sms,
            handle=handle, do_handle_copy=do_handle_copy, do_cpu_sync=do_cpu_sync, do_expand=do_expand,
            do_zero_padding=do_zero_padding)

    def combine(self, x, handle, topk_weights=None, bias=None, num_sms: int = 0, num_qps: int = 0,
                previous_event=None, previous_event_before_epilogue=None, async_with_compute_stream: bool = False,
                allocate_on_comm_stream: bool = False):
        num_sms = handle.num_sms if num_sms == 0 else num_sms
        self.runtime._at("combine", num_sms)
        return self.runtime.reference.combine(x, handle, topk_weights=topk_weights, bias=bias, num_sms=num_sms)


# ----------------------------------------------------------------------------- the fake package
def _module(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def package(version: str) -> dict:
    """``{module name: module}`` of a fake ``deep_ep``: ``"2.5"`` or ``"2.1"``; each
    submodule is also an attribute of its parent, as after an import."""
    modules = _modules(version)
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    return modules


def _modules(version: str) -> dict:
    if version == "2.5":
        ep = _module("deep_ep.buffers.ep", EPBuffer=EPBuffer, EPHandle=EPHandle)
        event = _module("deep_ep.utils.event", EventOverlap=EventOverlap)
        return {
            "deep_ep": _module("deep_ep", __version__="2.5.0", EPBuffer=EPBuffer, EPHandle=EPHandle,
                               EventOverlap=EventOverlap, EventHandle=EventHandle, topk_idx_t=torch.int64),
            "deep_ep._C": _module("deep_ep._C", EventHandle=EventHandle),
            "deep_ep.buffers": _module("deep_ep.buffers"),
            "deep_ep.buffers.ep": ep,
            "deep_ep.utils": _module("deep_ep.utils"),
            "deep_ep.utils.event": event,
        }
    if version == "2.1":
        elastic = _module("deep_ep.buffers.elastic", ElasticBuffer=ElasticBuffer, EPHandle=ReferenceHandle)
        return {
            "deep_ep": _module("deep_ep", __version__="2.1.0", ElasticBuffer=ElasticBuffer, topk_idx_t=torch.int64),
            "deep_ep.buffers": _module("deep_ep.buffers"),
            "deep_ep.buffers.elastic": elastic,
        }
    raise ValueError(f"no stand-in for DeepEP {version!r}")


def install(monkeypatch, version: str = "2.5") -> types.ModuleType:
    """Put the fake ``deep_ep`` of ``version`` into ``sys.modules`` for this test
    (any real or earlier one is hidden); returns the ``deep_ep`` module."""
    for name in [n for n in sys.modules if n == "deep_ep" or n.startswith("deep_ep.")]:
        monkeypatch.delitem(sys.modules, name)
    for name, module in package(version).items():
        monkeypatch.setitem(sys.modules, name, module)
    return sys.modules["deep_ep"]
