"""torchtitan's expert-parallel token dispatcher over the ``deepep_ops::`` ops.

:class:`DeepEPOpsTokenDispatcher` implements torchtitan's
``BaseEPTokenDispatcher`` interface (``torchtitan/models/common/token_dispatcher.py``)
with the prefill-mode ops: ``dispatch`` is :func:`deepep_ops.dispatch_exact`
(expand mode: one row per (token, local expert), rows grouped by local expert,
exact counts, what ``GroupedExperts``' ``torch._grouped_mm`` takes), ``combine``
weights each row by its routing score and calls :func:`deepep_ops.combine`.
Both ops have fake kernels and autograd, so ``torch.compile(fullgraph=True)``
traces the MoE forward and backward through them, which torchtitan's own
DeepEP dispatcher (``deepep::dispatch``, CUDA-only, no fakes) cannot.

Dtypes: tokens travel as bf16 (DeepEP's combine is bf16), scores as float32;
the result comes back in ``x_TD``'s dtype.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch

from deepep_ops import DispatchHandle, EPOpsBuffer, ReferenceElasticBuffer, combine, dispatch_exact
from deepep_ops.layout import COMBINE_HIDDEN_ALIGNMENT
from deepep_ops.torchtitan._compat import BaseEPTokenDispatcher, LocalTokenDispatcher

#: ``Config.backend`` values.
BACKENDS = ("auto", "deep_ep", "reference")


@dataclass(frozen=True)
class DeepEPOpsDispatchMetadata:
    """What :meth:`DeepEPOpsTokenDispatcher.dispatch` hands to ``combine``.

    - ``handle``: the dispatch's :class:`~deepep_ops.DispatchHandle` (graph values only).
    - ``recv_topk_weights`` [X] float32: the routing score of each received row
      (0 on alignment padding rows); differentiable back to ``topk_scores_TK``.
    """

    handle: DispatchHandle
    recv_topk_weights: torch.Tensor


def _resolve_backend(backend: str, device_type: str) -> str:
    if backend != "auto":
        return backend
    # Real DeepEP v2 where it can run (CUDA ranks with deep_ep installed), the
    # pure-PyTorch reference everywhere else (CPU / gloo, tests).
    if device_type == "cuda" and importlib.util.find_spec("deep_ep") is not None:
        return "deep_ep"
    return "reference"


def _new_native_buffer(backend: str, group, capacity: int, hidden: int, num_topk: int) -> object:
    if backend == "deep_ep":
        from deepep_ops.backends.deep_ep import new_buffer  # imports deep_ep: only where users built DeepEP v2

        # v2.1's ElasticBuffer or v2.5's EPBuffer, whichever is installed;
        # explicitly_destroy, and never destroyed (as torchtitan's own DeepEP
        # buffer): destroy() synchronizes the device and the ranks, which must not
        # happen wherever garbage collection drops the last reference.
        return new_buffer(
            group, num_max_tokens_per_rank=capacity, hidden=hidden, num_topk=num_topk, explicitly_destroy=True
        )
    return ReferenceElasticBuffer(group, num_max_tokens_per_rank=capacity, hidden=hidden, num_topk=num_topk)


def shared_ep_buffer(ep_mesh, *, backend: str, capacity: int, hidden: int, num_topk: int) -> EPOpsBuffer:
    """The :class:`~deepep_ops.EPOpsBuffer` of ``ep_mesh``'s process group for these sizes,
    built on first use and kept on the mesh object.

    One buffer per (backend, capacity, hidden, top-k) is shared by every MoE
    layer: torchtitan builds one dispatcher per layer and calls ``init_buffer``
    on each, while a DeepEP ``ElasticBuffer`` is a per-process communication
    resource (its NVLink/RDMA buffers are sized for the whole run) that must not
    be allocated once per layer. torchtitan hands every layer the same EP mesh
    object (``ParallelDims`` caches its meshes), so the buffers live as long as
    that mesh and a new mesh gets new ones; nothing is process-wide.

    Args:
        ep_mesh: the EP ``DeviceMesh`` (1-D).
        backend: ``"deep_ep"`` or ``"reference"`` (already resolved).
        capacity: M, the most tokens a rank dispatches in one call.
        hidden: H, the model dim.
        num_topk: K.
    """
    buffers = vars(ep_mesh).setdefault("_deepep_ops_buffers", {})
    key = (backend, capacity, hidden, num_topk)
    buffer = buffers.get(key)
    if buffer is None:
        buffer = EPOpsBuffer(_new_native_buffer(backend, ep_mesh.get_group(), capacity, hidden, num_topk))
        buffers[key] = buffer
    return buffer


def _check_positive(name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"DeepEPOpsTokenDispatcher.Config.{name} must be a positive int, got {value!r}")


class DeepEPOpsTokenDispatcher(BaseEPTokenDispatcher):
    """torchtitan token dispatcher over ``torch.ops.deepep_ops`` (compiles with ``fullgraph=True``).

    With an EP mesh (``wire_meshes(ep_mesh=...)``, called by
    ``RoutedExperts.parallelize``) ``init_buffer`` builds the EP buffer from the
    mesh's process group: ``deep_ep.ElasticBuffer`` on CUDA where ``deep_ep``
    imports, else :class:`deepep_ops.ReferenceElasticBuffer` (``backend``
    forces one). Without an EP mesh (EP=1) it reorders locally, as torchtitan's
    all-to-all dispatcher does.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseEPTokenDispatcher.Config):
        """Args (besides ``num_experts`` and ``top_k``):

        num_max_tokens_per_rank: M, the most tokens one rank dispatches per MoE
            call (torchtitan: ``local_batch_size * seq_len // (cp * tp)``); the
            buffer capacity and the layout stride, the same on every rank.
        hidden_dim: the model dim (tokens' hidden size).
        expert_alignment: rows of each local expert padded to a multiple of it
            (zero rows, zero score), e.g. 16 for FP8 grouped GEMMs; 1 for bf16.
        backend: ``"auto"``, ``"deep_ep"`` or ``"reference"``.
        """

        num_max_tokens_per_rank: Optional[int] = None
        hidden_dim: Optional[int] = None
        expert_alignment: int = 1
        backend: str = "auto"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        _check_positive("num_max_tokens_per_rank", config.num_max_tokens_per_rank)
        _check_positive("hidden_dim", config.hidden_dim)
        _check_positive("expert_alignment", config.expert_alignment)
        if config.backend not in BACKENDS:
            raise ValueError(f"DeepEPOpsTokenDispatcher.Config.backend must be one of {BACKENDS}, got {config.backend!r}")
        self.num_max_tokens_per_rank = config.num_max_tokens_per_rank
        self.hidden_dim = config.hidden_dim
        self.expert_alignment = config.expert_alignment
        self.backend = config.backend
        self.buffer: Optional[EPOpsBuffer] = None
        # Read off the buffer in init_buffer: under torch.compile the buffer is an
        # opaque graph input whose attributes Dynamo may not read.
        self.topk_idx_dtype: torch.dtype = torch.int64

    def init_buffer(self) -> None:
        """Build (or reuse) the EP buffer of ``self.ep_mesh``'s process group; none for EP=1."""
        if self.ep_mesh is None:
            self.buffer = None
            return
        missing = [n for n in ("num_max_tokens_per_rank", "hidden_dim") if getattr(self, n) is None]
        if missing:
            raise ValueError(
                f"DeepEPOpsTokenDispatcher.Config needs {' and '.join(missing)} to build the EP buffer "
                "(the override deepep_ops.torchtitan.overrides.token_dispatcher takes them as kwargs)"
            )
        if self.hidden_dim % COMBINE_HIDDEN_ALIGNMENT:
            raise ValueError(
                f"DeepEPOpsTokenDispatcher: hidden_dim must be a multiple of {COMBINE_HIDDEN_ALIGNMENT} "
                f"(DeepEP combine kernels), got {self.hidden_dim}"
            )
        num_ranks = self.ep_mesh.size()
        if self.num_experts % num_ranks:
            raise ValueError(
                f"DeepEPOpsTokenDispatcher: num_experts ({self.num_experts}) must be a multiple of the EP size ({num_ranks})"
            )
        self.buffer = shared_ep_buffer(
            self.ep_mesh,
            backend=_resolve_backend(self.backend, self.ep_mesh.device_type),
            capacity=self.num_max_tokens_per_rank,
            hidden=self.hidden_dim,
            num_topk=self.top_k,
        )
        self.topk_idx_dtype = self.buffer.topk_idx_dtype

    def dispatch(
        self,
        x_TD: torch.Tensor,
        topk_scores_TK: torch.Tensor,
        topk_expert_ids_TK: torch.Tensor,
        num_local_tokens_per_expert_E: torch.Tensor,
    ) -> tuple:
        """Send each token to the ranks of its top-k experts.

        Args:
            x_TD: [T, D] tokens (any float dtype; sent as bf16), T <= num_max_tokens_per_rank.
            topk_scores_TK: [T, K] routing scores (sent as float32).
            topk_expert_ids_TK: [T, K] global expert ids.
            num_local_tokens_per_expert_E: [E] (unused: the counts come from the dispatch).

        Returns:
            ``(routed_input [X, D] bf16, rows grouped by local expert;
            num_tokens_per_local_expert [E/R] int32, each a multiple of
            ``expert_alignment``; DeepEPOpsDispatchMetadata)``.
        """
        buffer = self.buffer
        if buffer is None:
            return LocalTokenDispatcher.dispatch(
                self, x_TD, topk_scores_TK, topk_expert_ids_TK, num_local_tokens_per_expert_E
            )
        result = dispatch_exact(
            x_TD.to(torch.bfloat16).contiguous(),
            topk_expert_ids_TK.to(self.topk_idx_dtype).contiguous(),
            topk_scores_TK.to(torch.float32).contiguous(),
            buffer,
            num_experts=self.num_experts,
            # The capacity: the same on every rank whatever each rank's T.
            num_max_tokens_per_rank=self.num_max_tokens_per_rank,
            expert_alignment=self.expert_alignment,
        )
        metadata = DeepEPOpsDispatchMetadata(handle=result.handle, recv_topk_weights=result.recv_topk_weights)
        return result.recv_x, result.num_recv_tokens_per_expert, metadata

    def combine(
        self,
        routed_output_RD: torch.Tensor,
        metadata: object,
        x_TD: torch.Tensor,
    ) -> torch.Tensor:
        """Weight each expert-output row by its score, send it back and sum per token.

        Args:
            routed_output_RD: [X, D] expert outputs, the rows of ``dispatch``'s ``routed_input``.
            metadata: what ``dispatch`` returned.
            x_TD: [T, D] the dispatched tokens (for the output dtype).

        Returns:
            [T, D] in ``x_TD``'s dtype: Σ_k score[t, k] · expert_k(x[t]).
        """
        if self.buffer is None:
            return LocalTokenDispatcher.combine(self, routed_output_RD, metadata, x_TD)
        assert isinstance(metadata, DeepEPOpsDispatchMetadata), type(metadata)
        # Scores applied in fp32 before the (unweighted) combine, as torchtitan's
        # dispatchers do; autograd carries the score gradient back through
        # dispatch_exact's recv_topk_weights (DeepEP combine's topk_weights).
        weighted = (routed_output_RD.float() * metadata.recv_topk_weights.unsqueeze(-1)).to(torch.bfloat16)
        return combine(weighted, metadata.handle, self.buffer).to(x_TD.dtype)
