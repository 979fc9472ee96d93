"""MoE prepare/finalize over the ``deepep_ops::`` ops, with the semantics of vLLM's
``DeepEPV2PrepareAndFinalize``, written so that ``torch.compile(fullgraph=True)``
sees all of it.

Everything around dispatch and combine is plain torch, so Inductor fuses it:
block-fp8 quantization before dispatch and the local→global expert-id rewrite
(a hand-written Triton kernel in vLLM). The top-k weight-and-reduce is plain
torch too, except in decode (k > 1 lanes per row) on CUDA without gradients, where it is the
``deepep_ops::weight_and_reduce`` op: one Triton kernel that reads only the
routed lanes (:mod:`deepep_ops.reduce`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, NoReturn, Optional, Sequence, Union

import torch

from deepep_ops.agreement import agree_combine
from deepep_ops.api import (
    PendingCombine,
    PendingDispatch,
    combine,
    combine_start,
    combine_wait,
    dispatch,
    dispatch_exact,
    dispatch_exact_start,
    dispatch_start,
    dispatch_wait,
)
from deepep_ops.bucket import token_bucket
from deepep_ops.buffer import EPOpsBuffer, as_ep_buffer
from deepep_ops.handle import DispatchHandle
from deepep_ops.layout import IntLike
from deepep_ops.reduce import reduce_lanes, reduce_lanes_fused, weight_and_reduce_traced


#: Block-fp8 activation quantization: per-token groups of this many channels.
FP8_BLOCK = 128
_FP8_DTYPE = torch.float8_e4m3fn


def quantize_block_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group (1×128) e4m3 quantization.

    Args:
        x: [T, H] with H % 128 == 0.
    Returns:
        (q [T, H] float8_e4m3fn, scales [T, H/128] float32) with x ≈ q * scale.
    """
    # Constants stay local: Dynamo lifts module-level Python floats to symbolic
    # inputs under dynamic=True, which restarts tracing (a second compile).
    fp8_max = torch.finfo(_FP8_DTYPE).max
    T, H = x.shape
    # Eager only: under torch.compile the view below fails at trace time anyway,
    # and a check here would add a guard to the graph.
    if not torch.compiler.is_compiling() and H % FP8_BLOCK:
        raise ValueError(
            f"quantize_block_fp8: the hidden size x.shape[1] must be a multiple of {FP8_BLOCK} "
            f"for block-fp8 dispatch, got {H}"
        )
    groups = x.float().view(T, H // FP8_BLOCK, FP8_BLOCK)
    scales = groups.abs().amax(dim=-1).clamp(min=1e-10) / fp8_max
    q = (groups / scales.unsqueeze(-1)).clamp(-fp8_max, fp8_max).to(_FP8_DTYPE)
    return q.view(T, H), scales


def dequantize_block_fp8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of :func:`quantize_block_fp8`: [T, H] fp8 + [T, H/128] → [T, H] ``dtype``."""
    T, H = q.shape
    groups = q.float().view(T, H // FP8_BLOCK, FP8_BLOCK) * scales.unsqueeze(-1)
    return groups.view(T, H).to(dtype)


class PreparedTokens(NamedTuple):
    """What the experts receive (vLLM's ``PrepareResultType`` plus the handle).

    Decode (rows = R·M): ``topk_ids`` [rows, K] global expert ids, −1 for other
    ranks' experts, empty slots and every padding row; ``topk_weights`` [rows, K].
    Prefill (rows = X): one row per (token, local expert), ``topk_ids`` and
    ``topk_weights`` [X, 1]; ``expert_num_tokens`` [EL] int32 (aligned counts).
    """

    expert_x: torch.Tensor
    expert_x_scale: Optional[torch.Tensor]
    expert_num_tokens: Optional[torch.Tensor]
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    handle: DispatchHandle
    #: [T, H] the shared expert's output on this rank's own tokens, computed
    #: while the tokens were in flight; None without ``shared_experts``.
    shared_output: Optional[torch.Tensor] = None


class PendingPrepare(NamedTuple):
    """A started :meth:`DeepEPPrepareFinalize.prepare_start`: hand it to ``prepare_wait`` once."""

    dispatch: PendingDispatch
    defer_globalize: bool


_INPUT_DTYPES = {
    "a1": (torch.bfloat16, "tokens; fp8 dispatch quantizes them itself"),
    "topk_ids": (torch.int64, "global expert ids, -1 for an empty slot"),
    "topk_weights": (torch.float32, "router weights"),
}


def _check_dtypes(**tensors: Optional[torch.Tensor]) -> None:
    """TypeError naming the first of ``prepare``'s inputs whose dtype is wrong (None: checked already)."""
    for name, tensor in tensors.items():
        dtype, what = _INPUT_DTYPES[name]
        if tensor is not None and tensor.dtype != dtype:
            raise TypeError(f"prepare: {name} must be {dtype} ({what}), got {tensor.dtype}")


class DeepEPPrepareFinalize:
    """Prepare (quantize + dispatch + receiver) and finalize (weight-and-reduce + combine).

    Args:
        buffer: the EP buffer (an :class:`EPOpsBuffer` or a backend to wrap).
        num_experts: E, global.
        num_topk: K.
        decode: True for the graph-safe path (no expand, no CPU sync, R·M rows,
            CUDA-graph capturable); False for prefill (expand + CPU sync, exact rows).
        use_fp8_dispatch: quantize to block fp8 (1×128, e4m3, float32 scales)
            before dispatch; otherwise dispatch bf16.
        expert_alignment: A, rows per local expert rounded up to it (prefill).
        device: where the tokens live.
        shared_experts: optional [T, H] → [T, H] module (DeepSeek / Qwen-MoE
            style shared expert). :meth:`prepare` then starts the dispatch, runs
            it on the tokens while they are in flight, waits, and returns its
            output as ``PreparedTokens.shared_output`` (the caller adds it to
            the combined output). No gradient: inference only (the async ops).
    """

    def __init__(
        self,
        buffer: EPOpsBuffer,
        num_experts: int,
        num_topk: int,
        *,
        decode: bool,
        use_fp8_dispatch: bool = False,
        expert_alignment: int = 1,
        device: Union[torch.device, str] = "cpu",
        shared_experts: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        self.buffer = as_ep_buffer(buffer)
        self.shared_experts = shared_experts
        self.num_experts = num_experts
        self.num_topk = num_topk
        self.decode = decode
        self.use_fp8_dispatch = use_fp8_dispatch
        self.expert_alignment = expert_alignment
        self.num_local_experts = num_experts // self.buffer.num_ranks
        self.capacity = self.buffer.capacity
        # A tensor, not an int: under torch.compile it is a graph input, so one
        # graph serves every rank instead of one per rank with the offset baked in.
        self.rank_expert_offset = torch.tensor(
            self.buffer.rank * self.num_local_experts, dtype=torch.int64, device=device
        )

    def prepare(
        self,
        a1: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        apply_router_weight_on_input: bool = False,
        num_max_tokens_per_rank: Optional[IntLike] = None,
        defer_globalize: bool = False,
    ) -> PreparedTokens:
        """Quantize (block fp8) and dispatch; rewrite expert ids for the experts.

        Args:
            a1: [T, H] bf16 tokens.
            topk_weights: [T, K] float32 router weights.
            topk_ids: [T, K] int64 global expert ids, −1 for none.
            apply_router_weight_on_input: scale tokens by their (top-1) weight
                before dispatch; finalize then does not weight again.
            num_max_tokens_per_rank: decode only. The bucket M, the same on every
                rank: ``pow2_bucket(max tokens over the DP group, capacity)``
                computed on the host (cheapest; a SymInt in the graph). ``None``
                derives it in the graph with :func:`deepep_ops.token_bucket`.
                Prefill always uses the buffer capacity.
                (``EPOpsBuffer.bucket`` computes the same M on the host.)
            defer_globalize: decode only: return the local ids DeepEP received
                (−1 for other ranks' experts; padding rows unspecified) for
                experts that add ``rank_expert_offset`` themselves (vLLM 0.33).

        With ``shared_experts`` the dispatch is asynchronous (:meth:`prepare_start`,
        the shared expert, :meth:`prepare_wait`), except where ``a1`` requires
        grad: the async ops have no gradient, so it dispatches, then runs the
        shared expert.

        Raises:
            TypeError: a wrong input dtype, up front: under ``torch.compile``
                this is the error the compiler reports (otherwise a float32
                ``a1`` would only surface later, as finalize's bf16 error).
        """
        if self.shared_experts is not None:
            if torch.is_grad_enabled() and a1.requires_grad:
                # The async ops have no gradient: dispatch, then the shared expert.
                prepared = self._prepare_sync(
                    a1, topk_weights, topk_ids, apply_router_weight_on_input, num_max_tokens_per_rank, defer_globalize
                )
                return prepared._replace(shared_output=self.shared_experts(a1))
            pending = self.prepare_start(
                a1, topk_weights, topk_ids, apply_router_weight_on_input=apply_router_weight_on_input,
                num_max_tokens_per_rank=num_max_tokens_per_rank, defer_globalize=defer_globalize,
            )
            # The shared expert runs while the tokens are in flight (its input: the tokens as given).
            shared_output = self.shared_experts(a1)
            return self.prepare_wait(pending, overlap=(shared_output,))._replace(shared_output=shared_output)
        return self._prepare_sync(
            a1, topk_weights, topk_ids, apply_router_weight_on_input, num_max_tokens_per_rank, defer_globalize
        )

    def _prepare_sync(
        self, a1, topk_weights, topk_ids, apply_router_weight_on_input, num_max_tokens_per_rank, defer_globalize
    ) -> PreparedTokens:
        out = self._dispatch_with(
            dispatch if self.decode else dispatch_exact,
            a1, topk_weights, topk_ids, apply_router_weight_on_input, num_max_tokens_per_rank,
        )
        return self._received(out, a1.device, defer_globalize)

    def _dispatch_with(self, op, a1, topk_weights, topk_ids, apply_router_weight_on_input, num_max_tokens_per_rank):
        """The tokens quantized (or weighted) by :meth:`_dispatch_inputs`, then ``op`` on them:
        this layout's dispatch or its start. Returns what ``op`` returns."""
        a1, scales, num_max_tokens_per_rank = self._dispatch_inputs(
            a1, topk_weights, topk_ids, apply_router_weight_on_input, num_max_tokens_per_rank
        )
        return op(
            a1,
            topk_ids,
            topk_weights,
            self.buffer,
            num_experts=self.num_experts,
            num_max_tokens_per_rank=num_max_tokens_per_rank,
            expert_alignment=self.expert_alignment,
            x_scales=scales,
        )

    def prepare_start(
        self,
        a1: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        apply_router_weight_on_input: bool = False,
        num_max_tokens_per_rank: Optional[IntLike] = None,
        defer_globalize: bool = False,
    ) -> "PendingPrepare":
        """:meth:`prepare` up to the dispatch's start (:func:`deepep_ops.dispatch_start`):
        the tokens are in flight until :meth:`prepare_wait`, which returns the
        :class:`PreparedTokens`. Same arguments as :meth:`prepare`; no gradient."""
        pending = self._dispatch_with(
            dispatch_start if self.decode else dispatch_exact_start,
            a1, topk_weights, topk_ids, apply_router_weight_on_input, num_max_tokens_per_rank,
        )
        return PendingPrepare(pending, defer_globalize)

    def prepare_wait(self, pending: "PendingPrepare", overlap: Sequence[torch.Tensor] = ()) -> PreparedTokens:
        """The :class:`PreparedTokens` of a :meth:`prepare_start`. ``overlap``: the
        results of the work done in between (see :func:`deepep_ops.dispatch_wait`)."""
        out = dispatch_wait(pending.dispatch, overlap)
        return self._received(out, pending.dispatch.args.x.device, pending.defer_globalize)

    def _dispatch_inputs(self, a1, topk_weights, topk_ids, apply_router_weight_on_input, num_max_tokens_per_rank):
        """``(tokens, scales or None, M)`` to dispatch: weighted on input if asked,
        block-fp8 quantized if configured, every dtype checked; M the given or
        in-graph bucket (decode) or the capacity (prefill)."""
        # Each input is checked just before the code first reads it: Dynamo numbers
        # graph inputs in the order of first reads, and graphs/*.txt record that order.
        if apply_router_weight_on_input:
            _check_dtypes(topk_ids=topk_ids, a1=a1, topk_weights=topk_weights)
            if topk_ids.shape[1] != 1:
                raise ValueError(
                    "prepare: apply_router_weight_on_input needs num_topk == 1, "
                    f"got topk_ids of shape {tuple(topk_ids.shape)}"
                )
            a1 = a1 * topk_weights.to(a1.dtype)
        scales = None
        if self.use_fp8_dispatch:
            if torch.is_grad_enabled() and a1.requires_grad:
                # Block-fp8 dispatch has no gradient (deepep_ops.autograd): fp8 rows
                # cannot carry a bf16 gradient, so a1 would silently get none.
                raise ValueError(
                    "prepare: use_fp8_dispatch=True is inference-only; a1 requires grad "
                    "(train with bf16 dispatch, or detach a1)"
                )
            _check_dtypes(a1=a1)
            a1, scales = quantize_block_fp8(a1)

        unchecked_a1 = None if self.use_fp8_dispatch else a1  # fp8: checked before quantizing
        if not self.decode:
            _check_dtypes(a1=unchecked_a1, topk_ids=topk_ids, topk_weights=topk_weights)
            return a1, scales, self.capacity
        if num_max_tokens_per_rank is None:
            num_max_tokens_per_rank = token_bucket(a1, self.buffer)
        _check_dtypes(a1=unchecked_a1, topk_ids=topk_ids, topk_weights=topk_weights)
        return a1, scales, num_max_tokens_per_rank

    def _received(self, out, device: torch.device, defer_globalize: bool) -> PreparedTokens:
        """What the experts get from a dispatch's result (global expert ids)."""
        if not self.decode:
            # Rows are grouped by local expert: expert e owns counts[e] (aligned) rows.
            local_ids = torch.arange(self.num_local_experts, device=device, dtype=torch.int64)
            global_ids = torch.repeat_interleave(
                local_ids + self.rank_expert_offset,
                out.num_recv_tokens_per_expert,
                output_size=out.recv_x.shape[0],
            )
            return PreparedTokens(
                out.recv_x,
                out.recv_x_scales,
                out.num_recv_tokens_per_expert,
                global_ids.unsqueeze(1),
                out.recv_topk_weights.unsqueeze(1),
                out.handle,
            )
        if defer_globalize:
            return PreparedTokens(
                out.recv_x, out.recv_x_scales, None, out.recv_topk_idx, out.recv_topk_weights, out.handle
            )
        # Local ids → global; -1 stays -1, and so does every row past the real
        # count (DeepEP leaves those rows stale: they can alias local expert 0).
        rows = out.recv_topk_idx.shape[0]
        num_recv = out.handle.psum_num_recv_tokens_per_scaleup_rank[-1]
        is_padding_row = torch.arange(rows, device=device) >= num_recv
        is_unrouted = (out.recv_topk_idx < 0) | is_padding_row.unsqueeze(1)
        # masked_fill_ takes -1 as a kernel argument; torch.where would first
        # make it a device tensor, one more launch on every eager step.
        global_ids = (out.recv_topk_idx + self.rank_expert_offset).masked_fill_(is_unrouted, -1)
        return PreparedTokens(out.recv_x, out.recv_x_scales, None, global_ids, out.recv_topk_weights, out.handle)

    def finalize(
        self,
        output: torch.Tensor,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        handle: DispatchHandle,
        *,
        apply_router_weight_on_input: bool = False,
    ) -> None:
        """Weight-and-reduce over top-k, combine, and write ``output``.

        Args:
            output: [T, H] bf16, written in place.
            fused_expert_output: [rows, k, H] or [rows·k, H] per (row, lane)
                outputs, k = ``topk_ids.shape[1]`` (K in decode, 1 in prefill).
            topk_weights, topk_ids: as :meth:`prepare` returned them.
            handle: from :meth:`prepare`.
        """
        try:
            reduced = weight_and_reduce(fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input)
        except (ValueError, TypeError) as error:
            self._reject(error, fused_expert_output, handle)
        self.finalize_reduced(output, reduced, handle)

    def finalize_start(
        self,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        handle: DispatchHandle,
        *,
        apply_router_weight_on_input: bool = False,
    ) -> PendingCombine:
        """:meth:`finalize` up to the combine's start (:func:`deepep_ops.combine_start`):
        weight-and-reduce, then the expert outputs are in flight until
        :meth:`finalize_wait`. Same arguments as :meth:`finalize` less ``output``;
        no gradient."""
        try:
            reduced = weight_and_reduce(fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input)
        except (ValueError, TypeError) as error:
            self._reject(error, fused_expert_output, handle)
        return self.finalize_reduced_start(reduced, handle)

    def finalize_reduced_start(self, reduced: torch.Tensor, handle: DispatchHandle) -> PendingCombine:
        """:meth:`finalize_reduced` up to the combine's start: ``reduced`` [rows, H]
        bf16 is in flight until :meth:`finalize_wait`; no gradient."""
        self._check_reduced(reduced, handle)
        return combine_start(reduced, handle, self.buffer)

    def finalize_wait(
        self, output: torch.Tensor, pending: PendingCombine, overlap: Sequence[torch.Tensor] = ()
    ) -> None:
        """Wait for a :meth:`finalize_start` and write ``output`` [T, H] bf16 in place.
        ``overlap``: the results of the work done in between (see
        :func:`deepep_ops.dispatch_wait`)."""
        output.copy_(combine_wait(pending, overlap))

    def finalize_reduced(self, output: torch.Tensor, reduced: torch.Tensor, handle: DispatchHandle) -> None:
        """Combine already weighted-and-reduced rows and write ``output``.

        Args:
            output: [T, H] bf16, written in place.
            reduced: [rows, H] bf16, one row per received row (decode: R·M, prefill: X).
            handle: from :meth:`prepare`.
        """
        self._check_reduced(reduced, handle)
        output.copy_(combine(reduced, handle, self.buffer))

    def _check_reduced(self, reduced: torch.Tensor, handle: DispatchHandle) -> None:
        if reduced.dtype != torch.bfloat16:
            self._reject(ValueError(
                "finalize: DeepEP combine needs bfloat16 expert outputs, "
                f"got reduced expert outputs of dtype {reduced.dtype}"
            ), reduced, handle)

    def _reject(self, error: Exception, rows: torch.Tensor, handle: DispatchHandle) -> NoReturn:
        """Raise ``error``, a rejection of this rank's expert outputs before combine.

        Its peers are entering combine. In check mode (:mod:`deepep_ops.agreement`)
        this rank takes part in combine's exchange with the error, so every peer
        raises it (naming this rank) instead of waiting in combine's collective
        for the process-group timeout. In agree-once mode peers do not exchange on
        a seen combine, and the error stays local (the agreement's documented
        limit). Under tracing there is no exchange: the compile fails as before.
        """
        if not torch.compiler.is_compiling():
            agree_combine("deepep_ops.combine", self.buffer, rows, handle, error)
        raise error


def weight_and_reduce(
    fused_expert_output: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    apply_router_weight_on_input: bool,
) -> torch.Tensor:
    """Σ_k w[r, k] · out[r, k] over lanes routed here (fp32 accumulate, input dtype out).

    Lanes with id −1 contribute exactly 0, whatever their (unspecified) weight or
    expert output holds, so stale padding rows cannot leak NaN into real rows.
    """
    rows, k = topk_ids.shape
    # Eager only: rows may be unbacked under torch.compile (prefill X), where a
    # Python comparison would be a data-dependent guard; the view checks it there.
    if not torch.compiler.is_compiling() and fused_expert_output.numel() != rows * k * fused_expert_output.shape[-1]:
        raise ValueError(
            f"finalize: fused_expert_output must hold rows*k = {rows}*{k} rows of hidden "
            f"{fused_expert_output.shape[-1]} (as topk_ids {tuple(topk_ids.shape)}), got shape "
            f"{tuple(fused_expert_output.shape)}"
        )
    out = fused_expert_output.view(rows, k, fused_expert_output.shape[-1])  # not -1: rows may be 0 (prefill)
    apply_weights = not apply_router_weight_on_input
    if out.is_cuda and k > 1 and not (torch.is_grad_enabled() and (out.requires_grad or topk_weights.requires_grad)):
        # One Triton kernel that reads only the routed lanes (deepep_ops.reduce);
        # it has no backward, so a step that records gradients takes the torch forms.
        # Prefill's one lane per row leaves it nothing to skip: Inductor's kernel
        # does the same work without an opaque op and its host-side launch.
        if torch.compiler.is_compiling():
            # The kernel itself in the graph, launched by Inductor (reduce.weight_and_reduce_traced).
            return weight_and_reduce_traced(out, topk_weights, topk_ids, apply_weights)
        return torch.ops.deepep_ops.weight_and_reduce(out, topk_weights, topk_ids, apply_weights)
    if torch.compiler.is_compiling():
        return reduce_lanes_fused(out, topk_weights, topk_ids, apply_weights)
    return reduce_lanes(out, topk_weights, topk_ids, apply_weights)
