"""Real DeepEP v2: :class:`DeepEPBackend` over ``deep_ep.ElasticBuffer``.

The only module that knows DeepEP's call keywords (``do_expand``,
``do_cpu_sync``, ...: the mode's DeepEP spelling), its 5-tuple returns, the
16-argument ``EPHandle`` constructor and ``get_theoretical_num_sms``. ``deep_ep``
is imported lazily: nothing here runs unless a DeepEP buffer is wrapped.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch

from deepep_ops.backends.base import Backend, DispatchOutput
from deepep_ops.handle import HANDLE_TENSOR_FIELDS, HANDLE_TENSORS, DispatchArgs, DispatchHandle

#: The five int32 handle tensors off a native ``EPHandle``, in one C call.
_handle_tensors = operator.attrgetter(*HANDLE_TENSORS)
_new_tuple = tuple.__new__


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
        # (E, K) -> get_theoretical_num_sms(E, K). DeepEP caches it too, but behind a
        # weak-reference LRU that costs more than a dict lookup; combine needs it every call.
        self._num_sms: dict = {}

    def dispatch(self, args: DispatchArgs) -> DispatchOutput:
        prefill = not args.decode  # DeepEP's do_expand / do_cpu_sync
        recv, recv_topk_idx, recv_topk_weights, handle, _event = self.buffer.dispatch(
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
        )
        recv_x, recv_x_scales = recv if isinstance(recv, tuple) else (recv, None)
        # tuple.__new__: the NamedTuple without its Python __new__ (eager dispatch's hot path).
        return _new_tuple(DispatchOutput, (
            recv_x,
            recv_x_scales,
            None if prefill else recv_topk_idx,
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


def from_object(obj: object) -> Optional[DeepEPBackend]:
    """A :class:`DeepEPBackend` for a ``deep_ep.ElasticBuffer``, else None."""
    if type(obj).__module__.split(".")[0] != "deep_ep":
        return None
    import deep_ep
    from deep_ep.buffers.elastic import EPHandle

    return DeepEPBackend(obj, EPHandle, getattr(deep_ep, "topk_idx_t", torch.int64))
