"""DRAFT (not wired up, not collected by pytest): a stand-in with DeepEP v2.5's Python API.

For the lead's backend work (issue 29, item 3). The signatures are DeepEP
v2.5's, read from ``deepseek-ai/DeepEP`` (``deep_ep/buffers/ep.py`` at commit
ff924ed808a56b0f1880f219a21916e41a5c99f7; ``deep_ep/__init__.py`` with
``__version__ = '2.5.0'`` at 1a1ffbac1f9ba94e1f731f7647b5d6353fb38ade;
``deep_ep/utils/event.py`` at def865146e95aa9ea223e277c0a8a4c6b81e5ac7). The
bodies are ours: they model the Python-level contract only (which arguments
are required, what is returned when, the ``topk_idx`` version check, the
deferred epilogue, the cached-dispatch ``num_sms`` order of PR #685) and hand
the data movement to a ``runtime`` object, the role DeepEP's ``_C.EPBuffer``
plays, which a test supplies (e.g. over the reference buffer). Line numbers in
the comments are ep.py@ff924ed8.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch


class EventHandle:
    """Stand-in for ``deep_ep._C.EventHandle`` (CPU: nothing to wait for)."""

    def current_stream_wait(self) -> None:
        return None


class EventOverlap:
    """``deep_ep.utils.event.EventOverlap`` (event.py:8): ``current_stream_wait()``
    and ``wait()`` return the registered hook's result (event.py:39-64); one hook
    at most (event.py:66)."""

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
    handle (ep.py:64-79), but ``topk_idx`` is kept by reference (no clone) and
    read through a property that asserts its ``_version`` is unchanged
    (ep.py:104-111); inference-mode tensors are not checked."""

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
        unchanged = self._topk_idx_version is None or self._topk_idx._version == self._topk_idx_version
        assert unchanged, "`topk_idx` must not be modified while the EP handle is in use"
        return self._topk_idx


