"""The long-lived DeepEP buffer as an opaque custom-op argument.

:class:`EPBuffer` is registered as an opaque *reference* type, so under
``torch.compile`` it becomes a graph input rather than a constant: one graph
serves every layer and every process, and nothing per-process is baked in. The
fake kernels read only ``num_ranks`` from it.
"""

from __future__ import annotations

from torch._library.opaque_object import MemberType, get_opaque_type_name, register_opaque_type
from torch._opaque_base import OpaqueBase

from deepep_ops.protocol import ElasticBufferBackend, handle_class_for, topk_idx_dtype_for


class EPBuffer(OpaqueBase):
    """Wraps a backend (``deep_ep.ElasticBuffer`` or :class:`ReferenceElasticBuffer`).

    Attributes:
        backend: the wrapped buffer.
        num_ranks: R, the EP group size.
        rank: this process's rank in the EP group.
        capacity: the backend's ``num_max_tokens_per_rank``, the largest M.
    """

    def __init__(self, backend: ElasticBufferBackend) -> None:
        missing = [m for m in ("dispatch", "combine", "get_theoretical_num_sms", "num_ranks", "rank_idx") if not hasattr(backend, m)]
        if missing:
            raise TypeError(
                f"EPBuffer: backend must implement deepep_ops.protocol.ElasticBufferBackend; "
                f"{type(backend).__name__} lacks {missing}"
            )
        self.backend = backend
        self.num_ranks: int = backend.num_ranks
        self.rank: int = backend.rank_idx
        self.capacity: int = backend.num_max_tokens_per_rank
        self.handle_class = handle_class_for(backend)
        self.topk_idx_dtype = topk_idx_dtype_for(backend)

    def __obj_flatten__(self) -> tuple:
        # Nothing for Inductor to count: torch 2.11's Inductor sizes graph-input
        # objects through this (ir.TorchBindObject.get_buf_bytes) even for opaque
        # types; 2.13 skips opaque types. No tensors here belong to the graph.
        return ()

    def __repr__(self) -> str:
        return (
            f"EPBuffer({type(self.backend).__name__}, rank={self.rank}/{self.num_ranks}, "
            f"capacity={self.capacity})"
        )


register_opaque_type(
    EPBuffer,
    typ="reference",
    # Read at trace time and baked: these are the same on every rank and layer.
    members={"num_ranks": MemberType.USE_REAL, "capacity": MemberType.USE_REAL},
)

#: The name schemas use for the buffer argument.
EP_BUFFER_TYPE = get_opaque_type_name(EPBuffer)


def as_ep_buffer(buffer) -> EPBuffer:
    """Wrap a backend in :class:`EPBuffer` unless it already is one."""
    return buffer if isinstance(buffer, EPBuffer) else EPBuffer(buffer)


def unwrap_ep_buffer(buffer) -> EPBuffer:
    """The real :class:`EPBuffer` behind a custom-op argument (fake kernels get a wrapper)."""
    return getattr(buffer, "real_obj", buffer)
