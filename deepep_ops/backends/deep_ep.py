"""Real DeepEP v2: :class:`DeepEPBackend` over ``deep_ep.ElasticBuffer``.

The only module that knows DeepEP's call keywords, its 5-tuple returns, the
16-argument ``EPHandle`` constructor and ``get_theoretical_num_sms``. ``deep_ep``
is imported lazily: nothing here runs unless a DeepEP buffer is wrapped.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.distributed

from deepep_ops.backends.base import Backend, DispatchOutput
from deepep_ops.handle import HANDLE_TENSORS, DispatchHandle

#: The five int32 handle tensors off a native ``EPHandle``, in one C call.
_handle_tensors = operator.attrgetter(*HANDLE_TENSORS)
#: Their slice of a :class:`DispatchHandle`.
_FIRST = DispatchHandle._fields.index(HANDLE_TENSORS[0])
_HANDLE_TENSOR_SLICE = slice(_FIRST, _FIRST + len(HANDLE_TENSORS))
_new_tuple = tuple.__new__


class DeepEPBackend(Backend):
    """Wraps an object with ``deep_ep.ElasticBuffer``'s API.

    Args:
        buffer: the ``ElasticBuffer``.
        handle_class: its ``EPHandle`` class.
        topk_idx_dtype: ``deep_ep.topk_idx_t``.
    """

    def __init__(self, buffer: object, handle_class: type, topk_idx_dtype: torch.dtype) -> None:
        self.buffer = buffer
        self.handle_class = handle_class
        self.topk_idx_dtype = topk_idx_dtype
        self.num_ranks = buffer.num_ranks
        self.rank = buffer.rank_idx
        self.capacity = buffer.num_max_tokens_per_rank
        # (E, K) -> get_theoretical_num_sms(E, K). DeepEP caches it too, but behind a
        # weak-reference LRU that costs a few µs a call; combine needs it every call.
        self._num_sms: dict = {}

    def dispatch(self, x, x_scales, topk_idx, topk_weights, *, num_experts, num_max_tokens_per_rank,
                 expert_alignment, expand) -> DispatchOutput:
        recv, recv_topk_idx, recv_topk_weights, handle, _event = self.buffer.dispatch(
            x if x_scales is None else (x, x_scales),
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            num_experts=num_experts,
            num_max_tokens_per_rank=num_max_tokens_per_rank,
            expert_alignment=expert_alignment,
            # What num_sms=0 would pick, without DeepEP's per-call lookup; combine
            # passes the same value through the handle.
            num_sms=self.num_sms(num_experts, topk_idx.shape[1]),
            # The graph keeps topk_idx alive until combine, which takes it as an input.
            do_handle_copy=False,
            do_cpu_sync=expand,
            do_expand=expand,
            # Zeroed padding rows keep garbage (NaN/Inf) out of expert compute.
            do_zero_padding=expand,
        )
        recv_x, recv_x_scales = recv if isinstance(recv, tuple) else (recv, None)
        # tuple.__new__: the NamedTuple without its Python __new__ (eager dispatch's hot path).
        return _new_tuple(DispatchOutput, (
            recv_x,
            recv_x_scales,
            None if expand else recv_topk_idx,
            recv_topk_weights,
            _handle_tensors(handle),
            handle,
        ))

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
            handle.do_expand,
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
            *handle[_HANDLE_TENSOR_SLICE],
            None,  # token_metadata_at_forward: hybrid mode only
            None,  # channel_linked_list: hybrid mode only
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

    def all_gather_object(self, obj: object) -> Optional[list]:
        """Over the buffer's ``group`` (DeepEP and the reference buffer keep their
        process group there); None without one."""
        if self.num_ranks == 1:
            return [obj]
        group = getattr(self.buffer, "group", None)
        if group is None:
            return None
        out = [None] * self.num_ranks
        torch.distributed.all_gather_object(out, obj, group=group)
        return out

    def all_gather_ints(self, values: tuple) -> Optional[list]:
        if self.num_ranks == 1:
            return [tuple(values)]
        group = getattr(self.buffer, "group", None)
        if group is None:
            return None
        # NCCL moves device tensors only; gloo host tensors.
        nccl = torch.distributed.get_backend(group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        mine = torch.tensor(values, dtype=torch.int64, device=device)
        out = [torch.empty_like(mine) for _ in range(self.num_ranks)]
        torch.distributed.all_gather(out, mine, group=group)
        return [tuple(t.tolist()) for t in out]


    def cached_dispatch(self, x, x_scales, handle):
        per_expert_list = []
        if handle.do_expand:
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
            # DeepEP does not check do_expand against the handle's (spec §1): pass the handle's.
            do_expand=handle.do_expand,
            do_zero_padding=handle.do_expand,
        )
        return recv if isinstance(recv, tuple) else (recv, None)

    def combine_with_weights(self, x, topk_weights, handle):
        combined_x, combined_weights, _event = self.buffer.combine(
            x, handle=self._native_handle(handle), topk_weights=topk_weights
        )
        return combined_x, combined_weights


def from_object(obj: object) -> Optional[DeepEPBackend]:
    """A :class:`DeepEPBackend` for a ``deep_ep.ElasticBuffer``, else None."""
    if type(obj).__module__.split(".")[0] != "deep_ep":
        return None
    import deep_ep
    from deep_ep.buffers.elastic import EPHandle

    return DeepEPBackend(obj, EPHandle, getattr(deep_ep, "topk_idx_t", torch.int64))