class EPBuffer:
    """``deep_ep.EPBuffer`` (ep.py:208; ``BufferBase`` subclass), Python level.

    ``runtime`` (ours, keyword-only, not DeepEP's) does the data movement in
    place of ``_C.EPBuffer`` (ep.py:690-713, ep.py:832-846), with a shorter
    argument list (the handle itself instead of its unpacked fields, see the
    calls below); like ``_C.EPBuffer`` it returns ``(result, event,
    deferred_epilogue)``: with ``defer_epilogue`` the result is None and
    ``deferred_epilogue()`` produces it. Dispatch's result is ``(recv_x, recv_sf,
    recv_topk_idx, recv_topk_weights, *the 10 remaining EPHandle fields in
    constructor order)``, combine's ``(combined_x, combined_topk_weights)``.
    """

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
                 explicitly_destroy: bool = False,
                 *, runtime: Any = None, num_sms: int = 24):
        # ep.py:242-261. v2.1's ElasticBuffer had `num_cpu_bytes` after `num_bytes`
        # (positional!) and `sl_idx: int = 3`; v2.5 has `lb_allocation_plan_or_num_bytes`.
        self.group = group
        self.rank_idx = group.rank() if group is not None else 0
        self.num_ranks = group.size() if group is not None else 1
        self.num_bytes = num_bytes
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.deterministic = deterministic
        self.allow_hybrid_mode = allow_hybrid_mode
        self.num_allocated_qps = num_allocated_qps or (65 if allow_hybrid_mode else 17)
        self.runtime = runtime
        self._num_sms = num_sms  # what get_theoretical_num_sms answers here

    def destroy(self) -> None:  # ep.py:365
        self.runtime = None

    @staticmethod
    def get_buffer_size_hint(group, num_max_tokens_per_rank: int, hidden: int,
                             num_topk: int = 0, use_fp8_dispatch: bool = False,
                             allow_hybrid_mode: bool = True,
                             allow_multiple_reduction: bool = True) -> int:  # ep.py:374
        raise NotImplementedError

    @staticmethod
    def capture() -> EventHandle:
        return EventHandle()

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int,
                                num_scaleout_topk: int = 0,
                                rdma_gbs: float = 0, nvlink_gbs: float = 0,
                                sm_read_gbs: float = 0, sm_write_gbs: float = 0) -> int:  # ep.py:430-431
        # DeepEP's model starts with `num_experts % num_groups` (a TypeError for None).
        if not isinstance(num_experts, int) or not isinstance(num_topk, int):
            raise TypeError(f"unsupported operand type(s) for %: {type(num_experts).__name__!r} and 'int'")
        return self._num_sms

    def get_theoretical_num_qps(self, num_sms: int) -> int:  # ep.py:554
        return min(num_sms * 16 + 1 if self.allow_hybrid_mode else min(num_sms, 9), self.num_allocated_qps)

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
        # ep.py:649: handle copies are gone.
        assert not do_handle_copy, "`do_handle_copy` must be False; handle copying is no longer supported"
        # ep.py:653-654: the SM count is settled *before* a cached handle fills in
        # num_experts (ep.py:668): num_sms=0 with handle= and no num_experts raises
        # (PR #685, open); a given num_sms is used as is (rounded up to even), not
        # the handle's.
        num_topk = (handle.topk_idx if topk_idx is None else topk_idx).shape[1]
        num_sms = self.get_theoretical_num_sms(num_experts, num_topk) if num_sms == 0 else num_sms + num_sms % 2
        num_qps = num_qps or self.get_theoretical_num_qps(num_sms)
        x, sf = x if isinstance(x, tuple) else (x, None)
        if handle is not None:  # ep.py:663-674
            assert topk_idx is None
            assert do_cpu_sync is None or not do_cpu_sync, "Cannot do CPU sync with cached handle"
            topk_idx = handle.topk_idx  # the version check runs here
            num_max_tokens_per_rank = handle.num_max_tokens_per_rank if num_max_tokens_per_rank is None \
                else num_max_tokens_per_rank
            num_experts = handle.num_experts if num_experts is None else num_experts
            expert_alignment = handle.expert_alignment if expert_alignment is None else expert_alignment
            do_cpu_sync = False
            assert (num_experts, expert_alignment, num_max_tokens_per_rank) == \
                (handle.num_experts, handle.expert_alignment, handle.num_max_tokens_per_rank)
        if num_max_tokens_per_rank is None:
            num_max_tokens_per_rank = self.num_max_tokens_per_rank
        expert_alignment = 1 if expert_alignment is None else expert_alignment
        do_cpu_sync = True if do_cpu_sync is None else do_cpu_sync
        result, event, deferred = self.runtime.dispatch(
            x, sf, topk_idx, topk_weights, cumulative_local_expert_recv_stats, handle,
            num_max_tokens_per_rank, num_experts, expert_alignment, num_sms, num_qps, previous_event,
            async_with_compute_stream, allocate_on_comm_stream, do_cpu_sync, do_expand, do_zero_padding,
            use_tma_aligned_col_major_sf, defer_epilogue)
        overlap = EventOverlap(event)

        def finish(r: tuple):
            # r: (recv_x, recv_sf, recv_topk_idx, recv_topk_weights, *the 10 handle fields) (ep.py:715-726)
            recv_x, recv_sf, recv_topk_idx, recv_topk_weights, *fields = r
            new = handle if handle is not None else EPHandle(
                do_expand, num_experts, expert_alignment, num_max_tokens_per_rank, num_sms, topk_idx, *fields)
            return ((recv_x, recv_sf) if recv_sf is not None else recv_x), recv_topk_idx, recv_topk_weights, new

        if deferred is not None:  # ep.py:761-764: only the event; wait() gives the 4 results
            overlap.register_hook_after_wait(lambda: finish(deferred()))
            return overlap
        assert result is not None
        return (*finish(result), overlap)  # ep.py:768

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
        num_sms = handle.num_sms if num_sms == 0 else num_sms + num_sms % 2  # ep.py:827
        num_qps = num_qps or self.get_theoretical_num_qps(num_sms)
        # ep.py:835: handle.topk_idx is read (and version-checked) on every combine.
        result, event, deferred = self.runtime.combine(
            x, topk_weights, bias, handle, handle.topk_idx, num_sms, num_qps, previous_event,
            async_with_compute_stream, allocate_on_comm_stream, defer_epilogue)
        overlap = EventOverlap(event)
        if deferred is not None:  # ep.py:848-850: wait() gives (combined_x, combined_topk_weights)
            overlap.register_hook_after_wait(deferred)
            return overlap
        assert result is not None
        combined_x, combined_topk_weights = result
        return combined_x, combined_topk_weights, overlap  # ep.py:854

    def lb_prefetch_weights(self, redundant_expert_weights: Union[Sequence[torch.Tensor], torch.Tensor],
                            expert_weights: Union[Sequence[torch.Tensor], torch.Tensor],
                            redundancy_mapping: torch.Tensor, num_sms: int = 0,
                            previous_event: Optional[EventHandle] = None) -> EventOverlap:
        raise NotImplementedError  # v2.5 load-balance region; not used by deepep-ops

    def lb_reduce_grads(self, redundant_expert_grads: torch.Tensor, expert_grads: torch.Tensor,
                        redundancy_mapping: torch.Tensor, num_sms: int = 0,
                        previous_event: Optional[EventHandle] = None) -> EventOverlap:
        raise NotImplementedError
