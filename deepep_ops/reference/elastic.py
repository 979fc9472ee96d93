"""A pure PyTorch + ``torch.distributed`` stand-in for ``deep_ep.ElasticBuffer``.

It implements the part of DeepEP v2's API that deepep-ops calls (``dispatch``,
``combine``, ``get_theoretical_num_sms``) with the same arguments, return values
and handle fields, and reproduces direct-mode layout (docs/deepep_contract.md §2–§4) in DeepEP's
deterministic order: rows grouped by source rank, then ascending source token.

Communication is one fixed-size ``all_to_all_single`` per call of ``[R, M, row
bytes]`` (each rank reserves M slots per source, as DeepEP's buffer does), plus
one of ``[R, 2]`` counts for dispatch. Without CPU sync nothing reads device
data on the host, so the decode path can be captured in a CUDA graph (NCCL) and
runs on CPU over gloo; world size 1 needs no process group at all.

Hybrid mode (contract §9) is simulated with ``num_scaleout_ranks=S > 1``: the
R = S·U ranks form S "nodes" of U scale-up ranks (rank r is peer r % U of node
r // U, as DeepEP arranges them), and dispatch returns hybrid-shaped handles
with ``num_channels`` channels. The payload still moves in one direct
all-to-all (every received row holds the same bytes either way); one more
all-to-all shares every rank's routing, from which each rank computes the
hybrid handle fields it owns (:func:`_hybrid_layout`) on the host, so hybrid
dispatch syncs the host and is not CUDA-graph capturable. Combine reduces in
DeepEP's hybrid order (per rank, then per node, then across nodes: DeepEP's
``refs.combine(..., reduce_in_local=True, reduce_in_scaleup=True)``) when
``allow_multiple_reduction``, in direct order otherwise, as DeepEP does.

What of hybrid mode is read from DeepEP's source and what is our model of it:

- *Read from source* (DeepEP dd758ca: ``hybrid_dispatch.cuh``,
  ``dispatch_copy_epilogue.cuh``, ``hybrid_combine.cuh``, ``buffer.hpp``,
  ``elastic.py``): the rank layout; every shape; channel c sending tokens c,
  c+C, ...; the scale-out slot counters; each forwarder's per-channel order
  (source nodes visited cyclically from ``(c % S + 1) % S``, up to 6 slots per
  visit); the meaning of every column of ``token_metadata_at_forward`` and of
  ``dst_buffer_slot_idx`` and ``channel_linked_list`` (highest lane per
  scale-up destination; −1 terminators); the per-peer psum;
  ``recv_src_metadata[:, 1] = slot·K + kmax``; ``deterministic_sort`` (rows of
  a non-expand dispatch sorted by ``src_rank·M + t`` with the linked list
  remapped; an expand dispatch keeps ``recv_src_metadata`` in peer-segment
  order); the combine rounding order.
- *Our model* (one legal outcome among several): the scale-up slots of one
  destination are handed out channel-major (DeepEP's channels race for them
  through one ``atomicAdd``); the simulated channel count (DeepEP computes it
  from shared memory and ``num_sms``); cells DeepEP leaves uninitialised (past
  each terminator, slots no token used) hold −1 here.
- *Not modelled*: the bytes' path (scale-out RDMA, forwarders, NVLink), the
  chunk-end flag's effect on RDMA request aggregation, timing.
"""

from __future__ import annotations

from collections import defaultdict
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from deepep_ops.layout import (
    align,
    decode_num_expanded_tokens,
    decode_num_recv_tokens,
    forward_rows,
    recv_src_metadata_cols,
    token_metadata_cols,
    tokens_per_channel,
)

TensorOrPair = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class EPHandle:
    """Same constructor and fields as ``deep_ep.buffers.elastic.EPHandle``."""

    def __init__(
        self,
        do_expand: bool,
        num_experts: int,
        expert_alignment: int,
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
        channel_linked_list: Optional[torch.Tensor],
    ) -> None:
        assert topk_idx is not None
        self.do_expand = do_expand
        self.num_experts = num_experts
        self.expert_alignment = expert_alignment
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_sms = num_sms
        self.topk_idx = topk_idx
        self.num_recv_tokens = num_recv_tokens
        self.num_expanded_tokens = num_expanded_tokens
        self.num_recv_tokens_per_expert_list = num_recv_tokens_per_expert_list
        self.psum_num_recv_tokens_per_scaleup_rank = psum_num_recv_tokens_per_scaleup_rank
        self.psum_num_recv_tokens_per_expert = psum_num_recv_tokens_per_expert
        self.num_unaligned_recv_tokens_per_expert = num_unaligned_recv_tokens_per_expert
        self.recv_src_metadata = recv_src_metadata
        self.dst_buffer_slot_idx = dst_buffer_slot_idx
        self.token_metadata_at_forward = token_metadata_at_forward
        self.channel_linked_list = channel_linked_list
        self.cached_recv_src_metadata_before_sort = None


class _NoEvent:
    """Stands in for DeepEP's ``EventOverlap`` of a call that has finished."""

    def current_stream_wait(self) -> None:
        pass


class Transfer:
    """A transport in flight (:meth:`ReferenceElasticBuffer.all_to_all_async`):
    ``wait()`` returns once every one of its ``works`` (``torch.distributed``
    works, e.g. gloo's ``async_op=True`` ones) has finished."""

    def __init__(self, works: Sequence = ()) -> None:
        self.works = tuple(works)

    def wait(self) -> None:
        for work in self.works:
            work.wait()


class DeferredEvent:
    """What a dispatch or combine with ``defer_epilogue=True`` returns (DeepEP
    v2.5's deferred ``EventOverlap``): the payload is in flight; ``wait()``
    waits for it, runs the receiver's epilogue and returns the results
    (dispatch: ``(recv_x, recv_topk_idx, recv_topk_weights, handle)``; combine:
    ``(combined_x, combined_topk_weights)``). It can be waited on once."""

    def __init__(self, steps) -> None:
        # A generator that has sent its payload and yielded the transfers in flight.
        self._steps = steps
        self._transfers = next(steps)

    def wait(self):
        if self._steps is None:
            raise RuntimeError("Assertion exception: this event was already waited on")
        steps, self._steps = self._steps, None
        for transfer in self._transfers:
            transfer.wait()
        try:
            steps.send(None)
        except StopIteration as done:
            return done.value[:-1]  # without the (finished) event
        raise RuntimeError("the reference buffer's epilogue yielded twice")  # pragma: no cover

    def current_stream_wait(self) -> None:
        raise RuntimeError("Assertion exception: a deferred event returns its results from wait()")


