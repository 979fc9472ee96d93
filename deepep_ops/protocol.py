"""The part of ``deep_ep.ElasticBuffer`` that deepep-ops calls.

Both backends satisfy it: ``deep_ep.ElasticBuffer`` (real, GPU) and
:class:`deepep_ops.ReferenceElasticBuffer` (PyTorch, CPU/GPU). The op layer talks
to a backend only through these members, so the CPU tests drive the same code
path as real DeepEP.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Tuple, runtime_checkable

import torch


@runtime_checkable
class ElasticBufferBackend(Protocol):
    """Members of ``deep_ep.ElasticBuffer`` used by ``deepep_ops.ops``."""

    rank_idx: int
    num_ranks: int
    #: The buffer capacity: the largest M a dispatch may use.
    num_max_tokens_per_rank: int

    def dispatch(
        self,
        x: Any,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        *,
        num_experts: Optional[int] = None,
        num_max_tokens_per_rank: Optional[int] = None,
        expert_alignment: Optional[int] = None,
        do_handle_copy: bool = True,
        do_cpu_sync: Optional[bool] = None,
        do_expand: bool = False,
        do_zero_padding: bool = False,
    ) -> Tuple[Any, Optional[torch.Tensor], Optional[torch.Tensor], Any, Any]:
        """``(recv_x | (recv_x, recv_sf), recv_topk_idx, recv_topk_weights, handle, event)``."""
        ...

    def combine(
        self, x: torch.Tensor, handle: Any, topk_weights: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Any]:
        """``(combined_x [T, H] bf16, combined_topk_weights | None, event)``.

        Optional extension: a backend with ``combine_writes_out = True`` also takes
        ``out=`` ([T, H] bf16) and writes the result there (``deepep_ops::combine_into``
        uses it; otherwise that op copies once).
        """
        ...

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int) -> int:
        """The SM count dispatch picks when ``num_sms=0``; combine must reuse it."""
        ...


def handle_class_for(backend: ElasticBufferBackend) -> type:
    """The ``EPHandle`` class that ``backend.combine`` expects."""
    from deepep_ops.reference.elastic import EPHandle, ReferenceElasticBuffer

    if isinstance(backend, ReferenceElasticBuffer):
        return EPHandle
    from deep_ep.buffers.elastic import EPHandle as DeepEPHandle  # lazy: deep_ep is optional

    return DeepEPHandle


def topk_idx_dtype_for(backend: ElasticBufferBackend) -> torch.dtype:
    """``deep_ep.topk_idx_t`` for real DeepEP (int64 unless built with 32-bit ids)."""
    from deepep_ops.reference.elastic import ReferenceElasticBuffer

    if isinstance(backend, ReferenceElasticBuffer):
        return torch.int64
    import deep_ep

    return getattr(deep_ep, "topk_idx_t", torch.int64)