def _run(steps):
    """Run a dispatch/combine step generator to the end, waiting for its transfers."""
    for transfer in next(steps):
        transfer.wait()
    try:
        steps.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the reference buffer's epilogue yielded twice")  # pragma: no cover


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """View a 2-D tensor's rows as raw bytes: [n, c] dtype -> [n, c * itemsize] uint8."""
    t = t.contiguous()
    if t.numel() == 0:
        # An empty tensor counts as contiguous whatever its strides (e.g. an expanded
        # [0, H] gradient with stride 0), and view(uint8) needs a unit last stride.
        return t.new_empty((t.shape[0], t.shape[1] * t.element_size()), dtype=torch.uint8)
    # Explicit width, not -1: a rank may hold 0 rows (T = 0, or N = 0 received).
    return t.view(torch.uint8).reshape(t.shape[0], t.shape[1] * t.element_size())


def _from_bytes(b: torch.Tensor, dtype: torch.dtype, cols: int) -> torch.Tensor:
    """Inverse of :func:`_as_bytes` for one column block, in storage of its own
    (ops' outputs must not alias each other, even when a slice happens to be contiguous)."""
    return b.clone(memory_format=torch.contiguous_format).view(dtype).reshape(b.shape[0], cols)


def _words(rows: torch.Tensor) -> torch.Tensor:
    """[n, B] uint8 rows as [n, B/4] int32 when B allows (faster row copies), else as they are."""
    return rows.view(torch.int32) if rows.shape[1] % 4 == 0 and rows.is_contiguous() else rows


def _scatter_rows(rows: torch.Tensor, dest: torch.Tensor, valid: torch.Tensor, num_out: int) -> torch.Tensor:
    """out[dest[i]] = rows[i] where valid[i]; other rows of out are zero.

    Invalid rows go to a dump row past the end, so no index set is data-dependent
    in size (no nonzero, no host sync).
    """
    if rows.dtype.itemsize == 1 and rows.dtype != torch.uint8:
        # index_copy_ has no float8 kernel on CPU: move the bytes instead.
        return _scatter_rows(rows.view(torch.uint8), dest, valid, num_out).view(rows.dtype)
    if rows.dtype == torch.uint8 and rows.dim() == 2 and rows.shape[1] % 4 == 0 and rows.is_contiguous():
        # Byte rows move 4x faster as int32 words (index_copy_ copies element by element).
        return _scatter_rows(rows.view(torch.int32), dest, valid, num_out).view(torch.uint8)
    out = rows.new_zeros((num_out + 1,) + tuple(rows.shape[1:]))
    dump = torch.full_like(dest, num_out)
    out.index_copy_(0, torch.where(valid, dest, dump), rows)
    return out[:num_out]


def _last_lane_per_rank(rank_of_lane: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[T, K] bool: lane k is valid and no later lane of the row goes to the same rank.

    DeepEP keeps the highest lane per destination rank (``get_master_lane_idx``).
    """
    num_topk = rank_of_lane.shape[1]
    same = rank_of_lane.unsqueeze(2) == rank_of_lane.unsqueeze(1)  # [T, K, K'] same rank
    later = torch.ones(num_topk, num_topk, dtype=torch.bool, device=rank_of_lane.device).triu(1)
    dup_later = (same & later & valid.unsqueeze(1)).any(dim=2)
    return valid & ~dup_later


# ---------------------------------------------------------------------------
# Hybrid mode: the handle fields, computed from every rank's routing.
# ---------------------------------------------------------------------------

#: A forwarder takes at most this many scale-out slots of one source node per
#: visit (DeepEP's kNumSlotsPerForwardChunk = kScaleoutUpdateInterval).
_FORWARD_CHUNK = 6


class _HybridLayout(NamedTuple):
    """The hybrid handle fields of one rank, as host lists (see :func:`_hybrid_layout`)."""

    #: [C][S·mtpc+1][2+2K]: this rank as a forwarder; −1 where DeepEP leaves cells unwritten.
    token_metadata_at_forward: list
    #: [C][S][mtpc][K]: the scale-up slot of each forwarded (channel, source node, slot, lane).
    dst_buffer_slot_idx: list
    #: [U]: tokens this rank receives through each scale-up peer's forwarder.
    recv_counts: list
    #: src_rank·M + t -> (scale-up peer u, scale-up slot) of every token this rank receives.
    recv_slot: dict
    #: (channel c, peer u) -> the received tokens' ids in forwarder (d, u)'s channel-c order.
    links: dict


def _hybrid_layout(routing: List[list], me: int, S: int, U: int, M: int, C: int, E: int) -> _HybridLayout:
    """The hybrid handle fields rank ``me`` owns, from every rank's routing.

    ``routing[r]``: rank r's ``topk_idx`` rows (as lists; rows of −1 route
    nowhere). Follows DeepEP's hybrid kernels (module doc: which parts are read
    from source, which are our model). Node d = ranks [d·U, (d+1)·U); expert e
    lives on rank e // EL, in node e // (E/S).

    - Sender (rank r, token t): channel c = t % C; for each node d the token
      has an expert in, scale-out slot = the tokens before it in channel c that
      also go to d. It goes to the forwarder (d, r % U).
    - Forwarder f = (d, u), channel c: the tokens of ranks (j, u), j < S, in
      channel c with an expert in node d; source nodes visited cyclically from
      ``(c % S + 1) % S``, up to 6 slots of one source per visit.
    - Scale-up slots of destination (d, v) from forwarder (d, u): handed out
      channel-major (our model), one per token with a lane on v.
    """
    R = S * U
    EL = E // R
    experts_per_node = E // S
    mtpc = tokens_per_channel(M, C)
    K = len(routing[0][0]) if routing and routing[0] else 0
    node = me // U

    def nodes_of(row: list) -> set:
        return {e // experts_per_node for e in row if e >= 0}

    # Sender side: the scale-out slot of (rank r, token t, node d) (a per-(channel, node) counter).
    so_slot = {}
    for r in range(R):
        counter: dict = defaultdict(int)
        for t, row in enumerate(routing[r]):
            for d in sorted(nodes_of(row)):
                so_slot[r, t, d] = counter[t % C, d]
                counter[t % C, d] += 1

    def scaleup_dest(row: list) -> list:
        """Per lane: the scale-up index in this node of its expert, −1 if elsewhere."""
        return [(e - node * experts_per_node) // EL if e >= 0 and e // experts_per_node == node else -1 for e in row]

    # Forwarders (node, u) for every u: this rank is one of them, and it receives from all of them.
    forward_metadata = [[[-1] * (2 + 2 * K) for _ in range(S * mtpc + 1)] for _ in range(C)]
    dst_slots = [[[[-1] * K for _ in range(mtpc)] for _ in range(S)] for _ in range(C)]
    recv_counts = [0] * U
    recv_slot: dict = {}
    links: dict = {}
    for u in range(U):
        forwarder = node * U + u
        slot_counter = [0] * U  # per destination scale-up index v, channel-major over channels
        for c in range(C):
            queues = []
            for j in range(S):
                src = j * U + u
                queue = [t for t, row in enumerate(routing[src]) if t % C == c and node in nodes_of(row)]
                assert all(so_slot[src, t, node] == i for i, t in enumerate(queue))
                queues.append(queue)
            # The forward order: cyclic over source nodes from (c % S + 1) % S, chunks of 6.
            order = []
            taken = [0] * S
            cursor = c % S
            while any(taken[j] < len(queues[j]) for j in range(S)):
                j = (cursor + 1) % S
                while taken[j] == len(queues[j]):  # an exhausted source leaves the rotation
                    j = (j + 1) % S
                chunk = queues[j][taken[j] : taken[j] + _FORWARD_CHUNK]
                for i, t in enumerate(chunk):
                    order.append((j, taken[j] + i, t, i == len(chunk) - 1))
                taken[j] += len(chunk)
                cursor = j
            for n, (j, slot, t, chunk_end) in enumerate(order):
                src = j * U + u
                row = routing[src][t]
                dest = scaleup_dest(row)
                # The highest lane per destination carries the slot (DeepEP's deduplicate).
                last_lane = {v: k for k, v in enumerate(dest) if v >= 0}
                lane_slots = [-1] * K
                for v, k in sorted(last_lane.items(), key=lambda kv: kv[1]):
                    lane_slots[k] = slot_counter[v]
                    if v == me % U:
                        gid = src * M + t
                        recv_slot[gid] = (u, slot_counter[v])
                        links.setdefault((c, u), []).append(gid)
                    slot_counter[v] += 1
                if forwarder == me:
                    forward_metadata[c][n] = [src * M + t, int(chunk_end)] + dest + lane_slots
                    dst_slots[c][j][slot] = list(lane_slots)
            if forwarder == me:
                forward_metadata[c][len(order)][0] = -1  # the terminator (other cells: unwritten)
        recv_counts[u] = slot_counter[me % U]
    return _HybridLayout(forward_metadata, dst_slots, recv_counts, recv_slot, links)


class ReferenceElasticBuffer:
    """DeepEP v2 ``ElasticBuffer`` in PyTorch, for CPU (gloo) and GPU (NCCL):
    direct mode, and hybrid mode simulated (module doc).

    Args:
        group: the process group, or ``None`` for world size 1 without
            ``torch.distributed``.
        num_max_tokens_per_rank: default and largest M (the buffer capacity).
        hidden, num_topk, use_fp8_dispatch: kept for API parity with DeepEP
            (there they size the buffer; a call's H is not compared with
            ``hidden`` there either: contract §8, "Rows wider than the
            constructor's hidden").
        allow_hybrid_mode: as DeepEP's flag: with it off the domain is direct
            (S = 1) whatever ``num_scaleout_ranks`` says.
        allow_multiple_reduction: as DeepEP's flag (contract §4, expand combine;
            §9, hybrid combine).
        num_scaleout_ranks: the simulated nodes S (1: one node, direct mode);
            it must divide the group size. DeepEP reads it off the NVLink domain.
        num_channels: the simulated hybrid-mode channel count C (DeepEP
            computes it from shared memory, the token layout and ``num_sms``).
        prefer_overlap_with_compute: kept for API parity (DeepEP sizes its
            channels with it).
    """

    def __init__(
        self,
        group: Optional[dist.ProcessGroup] = None,
        num_bytes: Optional[int] = None,
        num_cpu_bytes: int = 0,
        num_max_tokens_per_rank: int = 0,
        hidden: int = 0,
        num_topk: int = 0,
        use_fp8_dispatch: bool = False,
        deterministic: bool = True,
        allow_hybrid_mode: bool = True,
        allow_multiple_reduction: bool = True,
        explicitly_destroy: bool = False,
        num_scaleout_ranks: int = 1,
        num_channels: int = 2,
        prefer_overlap_with_compute: bool = True,
        **_unused_deep_ep_options,
    ) -> None:
        if group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                "ReferenceElasticBuffer: group=None means world size 1, but torch.distributed is "
                f"initialised with world size {dist.get_world_size()}; pass the EP process group"
            )
        self.group = group
        self.rank_idx = group.rank() if group is not None else 0
        self.num_ranks = group.size() if group is not None else 1
        if type(num_scaleout_ranks) is not int or num_scaleout_ranks < 1 or self.num_ranks % num_scaleout_ranks:
            raise ValueError(
                f"ReferenceElasticBuffer: num_scaleout_ranks must be a positive int dividing the group size "
                f"{self.num_ranks}, got {num_scaleout_ranks!r}"
            )
        if type(num_channels) is not int or num_channels < 1:
            raise ValueError(f"ReferenceElasticBuffer: num_channels must be a positive int, got {num_channels!r}")
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.hidden = hidden
        self.num_topk = num_topk
        self.use_fp8_dispatch = use_fp8_dispatch
        # Our order is DeepEP's deterministic order whatever the flag says.
        self.deterministic = True
        self.allow_hybrid_mode = allow_hybrid_mode
        self.allow_multiple_reduction = allow_multiple_reduction
        self.prefer_overlap_with_compute = prefer_overlap_with_compute
        self.explicitly_destroy = explicitly_destroy
        # The physical domain, then the logical one (DeepEP's nccl.cu: direct unless hybrid is allowed).
        self.num_rdma_ranks, self.num_nvlink_ranks = num_scaleout_ranks, self.num_ranks // num_scaleout_ranks
        self.num_scaleout_ranks = num_scaleout_ranks if allow_hybrid_mode else 1
        self.num_scaleup_ranks = self.num_ranks // self.num_scaleout_ranks
        self.scaleout_rank_idx = self.rank_idx // self.num_scaleup_ranks
        self.scaleup_rank_idx = self.rank_idx % self.num_scaleup_ranks
        self.num_channels = num_channels

    def get_logical_domain_size(self) -> Tuple[int, int]:
        """``(num_scaleout_ranks, num_scaleup_ranks)``, as DeepEP's."""
        return self.num_scaleout_ranks, self.num_scaleup_ranks

    def get_physical_domain_size(self) -> Tuple[int, int]:
        """``(num_rdma_ranks, num_nvlink_ranks)``: the simulated nodes and their size."""
        return self.num_rdma_ranks, self.num_nvlink_ranks

    def destroy(self) -> None:
        """DeepEP API parity; the reference holds no native resources."""

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int) -> int:
        """DeepEP API parity; the reference uses no SMs, so any fixed value will do."""
        return 1

    # ------------------------------------------------------------------ comm
    def all_to_all_async(self, send: torch.Tensor) -> Tuple[torch.Tensor, Transfer]:
        """The transport: an equal-split all-to-all over dim 0 (one block per rank,
        ``send[d]`` goes to rank d), started: ``(recv, transfer)``, ``recv[s]``
        holding rank s's block once ``transfer.wait()`` returned.

        Every byte this buffer moves goes through here (one call per dispatch for
        the payload and one for the counts, one per combine and cached dispatch),
        so another all-to-all library reuses the whole reference layout by
        overriding this method in a subclass (:mod:`deepep_ops.backends.reference`).
        Here: ``torch.distributed.all_to_all_single(..., async_op=True)`` (gloo runs
        it on its own threads, so the caller's compute overlaps it on CPU too).
        """
        if self.num_ranks == 1:
            return send.clone(), Transfer()
        recv = torch.empty_like(send)
        work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)
        return recv, Transfer((work,))

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        """:meth:`all_to_all_async`, waited for."""
        recv, transfer = self.all_to_all_async(send)
        transfer.wait()
        return recv

    # -------------------------------------------------------------- dispatch
    def dispatch(
        self,
        x: TensorOrPair,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        num_experts: Optional[int] = None,
        num_max_tokens_per_rank: Optional[int] = None,
        expert_alignment: Optional[int] = None,
        num_sms: int = 0,
        num_qps: int = 0,
        previous_event=None,
        previous_event_before_epilogue=None,
        async_with_compute_stream: bool = False,
        allocate_on_comm_stream: bool = False,
        handle: Optional[EPHandle] = None,
        do_handle_copy: bool = True,
        do_cpu_sync: Optional[bool] = None,
        do_expand: bool = False,
        do_zero_padding: bool = False,
        use_tma_aligned_col_major_sf: bool = False,
        defer_epilogue: bool = False,
    ):
        """DeepEP's ``ElasticBuffer.dispatch`` (direct mode; hybrid mode's handle: :meth:`_hybrid_handle`).

        With ``handle=`` (cached mode) the routing comes from the handle:
        ``topk_idx``/``num_experts`` are ignored, ``do_expand`` must equal the
        handle's, and only ``recv_x`` (and its scales) is returned, with the
        handle itself. Returns ``(recv_x | (recv_x, recv_sf), recv_topk_idx, recv_topk_weights,
        handle, event)`` with the shapes of contract §2.

        ``defer_epilogue=True`` (DeepEP v2.5's keyword; needs
        ``async_with_compute_stream=True``): the payload is sent and a
        :class:`DeferredEvent` returned at once; its ``wait()`` receives it and
        returns ``(recv_x, recv_topk_idx, recv_topk_weights, handle)``.
        """
        if handle is not None:
            if do_expand != handle.do_expand:
                # DeepEP does not check this (contract §1); a wrong mode reads unwritten metadata.
                raise RuntimeError(
                    f"Assertion exception: cached dispatch do_expand={do_expand} but the handle has "
                    f"do_expand={handle.do_expand}"
                )
            recv_x, recv_sf = self._cached_dispatch(x, handle)
            recv_x_ret = recv_x if recv_sf is None else (recv_x, recv_sf)
            return recv_x_ret, None, None, handle, _NoEvent()
        if defer_epilogue and not async_with_compute_stream:
            raise RuntimeError("Assertion exception: defer_epilogue requires async_with_compute_stream")
        steps = self._dispatch_steps(x, topk_idx, topk_weights, cumulative_local_expert_recv_stats, num_experts,
                                     num_max_tokens_per_rank, expert_alignment, num_sms, do_handle_copy, do_cpu_sync,
                                     do_expand, do_zero_padding)
        return DeferredEvent(steps) if defer_epilogue else _run(steps)

    def _dispatch_steps(self, x, topk_idx, topk_weights, cumulative_local_expert_recv_stats, num_experts,
                        num_max_tokens_per_rank, expert_alignment, num_sms, do_handle_copy, do_cpu_sync, do_expand,
                        do_zero_padding):
        """:meth:`dispatch` (not cached) as steps: send the payload, yield the
        transfers in flight, then receive; returns dispatch's 5-tuple."""
        if topk_idx is None or num_experts is None:
            raise ValueError("ReferenceElasticBuffer.dispatch needs topk_idx and num_experts")
        if do_zero_padding and not do_expand:
            raise RuntimeError("Assertion exception: do_zero_padding requires do_expand")
        x, sf = x if isinstance(x, tuple) else (x, None)
        M = self.num_max_tokens_per_rank if num_max_tokens_per_rank is None else num_max_tokens_per_rank
        A = 1 if expert_alignment is None else expert_alignment
        do_cpu_sync = True if do_cpu_sync is None else do_cpu_sync
        R, rank = self.num_ranks, self.rank_idx
        T, H = x.shape
        K = topk_idx.shape[1]
        E = num_experts
        EL = E // R
        if not (0 < M and T <= M):
            raise RuntimeError(f"Assertion exception: num_tokens <= num_max_tokens_per_rank ({T} > {M})")
        device = x.device

        # ---- sender: which tokens go to which rank, and their slot there
        valid_lane = topk_idx >= 0
        rank_of_lane = torch.where(valid_lane, topk_idx // EL, torch.full_like(topk_idx, -1))
        ranks = torch.arange(R, device=device)
        to_rank = (rank_of_lane.unsqueeze(2) == ranks).any(dim=1)  # [T, R]
        slot = torch.cumsum(to_rank.to(torch.int64), dim=0) - 1  # [T, R] slot at each destination
        send_counts = to_rank.sum(dim=0)  # [R]

        last_lane = _last_lane_per_rank(rank_of_lane, valid_lane)  # [T, K]
        slot_of_lane = slot.gather(1, rank_of_lane.clamp(min=0))
        dst_buffer_slot_idx = torch.where(last_lane, rank * M + slot_of_lane, -1).to(torch.int32)

        # Payload row: x | sf | [t, topk_idx...] int64 | weights f32.
        token_ids = torch.arange(T, device=device, dtype=torch.int64).unsqueeze(1)
        parts = [_as_bytes(x)]
        P = 0
        if sf is not None:
            P = sf.shape[1]
            parts.append(_as_bytes(sf))
        parts.append(_as_bytes(torch.cat([token_ids, topk_idx.to(torch.int64)], dim=1)))
        has_weights = topk_weights is not None
        if has_weights:
            parts.append(_as_bytes(topk_weights.to(torch.float32)))
        payload = torch.cat(parts, dim=1)  # [T, B]
        B = payload.shape[1]
        send = payload.new_zeros(R, M + 1, B)
        for d in range(R):
            dest = torch.where(to_rank[:, d], slot[:, d], M)
            _words(send[d]).index_copy_(0, dest, _words(payload))
        recv, sent = self.all_to_all_async(send[:, :M].contiguous())  # [R(src), M, B]
        recv_counts, counts_sent = self.all_to_all_async(send_counts.to(torch.int64))  # [R(src)]
        yield sent, counts_sent

        # ---- receiver: compact rows to [0, N), grouped by source rank
        psum_rank = torch.cumsum(recv_counts, 0)
        offsets = psum_rank - recv_counts
        j = torch.arange(M, device=device)
        row_valid = (j.unsqueeze(0) < recv_counts.unsqueeze(1)).reshape(-1)
        row_dest = (offsets.unsqueeze(1) + j.unsqueeze(0)).reshape(-1)
        worst_rows = decode_num_recv_tokens(R, M)
        rows = _scatter_rows(recv.reshape(R * M, B), row_dest, row_valid, worst_rows)  # [R*M, B]

        col = 0
        recv_x = _from_bytes(rows[:, col : col + H * x.element_size()], x.dtype, H)
        col += H * x.element_size()
        recv_sf = None
        if sf is not None:
            recv_sf = _from_bytes(rows[:, col : col + P * sf.element_size()], sf.dtype, P)
            col += P * sf.element_size()
        ids = _from_bytes(rows[:, col : col + (K + 1) * 8], torch.int64, K + 1)
        col += (K + 1) * 8
        recv_weights = _from_bytes(rows[:, col : col + K * 4], torch.float32, K) if has_weights else None

        src_rank = torch.repeat_interleave(ranks, M).to(device)
        src_rank = _scatter_rows(src_rank, row_dest, row_valid, worst_rows)
        src_token = ids[:, 0]
        recv_global_idx = ids[:, 1:]
        num_valid = psum_rank[-1]
        is_valid_row = torch.arange(worst_rows, device=device) < num_valid
        local_lane = (recv_global_idx >= rank * EL) & (recv_global_idx < (rank + 1) * EL) & is_valid_row.unsqueeze(1)
        recv_local_idx = torch.where(local_lane, recv_global_idx - rank * EL, -1)
        kmax = _last_lane_per_rank(torch.where(local_lane, 0, -1), local_lane).to(torch.int64).argmax(dim=1)

        # Per-local-expert counts and expand slots.
        experts = torch.arange(EL, device=device)
        hits = (recv_local_idx.unsqueeze(2) == experts).any(dim=1)  # [rows, EL]
        unaligned = hits.sum(dim=0)  # c_e
        aligned = align(unaligned, A)
        exp_start = torch.cumsum(aligned, 0) - aligned  # S_e

        metadata = torch.full((worst_rows, recv_src_metadata_cols(K)), -1, dtype=torch.int32, device=device)
        metadata[:, 0] = (src_rank * M + src_token).to(torch.int32)
        metadata[:, 1] = (src_rank * K + kmax).to(torch.int32)
        metadata[~is_valid_row, :2] = 0

        stats = cumulative_local_expert_recv_stats
        if stats is not None:
            stats += unaligned.to(stats.dtype)

        if do_cpu_sync:
            num_recv_tokens = int(num_valid)
        else:
            num_recv_tokens = worst_rows
        psum_rank_i32 = psum_rank.to(torch.int32)
        unaligned_i32 = unaligned.to(torch.int32)

        if not do_expand:
            # Inclusive prefix sum of aligned counts, a view at offset 1 as in DeepEP.
            psum_expert = torch.zeros(EL + 1, dtype=torch.int32, device=device)
            psum_expert[1:] = torch.cumsum(aligned, 0)
            psum_expert = psum_expert[1:]
            n = num_recv_tokens
            recv_x_out = recv_x[:n]
            recv_sf_out = None if recv_sf is None else recv_sf[:n]
            # Padding rows hold 0, not -1 (real DeepEP leaves them unwritten; on a fresh
            # buffer they read as 0, contract §2, §8): consumers must
            # mask rows >= psum[-1] themselves.
            recv_topk_idx = torch.where(is_valid_row.unsqueeze(1), recv_local_idx, 0)[:n].to(topk_idx.dtype)
            recv_topk_weights = None if recv_weights is None else recv_weights[:n]
            metadata = metadata[:n]
            num_expanded = (
                int(aligned.sum())
                if do_cpu_sync
                else decode_num_expanded_tokens(R, M, K, E, A)
            )
        else:
            pos_in_expert = torch.cumsum(hits.to(torch.int64), dim=0) - 1  # [rows, EL]
            lane_expert = recv_local_idx.clamp(min=0)
            lane_slot = exp_start[lane_expert] + pos_in_expert.gather(1, lane_expert)
            lane_slot = torch.where(local_lane, lane_slot, -1)
            metadata[:, 2:] = lane_slot.to(torch.int32)
            num_expanded = (
                int(aligned.sum())
                if do_cpu_sync
                else decode_num_expanded_tokens(R, M, K, E, A)
            )
            flat_valid = local_lane.reshape(-1)
            flat_slot = lane_slot.reshape(-1)
            recv_x_out = _scatter_rows(recv_x.repeat_interleave(K, 0), flat_slot, flat_valid, num_expanded)
            recv_sf_out = (
                None
                if recv_sf is None
                else _scatter_rows(recv_sf.repeat_interleave(K, 0), flat_slot, flat_valid, num_expanded)
            )
            recv_topk_idx = None
            recv_topk_weights = (
                None
                if recv_weights is None
                else _scatter_rows(recv_weights.reshape(-1), flat_slot, flat_valid, num_expanded)
            )
            # Expand psum: exclusive aligned start plus the real count (S_e + c_e).
            psum_expert = (exp_start + unaligned).to(torch.int32)
            metadata = metadata[:num_recv_tokens]
            # Rows past the last expert's aligned end and (here) the padding gaps are zero,
            # which is what do_zero_padding promises; DeepEP leaves them unspecified otherwise.

        token_metadata_at_forward = channel_linked_list = None
        if self.num_scaleout_ranks > 1:
            psum_rank_i32, metadata, dst_buffer_slot_idx, token_metadata_at_forward, channel_linked_list = (
                self._hybrid_handle(topk_idx, M, E, metadata, int(num_valid), do_expand)
            )

        per_expert_list = aligned.tolist() if do_cpu_sync else []
        handle = EPHandle(
            do_expand,
            E,
            A,
            M,
            self.get_theoretical_num_sms(E, K) if num_sms == 0 else num_sms,
            topk_idx.clone() if do_handle_copy else topk_idx,
            num_recv_tokens,
            num_expanded,
            per_expert_list,
            psum_rank_i32,
            psum_expert,
            unaligned_i32,
            metadata,
            dst_buffer_slot_idx,
            token_metadata_at_forward,
            channel_linked_list,
        )
        recv_x_ret = recv_x_out if recv_sf_out is None else (recv_x_out, recv_sf_out)
        return recv_x_ret, recv_topk_idx, recv_topk_weights, handle, _NoEvent()

    def _hybrid_handle(
        self, topk_idx: torch.Tensor, M: int, E: int, metadata: torch.Tensor, num_valid: int, do_expand: bool
    ) -> tuple:
        """The hybrid-mode handle tensors of a dispatch whose direct-mode ``metadata``
        (rows sorted by ``src_rank·M + t``, ``num_valid`` real ones) was just received:
        ``(psum [U], recv_src_metadata, dst_buffer_slot_idx [C, S, mtpc, K],
        token_metadata_at_forward [C, L, 2+2K], channel_linked_list [C, L, U])``,
        L = S·mtpc + 1, all int32 (module doc: what is DeepEP's, what is our model).

        One more all-to-all shares every rank's routing (``[M, K]``, −1 padded),
        then :func:`_hybrid_layout` runs on the host.
        """
        R, S, U, C = self.num_ranks, self.num_scaleout_ranks, self.num_scaleup_ranks, self.num_channels
        T, K = topk_idx.shape
        device = metadata.device
        mine = torch.full((M, K), -1, dtype=torch.int64, device=device)
        mine[:T] = topk_idx
        routing = self.all_to_all(mine.unsqueeze(0).expand(R, M, K).contiguous()).tolist()  # [R(src), M, K]
        layout = _hybrid_layout(routing, self.rank_idx, S, U, M, C, E)

        counts = layout.recv_counts
        if sum(counts) != num_valid:
            raise RuntimeError(f"hybrid layout: {sum(counts)} tokens routed here, {num_valid} received")
        gids = metadata[:num_valid, 0].tolist()
        if sorted(layout.recv_slot) != gids:
            raise RuntimeError("hybrid layout: the routed tokens are not the received ones")
        psum = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
        seg_start = [sum(counts[:u]) for u in range(U)]
        seg_row = {gid: seg_start[u] + slot for gid, (u, slot) in layout.recv_slot.items()}

        # Column 1: the scale-up slot (the row's place in its peer segment) times K, plus kmax.
        slot = torch.tensor([layout.recv_slot[g][1] for g in gids], dtype=torch.int32, device=device)
        metadata[:num_valid, 1] = slot * K + metadata[:num_valid, 1] % K
        if do_expand:
            # DeepEP's deterministic_sort permutes only the expanded rows: recv_src_metadata
            # (and what the linked list points at) stays in peer-segment order.
            order = torch.tensor([seg_row[g] for g in gids], dtype=torch.int64, device=device)
            segmented = metadata.clone()
            segmented[order] = metadata[:num_valid]
            metadata = segmented
            row_of = seg_row
        else:
            # Non-expand: rows sorted by src_rank·M + t, the linked list remapped to them.
            row_of = {g: i for i, g in enumerate(gids)}

        rows = forward_rows(S, M, C)
        links = torch.full((C, rows, U), -1, dtype=torch.int32)
        for (c, u), linked in layout.links.items():
            # Rows past the list hold -1: the terminator, then cells DeepEP leaves unwritten.
            links[c, : len(linked), u] = torch.tensor([row_of[g] for g in linked], dtype=torch.int32)
        int32 = dict(dtype=torch.int32, device=device)
        return (
            psum,
            metadata,
            torch.tensor(layout.dst_buffer_slot_idx, **int32).reshape(C, S, tokens_per_channel(M, C), K),
            torch.tensor(layout.token_metadata_at_forward, **int32).reshape(C, rows, token_metadata_cols(K)),
            links.to(device),
        )

    def _cached_dispatch(self, x: TensorOrPair, handle: EPHandle) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Dispatch ``x`` along the routing a previous dispatch stored in ``handle``.

        Sender slots come from ``dst_buffer_slot_idx`` (set on the last lane per
        destination rank), receiver rows from ``recv_src_metadata`` and the
        per-rank psum, expand slots from ``recv_src_metadata[:, 2:]``: no
        routing is recomputed and no count is exchanged. Rows: the handle's N
        (decode) or X (expand, padding rows zero).
        """
        x, sf = x if isinstance(x, tuple) else (x, None)
        R, rank = self.num_ranks, self.rank_idx
        M = handle.num_max_tokens_per_rank
        T, H = x.shape
        K = handle.topk_idx.shape[1]
        EL = handle.num_experts // R
        device = x.device
        if T != handle.topk_idx.shape[0]:
            raise RuntimeError(f"Assertion exception: cached dispatch x has {T} tokens, the handle {handle.topk_idx.shape[0]}")
        if self.num_scaleout_ranks > 1:
            self._check_hybrid_handle(handle, cached_dispatch=True)
            return self._hybrid_cached_dispatch(x, sf, handle)

        # ---- sender: the slot each (token, rank) pair got at dispatch
        dst = handle.dst_buffer_slot_idx.to(torch.int64)  # [T, K], rank * M + slot or -1
        lane_valid = dst >= 0
        dest_rank = torch.where(lane_valid, handle.topk_idx.to(torch.int64) // EL, 0)
        flat_dest = (dest_rank * M + dst - rank * M).reshape(-1)
        parts = [_as_bytes(x)] + ([] if sf is None else [_as_bytes(sf)])
        payload = torch.cat(parts, dim=1)  # [T, B]
        B = payload.shape[1]
        send = _scatter_rows(payload.repeat_interleave(K, 0), flat_dest, lane_valid.reshape(-1), R * M)
        recv = self.all_to_all(send.reshape(R, M, B)).reshape(R * M, B)  # [R(src) * M, B]

        # ---- receiver: row r holds slot r - (rows of earlier sources) of its source
        metadata = handle.recv_src_metadata
        n_rows = metadata.shape[0]
        psum = handle.psum_num_recv_tokens_per_scaleup_rank.to(torch.int64)
        excl = torch.cat([psum.new_zeros(1), psum[:-1]])
        r_idx = torch.arange(n_rows, device=device)
        row_valid = r_idx < psum[-1]
        src_rank = (metadata[:, 0].to(torch.int64) // M).clamp(0, R - 1)
        src_flat = (src_rank * M + r_idx - excl[src_rank]).clamp(0, R * M - 1)
        rows = torch.where(row_valid.unsqueeze(1), recv[src_flat], 0)  # [N, B]
        if handle.do_expand:
            slots = metadata[:, 2:].to(torch.int64)
            slot_valid = (slots >= 0) & row_valid.unsqueeze(1)
            rows = _scatter_rows(rows.repeat_interleave(K, 0), slots.reshape(-1), slot_valid.reshape(-1),
                                 handle.num_expanded_tokens)
        recv_x = _from_bytes(rows[:, : H * x.element_size()], x.dtype, H)
        recv_sf = None
        if sf is not None:
            P = sf.shape[1]
            recv_sf = _from_bytes(rows[:, H * x.element_size() :], sf.dtype, P)
        return recv_x, recv_sf

    def _check_hybrid_handle(self, handle: EPHandle, cached_dispatch: bool) -> None:
        """DeepEP's host asserts on a hybrid handle (``buffer.hpp``): U psum entries,
        and channel-shaped tensors for this buffer's C (a cached dispatch
        recomputes C; combine reads it off ``token_metadata_at_forward``)."""
        S, U = self.num_scaleout_ranks, self.num_scaleup_ranks
        M, K = handle.num_max_tokens_per_rank, handle.topk_idx.shape[1]
        psum = handle.psum_num_recv_tokens_per_scaleup_rank
        forward, links = handle.token_metadata_at_forward, handle.channel_linked_list
        if tuple(psum.shape) != (U,) or forward is None or links is None or forward.dim() != 3:
            raise RuntimeError(
                f"Assertion exception: hybrid mode ({S}x{U}) needs a hybrid handle: "
                f"psum_num_recv_tokens_per_scaleup_rank [{U}] and token_metadata_at_forward / channel_linked_list, "
                f"got psum {tuple(psum.shape)}"
            )
        C = self.num_channels if cached_dispatch else forward.shape[0]
        rows = forward_rows(S, M, C)
        expected = {
            "token_metadata_at_forward": (C, rows, token_metadata_cols(K)),
            "channel_linked_list": (C, rows, U),
        }
        if cached_dispatch:
            expected["dst_buffer_slot_idx"] = (C, S, tokens_per_channel(M, C), K)
        for name, shape in expected.items():
            if tuple(getattr(handle, name).shape) != shape:
                raise RuntimeError(
                    f"Assertion exception: hybrid handle {name} has shape {tuple(getattr(handle, name).shape)}, "
                    f"expected {shape} ({C} channels)"
                )

    def _hybrid_cached_dispatch(
        self, x: torch.Tensor, sf: Optional[torch.Tensor], handle: EPHandle
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Hybrid mode's cached dispatch: as DeepEP's hybrid sender, the sender
        recomputes where its tokens go from ``topk_idx`` (here: token t to block t
        of every rank it routes to), and every received row is put back where the
        handle's dispatch put it, read off ``recv_src_metadata`` (its source
        ``src_rank·M + t``, and the expand slots)."""
        R = self.num_ranks
        M = handle.num_max_tokens_per_rank
        T, H = x.shape
        K = handle.topk_idx.shape[1]
        EL = handle.num_experts // R
        device = x.device
        idx = handle.topk_idx.to(torch.int64)
        rank_of_lane = torch.where(idx >= 0, idx // EL, -1)
        to_rank = (rank_of_lane.unsqueeze(2) == torch.arange(R, device=device)).any(dim=1)  # [T, R]
        payload = torch.cat([_as_bytes(x)] + ([] if sf is None else [_as_bytes(sf)]), dim=1)  # [T, B]
        B = payload.shape[1]
        send = payload.new_zeros(R, M, B)
        send[:, :T] = torch.where(to_rank.t().unsqueeze(2), payload.unsqueeze(0), 0)
        recv = self.all_to_all(send).reshape(R * M, B)  # row src_rank·M + t

        metadata = handle.recv_src_metadata
        n_rows = metadata.shape[0]
        row_valid = torch.arange(n_rows, device=device) < handle.psum_num_recv_tokens_per_scaleup_rank[-1]
        gid = metadata[:, 0].to(torch.int64).clamp(0, R * M - 1)
        rows = torch.where(row_valid.unsqueeze(1), recv[gid], 0)  # [N, B]
        if handle.do_expand:
            slots = metadata[:, 2:].to(torch.int64)
            slot_valid = (slots >= 0) & row_valid.unsqueeze(1)
            rows = _scatter_rows(rows.repeat_interleave(K, 0), slots.reshape(-1), slot_valid.reshape(-1),
                                 handle.num_expanded_tokens)
        recv_x = _from_bytes(rows[:, : H * x.element_size()], x.dtype, H)
        recv_sf = None if sf is None else _from_bytes(rows[:, H * x.element_size() :], sf.dtype, sf.shape[1])
        return recv_x, recv_sf

    # --------------------------------------------------------------- combine
    def combine(
        self,
        x: torch.Tensor,
        handle: EPHandle,
        topk_weights: Optional[torch.Tensor] = None,
        bias: Union[None, torch.Tensor, Sequence[torch.Tensor]] = None,
        num_sms: int = 0,
        num_qps: int = 0,
        previous_event=None,
        previous_event_before_epilogue=None,
        async_with_compute_stream: bool = False,
        allocate_on_comm_stream: bool = False,
        out: Optional[torch.Tensor] = None,
        defer_epilogue: bool = False,
    ):
        """DeepEP's ``ElasticBuffer.combine``, reductions as contract §4 (hybrid mode: §9).

        Reads only the handle fields DeepEP's combine reads: ``recv_src_metadata``,
        ``topk_idx``, ``psum_num_recv_tokens_per_scaleup_rank``, ``num_experts``,
        ``num_max_tokens_per_rank`` and ``do_expand``.

        ``out`` (an extension, not in DeepEP's API): [T, H] bf16 to write
        the result into instead of allocating it.

        Returns ``(combined_x [T, H] bf16, combined_topk_weights [T, K] f32 or None, event)``;
        with ``defer_epilogue=True`` (v2.5's keyword; needs ``async_with_compute_stream``)
        a :class:`DeferredEvent` whose ``wait()`` returns the first two.
        """
        if defer_epilogue and not async_with_compute_stream:
            raise RuntimeError("Assertion exception: defer_epilogue requires async_with_compute_stream")
        steps = self._combine_steps(x, handle, topk_weights, bias, out)
        return DeferredEvent(steps) if defer_epilogue else _run(steps)

    def _combine_steps(self, x, handle, topk_weights, bias, out):
        """:meth:`combine` as steps: send, yield the transfer in flight, reduce; returns combine's 3-tuple."""
        if x.dtype != torch.bfloat16:
            raise RuntimeError(f"Assertion exception: combine x must be bfloat16, got {x.dtype}")
        R = self.num_ranks
        M = handle.num_max_tokens_per_rank
        E = handle.num_experts
        EL = E // R
        metadata = handle.recv_src_metadata
        topk_idx = handle.topk_idx
        T, K = topk_idx.shape
        H = x.shape[1]
        device = x.device
        multi_reduction = self.allow_multiple_reduction or not handle.do_expand
        if handle.do_expand and not self.allow_multiple_reduction and topk_weights is not None:
            raise RuntimeError("Assertion exception: expand combine without multiple reduction takes no topk_weights")
        # Hybrid combine reduces per rank, per node, then across nodes (contract §9); without
        # multiple reduction it rounds as direct mode does.
        hybrid_reduce = self.num_scaleout_ranks > 1 and self.allow_multiple_reduction
        if self.num_scaleout_ranks > 1:
            self._check_hybrid_handle(handle, cached_dispatch=False)

        n_rows = metadata.shape[0]
        row_valid = torch.arange(n_rows, device=device) < handle.psum_num_recv_tokens_per_scaleup_rank[-1]
        gid = metadata[:, 0].to(torch.int64)
        # Rows go back to (source rank, source token) = divmod(global id, M).
        back_dest = gid  # == src_rank * M + t, a flat index into [R, M]

        slots = metadata[:, 2:].to(torch.int64)
        local_lane = (slots >= 0) & row_valid.unsqueeze(1) if handle.do_expand else None
        if not handle.do_expand:
            contrib = x[:n_rows].unsqueeze(1)  # [rows, 1, H]
        else:
            gathered = x[slots.clamp(min=0)].float() * local_lane.unsqueeze(2)  # [rows, K, H]
            if multi_reduction:
                acc = torch.zeros(n_rows, H, dtype=torch.float32, device=device)
                for k in range(K):  # lane order, fp32, one rounding
                    acc += gathered[:, k]
                contrib = acc.to(torch.bfloat16).unsqueeze(1)
            else:
                contrib = gathered.to(torch.bfloat16)  # every lane's row, reduced at the source

        parts = [_as_bytes(contrib.reshape(n_rows, contrib.shape[1] * H))]
        if topk_weights is not None:
            if handle.do_expand:
                w = torch.where(local_lane, topk_weights[slots.clamp(min=0)], 0.0)
            else:
                w = topk_weights
            parts.append(_as_bytes(w.to(torch.float32)))
        payload = torch.cat(parts, dim=1)
        B = payload.shape[1]
        send = _scatter_rows(payload, back_dest, row_valid, R * M).reshape(R, M, B)
        recv, sent = self.all_to_all_async(send)  # [R(dst), M, B]: what rank d sends back for my token t
        yield (sent,)

        lanes_per_row = contrib.shape[1]
        back = _from_bytes(recv.reshape(R * M, B)[:, : lanes_per_row * H * 2], torch.bfloat16, lanes_per_row * H)
        back = back.reshape(R, M, lanes_per_row, H)[:, :T].float()

        valid_lane = topk_idx >= 0
        rank_of_lane = torch.where(valid_lane, topk_idx // EL, torch.full_like(topk_idx, -1)).to(torch.int64)
        t_idx = torch.arange(T, device=device)
        acc = torch.zeros(T, H, dtype=torch.float32, device=device)
        for b in ([] if bias is None else ([bias] if isinstance(bias, torch.Tensor) else list(bias))):
            acc += b.float()
        reduce_lane = _last_lane_per_rank(rank_of_lane, valid_lane) if multi_reduction else valid_lane
        if hybrid_reduce:
            # Each node's ranks (by last lane) summed in fp32 and rounded to bf16 (on
            # DeepEP's forwarder), then the nodes (by last lane) into acc.
            node_of_lane = torch.where(valid_lane, rank_of_lane // self.num_scaleup_ranks, -1)
            node_last = _last_lane_per_rank(node_of_lane, valid_lane)
            node_acc = torch.zeros(T, self.num_scaleout_ranks, H, dtype=torch.float32, device=device)
        for k in range(K):
            lane_row = 0 if multi_reduction else k
            term = back[rank_of_lane[:, k].clamp(min=0), t_idx, lane_row]
            if not hybrid_reduce:
                acc += torch.where(reduce_lane[:, k].unsqueeze(1), term, 0.0)
                continue
            node_k = node_of_lane[:, k].clamp(min=0)
            partial = node_acc[t_idx, node_k] + torch.where(reduce_lane[:, k].unsqueeze(1), term, 0.0)
            node_acc[t_idx, node_k] = partial
            acc += torch.where(node_last[:, k].unsqueeze(1), partial.to(torch.bfloat16).float(), 0.0)
        combined_x = acc.to(torch.bfloat16) if out is None else out.copy_(acc)

        combined_topk_weights = None
        if topk_weights is not None:
            w_back = _from_bytes(recv.reshape(R * M, B)[:, lanes_per_row * H * 2 :], torch.float32, K)
            w_back = w_back.reshape(R, M, K)[:, :T]
            picked = w_back[rank_of_lane.clamp(min=0), t_idx.unsqueeze(1), torch.arange(K, device=device)]
            combined_topk_weights = torch.where(valid_lane, picked, 0.0)
        return combined_x, combined_topk_weights, _NoEvent()
