"""vLLM's ``DeepEPV2PrepareAndFinalize`` over the ``deepep_ops::`` ops.

A drop-in for ``vllm.model_executor.layers.fused_moe.prepare_finalize.deepep_v2
.DeepEPV2PrepareAndFinalize`` (vLLM 0.32, 0.33 and 0.34): same constructor, same
``FusedMoEPrepareAndFinalizeModular`` methods, same results (0.34's, on every
version: see :class:`DeepEPV2PrepareAndFinalize`). The work is done by
:class:`deepep_ops.DeepEPPrepareFinalize`, so everything between the modular
kernel's ``prepare`` and ``finalize`` is plain torch plus ``deepep_ops::`` custom ops
that ``torch.compile(fullgraph=True)`` traces: no Triton kernel, no
``_moe_C.moe_sum``, and the decode bucket comes from the in-graph
``deepep_ops::token_bucket`` op rather than from Python ints that vLLM's dropped
Dynamo guards would freeze.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch

from deepep_ops._torch_compat import guard_or_false
from deepep_ops.buffer import EPOpsBuffer, as_ep_buffer
from deepep_ops.bucket import pow2_bucket
from deepep_ops.handle import DispatchHandle
from deepep_ops.prepare_finalize import FP8_BLOCK, DeepEPPrepareFinalize, PreparedTokens
from deepep_ops.warmup import FULL, format_warmup_table, warm_key, warmed_up, warmup, warmup_enabled
from deepep_ops.vllm._compat import (
    FusedMoEQuantConfig,
    TopKWeightAndReduceContiguous,
    TopKWeightAndReduceDelegate,
    TopKWeightAndReduceNoOP,
    can_quantize_after_dispatch,
    current_device_type,
    dbo_active,
    deepep_activation_format,
    dp_max_num_tokens,
    expert_tokens_metadata,
    jit_warmup_enabled,
    jit_warmup_registry,
    mk,
    quantize_input,
    register_jit_warmup,
    ubatch_id,
    vllm_logger,
)

# In vLLM's log (a plain ``deepep_ops`` logger does not reach vLLM's handler).
_log = vllm_logger(__name__)

#: DeepEP moves hidden rows in 512-byte atoms (32 lanes × 16 bytes).
_XFER_ATOM_BYTES = 512


def dp_num_tokens(local_num_tokens: int, sp_size: int = 1) -> int:
    """Tokens to bucket for this step, read from vLLM's forward context.

    ``cdiv(max(dp_metadata.num_tokens_across_dp_cpu), sp_size)`` with a DP group
    (the same on every rank, as DeepEP requires); the local token count when
    there is no forward context or no DP metadata.
    """
    n = dp_max_num_tokens()
    return local_num_tokens if n is None else -(-n // sp_size)


def dp_bucket(local_num_tokens: int, capacity: int, sp_size: int = 1) -> int:
    """``pow2_bucket(dp_num_tokens(...), capacity)``; ValueError past ``capacity``."""
    return pow2_bucket(dp_num_tokens(local_num_tokens, sp_size), capacity)


class ForwardContextTokens:
    """An :class:`EPOpsBuffer` token source: :func:`dp_num_tokens` with a fixed ``sp_size``."""

    def __init__(self, sp_size: int = 1) -> None:
        self.sp_size = sp_size

    def __call__(self, local_num_tokens: int) -> int:
        return dp_num_tokens(local_num_tokens, self.sp_size)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ForwardContextTokens) and other.sp_size == self.sp_size

    def __hash__(self) -> int:
        return hash((ForwardContextTokens, self.sp_size))

    def __repr__(self) -> str:
        return f"vLLM forward-context token count (sp_size={self.sp_size})"


def _quantize_before_dispatch(quant_config: FusedMoEQuantConfig, defer_input_quant: bool) -> bool:
    """vLLM's rule: block-fp8 and mxfp8 are quantized before dispatch."""
    if defer_input_quant:
        return False
    return quant_config.is_block_quantized or quant_config.quant_dtype == "mxfp8"


def _check_block_fp8(quant_config: FusedMoEQuantConfig) -> None:
    if quant_config.quant_dtype == "mxfp8":
        raise NotImplementedError(
            "deepep_ops DeepEPV2PrepareAndFinalize: mxfp8 dispatch is not implemented "
            "(only block fp8, float8_e4m3fn with 1x128 activation groups)"
        )
    if quant_config.quant_dtype != torch.float8_e4m3fn or quant_config.block_shape[1] != FP8_BLOCK:
        raise NotImplementedError(
            "deepep_ops DeepEPV2PrepareAndFinalize: block-quantized dispatch supports "
            f"float8_e4m3fn with block_shape [*, {FP8_BLOCK}] only, got quant_dtype="
            f"{quant_config.quant_dtype}, block_shape={quant_config.block_shape}"
        )


class _WarmupSpec(NamedTuple):
    """What one adapter warms (hashable: a JIT warm-up registry compile key)."""

    hidden: int
    num_topk: int
    num_experts: int
    dispatch_dtypes: Tuple[torch.dtype, ...]
    modes: Tuple[str, ...]
    device: str

    def warm_key(self) -> tuple:
        return warm_key(hidden=self.hidden, num_topk=self.num_topk, num_experts=self.num_experts,
                        expert_alignment=1, dispatch_dtypes=self.dispatch_dtypes, modes=self.modes)


def _run_warmup(buffer: EPOpsBuffer, spec: _WarmupSpec) -> None:
    """:func:`deepep_ops.warmup` of ``spec`` (collective), unless ``buffer`` is
    warm for it already; each step and the table go to vLLM's log."""
    if spec.warm_key() in warmed_up(buffer):
        return

    def progress(i: int, n: int, row) -> None:
        _log.info("deepep_ops: DeepEP warm-up %d/%d: %s %s M=%d (%d tokens) %.3f s",
                  i, n, row.mode, row.dtype, row.num_max_tokens_per_rank, row.num_tokens, row.seconds)

    rows = warmup(buffer, hidden=spec.hidden, num_topk=spec.num_topk, num_experts=spec.num_experts,
                  dispatch_dtypes=spec.dispatch_dtypes, modes=spec.modes, device=spec.device,
                  num_tokens=FULL, progress=progress)
    _log.info("deepep_ops: DeepEP warm-up (%d steps, %.1f s):\n%s", len(rows),
              sum(r.seconds for r in rows), format_warmup_table(rows))


class DeepEPV2PrepareAndFinalize(mk.FusedMoEPrepareAndFinalizeModular):
    """Prepare/finalize for DeepEP v2 through ``torch.ops.deepep_ops``.

    Args (as vLLM 0.32's class):
        buffer: an :class:`deepep_ops.EPOpsBuffer`, or a backend to wrap
            (``deep_ep.ElasticBuffer``, :class:`deepep_ops.ReferenceElasticBuffer`).
        num_dispatchers: EP group size, reported by :meth:`num_dispatchers`.
        dp_size: data-parallel size (informational, as in vLLM).
        rank_expert_offset: global id of this rank's first expert; must equal
            ``buffer.rank * num_experts / buffer.num_ranks`` (DeepEP's layout).
        num_experts: E, global.
        num_topk: K.
        use_fp8_dispatch: kept for signature compatibility; as in vLLM the
            dispatch dtype follows the ``quant_config`` of each call.
        use_cudagraph: True: decode mode (no expand, no CPU sync, R·M rows,
            capturable); False: prefill mode (expand + CPU sync, exact rows).
        sp_size: sequence-parallel size; each EP rank holds ``cdiv(n, sp_size)``
            of its DP rank's tokens.

    The adapter sets ``buffer.num_tokens_source`` to :class:`ForwardContextTokens`,
    so eager calls (``EPOpsBuffer.bucket``) and compiled graphs (the in-graph
    ``deepep_ops::token_bucket``) bucket the same DP-global token count; a buffer
    shared by layers with another ``sp_size`` is a ValueError.

    vLLM 0.33: ``defer_globalize`` (set by its modular kernel for experts that
    take local ids) makes decode return local ids and pass
    ``ExpertTokensMetadata.rank_expert_offset``; :meth:`supports_dbo` is True.

    vLLM 0.34's behaviour, on every version (``_compat`` detects what the
    installed vLLM has): :attr:`activation_format` is ``PaddedStandard`` where
    vLLM has it (``Standard`` before); post-dispatch quantization passes
    ``quant_config.per_act_token_quant`` through and, in decode, computes a
    run-time per-tensor scale over the received rows only
    (``masked_amax_scale(..., num_valid=psum[-1:])``). Decode metadata is what
    0.32 to 0.34 all return: no counts, ``psum_recv_per_rank`` set.
    Asynchrony (:func:`deepep_ops.dispatch_start` and friends): :meth:`prepare_async`
    starts the dispatch and its receiver waits; :meth:`finalize_async` starts
    the combine and its receiver waits, so vLLM's modular kernel runs the
    shared experts while the combine is in flight (0.34's class does the same
    with DeepEP's stream; it dispatches synchronously). Under DBO both are
    synchronous (the micro-batches interleave their calls; a buffer holds one
    async call at a time), as 0.34 does for its combine. ``asynchronous=False``
    (keyword-only) makes them synchronous always: one op per dispatch and
    combine, where :mod:`deepep_ops.vllm.passes` turns the combine's copy into
    ``combine_into``.

    Args (keyword-only):
        device: where tokens live (default: vLLM's current platform device type).

    Start-up warm-up (keyword-only): DeepEP JIT-compiles per bucket, so every
    bucket this adapter will use (decode with ``use_cudagraph``, else prefill;
    bf16, plus block fp8 with ``use_fp8_dispatch``) is warmed once per
    underlying buffer, collectively, before CUDA-graph capture:

    - where vLLM's JIT warm-up registry is collecting (its GPU model runner
      loading the model: :func:`deepep_ops.vllm._compat.jit_warmup_registry`),
      the warm-up is registered there and runs in vLLM's ``kernel_warmup``,
      on every rank, only when ``kernel_config.enable_jit_warmup`` is on
      (vLLM turns it off under ``enforce_eager``);
    - otherwise (vLLM's CPU worker, an adapter built outside vLLM's model
      runner, elastic EP) the constructor runs it. vLLM builds prepare/finalize
      after loading weights, on every rank in the same order, before compiling
      and CUDA-graph capture.

    Either way each step and a per-bucket table go to vLLM's log. Arguments:
        warmup: True/False; None: ``DEEPEP_OPS_WARMUP`` (0/1), else on for real
            DeepEP and off for the reference buffer. False turns the
            registered warm-up off too; True does not override
            ``enable_jit_warmup``.
        hidden: H to warm (default: the wrapped buffer's ``hidden``; warm-up is
            skipped with a warning when neither is known).
    """

    def __init__(
        self,
        buffer: Union[EPOpsBuffer, object],
        num_dispatchers: int,
        dp_size: int,
        rank_expert_offset: int,
        num_experts: int,
        num_topk: int,
        use_fp8_dispatch: bool = False,
        use_cudagraph: bool = False,
        sp_size: int = 1,
        *,
        device: Optional[Union[torch.device, str]] = None,
        warmup: Optional[bool] = None,
        hidden: Optional[int] = None,
        asynchronous: bool = True,
    ) -> None:
        super().__init__()
        self.asynchronous = asynchronous
        self.buffer = as_ep_buffer(buffer)
        self.num_dispatchers_ = num_dispatchers
        self.dp_size = dp_size
        self.num_experts = num_experts
        self.num_topk = num_topk
        self.use_fp8_dispatch = use_fp8_dispatch
        self.use_cudagraph = use_cudagraph
        self.sp_size = sp_size
        if num_experts % self.buffer.num_ranks != 0:
            raise ValueError(
                f"DeepEPV2PrepareAndFinalize: num_experts={num_experts} is not a multiple of "
                f"the EP group size {self.buffer.num_ranks}"
            )
        expected_offset = self.buffer.rank * (num_experts // self.buffer.num_ranks)
        if rank_expert_offset != expected_offset:
            raise ValueError(
                f"DeepEPV2PrepareAndFinalize: rank_expert_offset={rank_expert_offset}, but EP rank "
                f"{self.buffer.rank} of {self.buffer.num_ranks} owns experts from {expected_offset}"
            )
        self.rank_expert_offset = rank_expert_offset
        if device is None:
            device = current_device_type()
        # bf16 dispatch and block-fp8 dispatch: the dtype follows each call's quant config.
        self._pf = {
            fp8: DeepEPPrepareFinalize(
                self.buffer, num_experts, num_topk, decode=use_cudagraph, use_fp8_dispatch=fp8, device=device
            )
            for fp8 in (False, True)
        }
        # DBO: one handle per micro-batch.
        self.handles: list[Optional[DispatchHandle]] = [None, None]
        source = ForwardContextTokens(sp_size)
        if self.buffer.num_tokens_source not in (None, source):
            raise ValueError(
                f"DeepEPV2PrepareAndFinalize: the buffer already buckets {self.buffer.num_tokens_source!r}, "
                f"this layer needs {source!r}; give layers with different sp_size their own EPOpsBuffer"
            )
        self.buffer.num_tokens_source = source
        #: vLLM 0.33's modular kernel sets this for experts that globalize ids themselves.
        self.defer_globalize = False
        if warmup_enabled(self.buffer, warmup):
            self._warm_up(hidden, device)

    def _warm_up(self, hidden: Optional[int], device: Union[torch.device, str]) -> None:
        """Warm every bucket this adapter will use, once per underlying buffer:
        through vLLM's JIT warm-up registry where it collects, else now."""
        if hidden is None:
            hidden = getattr(getattr(self.buffer.backend, "buffer", None), "hidden", None)
        if not hidden:
            _log.warning("deepep_ops: DeepEP warm-up skipped: hidden size unknown (pass hidden=)")
            return
        spec = _WarmupSpec(
            hidden=hidden, num_topk=self.num_topk, num_experts=self.num_experts,
            dispatch_dtypes=(torch.bfloat16, torch.float8_e4m3fn) if self.use_fp8_dispatch else (torch.bfloat16,),
            modes=("decode",) if self.use_cudagraph else ("prefill",),
            device=str(torch.device(device)),
        )
        if spec.warm_key() in warmed_up(self.buffer):
            return
        registry = jit_warmup_registry()
        if registry is None:
            _run_warmup(self.buffer, spec)
            return
        if not jit_warmup_enabled(registry):
            _log.info("deepep_ops: DeepEP warm-up off: vLLM's kernel_config.enable_jit_warmup is False")
            return
        buffer = self.buffer
        # One registry entry per underlying buffer: warmed_up() is held by it.
        register_jit_warmup("DeepEPWarmup", ("deepep_ops.warmup", id(warmed_up(buffer))), [spec],
                            lambda key: _run_warmup(buffer, key))

    # ------------------------------------------------------------------ queries

    @staticmethod
    def maybe_roundup_layer_hidden_size(hidden_size: int, dtype: torch.dtype) -> int:
        """Round ``hidden_size`` up so that a row is whole 512-byte transfer atoms."""
        row_bytes = hidden_size * dtype.itemsize
        padded = -(-row_bytes // _XFER_ATOM_BYTES) * _XFER_ATOM_BYTES
        return padded // dtype.itemsize

    @property
    def activation_format(self) -> mk.FusedMoEActivationFormat:
        # PaddedStandard on vLLM >= 0.34 (decode rows are an upper bound; padding
        # rows carry topk_ids == -1 in every lane), Standard before.
        return deepep_activation_format()

    def topk_indices_dtype(self) -> Optional[torch.dtype]:
        return torch.int64

    def max_num_tokens_per_rank(self) -> Optional[int]:
        return None

    def num_dispatchers(self) -> int:
        return self.num_dispatchers_

    def output_is_reduced(self) -> bool:
        return True

    def supports_async(self) -> bool:
        return True

    def supports_dbo(self) -> bool:
        # One handle slot per DBO micro-batch.
        return True

    # ------------------------------------------------------------------ prepare

    def _bucket(self, a1: torch.Tensor) -> Optional[int]:
        """Decode M: host-side in eager; ``None`` (in-graph ``token_bucket``) when
        compiling. Both come from the buffer's token source."""
        if not self.use_cudagraph or torch.compiler.is_compiling():
            return None
        return self.buffer.bucket(a1.shape[0])

    def prepare_async(
        self,
        a1: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        num_experts: int,
        expert_map: Optional[torch.Tensor],
        apply_router_weight_on_input: bool,
        quant_config: FusedMoEQuantConfig,
        defer_input_quant: bool = False,
    ) -> mk.ReceiverType:
        # DBO's two micro-batches interleave their calls on one buffer, which
        # holds one async call at a time: there the dispatch is synchronous.
        return self._prepare(
            a1, topk_weights, topk_ids, num_experts, apply_router_weight_on_input, quant_config,
            defer_input_quant, asynchronous=self.asynchronous and not dbo_active(),
        )

    def _prepare(
        self,
        a1: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        num_experts: int,
        apply_router_weight_on_input: bool,
        quant_config: FusedMoEQuantConfig,
        defer_input_quant: bool,
        asynchronous: bool,
    ) -> mk.ReceiverType:
        """Dispatch (started, with ``asynchronous``) and its receiver."""
        if num_experts != self.num_experts:
            raise ValueError(
                f"DeepEPV2PrepareAndFinalize: called with num_experts={num_experts}, "
                f"built for {self.num_experts}"
            )
        fp8 = _quantize_before_dispatch(quant_config, defer_input_quant)
        if fp8:
            _check_block_fp8(quant_config)
        elif not defer_input_quant and quant_config.quant_dtype is not None:
            # vLLM quantizes these after dispatch with its CUDA quant kernels.
            if not can_quantize_after_dispatch(a1.device):
                raise NotImplementedError(
                    "deepep_ops DeepEPV2PrepareAndFinalize: post-dispatch quantization to "
                    f"quant_dtype={quant_config.quant_dtype} (non-block quantization) needs vLLM's "
                    "GPU quantization kernels and is not available on CPU; use block fp8, "
                    "an unquantized config, or experts with expects_unquantized_inputs"
                )
        quantize_after = not fp8 and not defer_input_quant
        kwargs = dict(
            apply_router_weight_on_input=apply_router_weight_on_input,
            num_max_tokens_per_rank=self._bucket(a1),
            defer_globalize=self.use_cudagraph and self.defer_globalize,
        )
        if not asynchronous:
            prepared = self._pf[fp8].prepare(a1, topk_weights, topk_ids, **kwargs)
            self.handles[ubatch_id()] = prepared.handle
            return lambda: self._receive(prepared, quant_config, quantize_after)
        pending = self._pf[fp8].prepare_start(a1, topk_weights, topk_ids, **kwargs)

        def receive() -> mk.PrepareResultType:
            prepared = self._pf[fp8].prepare_wait(pending)
            self.handles[0] = prepared.handle
            return self._receive(prepared, quant_config, quantize_after)

        # The tokens are in flight until vLLM calls the receiver.
        return receive

    def _receive(self, p: PreparedTokens, quant_config: FusedMoEQuantConfig, quantize_after: bool) -> mk.PrepareResultType:
        if self.use_cudagraph:
            # Decode: no counts (no CPU sync); the per-rank psum lets experts skip padding rows.
            meta = expert_tokens_metadata(
                psum_recv_per_rank=p.handle.psum_num_recv_tokens_per_scaleup_rank,
                rank_expert_offset=self.rank_expert_offset if self.defer_globalize else None,
            )
        else:
            meta = expert_tokens_metadata(
                expert_num_tokens=p.expert_num_tokens,
                expert_num_tokens_cpu=p.expert_num_tokens.to("cpu"),
            )
        expert_x, expert_x_scale = p.expert_x, p.expert_x_scale
        if quantize_after and quant_config.quant_dtype is not None:
            # Decode rows past the received count are uninitialised: a run-time
            # per-tensor scale covers the received rows only (vLLM 0.34).
            num_valid = p.handle.psum_num_recv_tokens_per_scaleup_rank[-1:] if self.use_cudagraph else None
            expert_x, expert_x_scale = quantize_input(expert_x, quant_config, num_valid=num_valid)
        return expert_x, expert_x_scale, meta, p.topk_ids, p.topk_weights

    def prepare(
        self,
        a1: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        num_experts: int,
        expert_map: Optional[torch.Tensor],
        apply_router_weight_on_input: bool,
        quant_config: FusedMoEQuantConfig,
        defer_input_quant: bool = False,
    ) -> mk.PrepareResultType:
        return self._prepare(
            a1, topk_weights, topk_ids, num_experts, apply_router_weight_on_input, quant_config,
            defer_input_quant, asynchronous=False,
        )()

    # ----------------------------------------------------------------- finalize

    def finalize(
        self,
        output: torch.Tensor,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        apply_router_weight_on_input: bool,
        weight_and_reduce_impl: mk.TopKWeightAndReduce,
    ) -> None:
        handle = self._take_handle(ubatch_id())
        pf = self._pf[False]
        reduced = self._reduced(output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                                weight_and_reduce_impl)
        if reduced is None:
            # Weight-and-reduce (plain torch) + combine + copy into output.
            pf.finalize(output, fused_expert_output, topk_weights, topk_ids, handle,
                        apply_router_weight_on_input=apply_router_weight_on_input)
        else:
            pf.finalize_reduced(output, reduced, handle)

    def finalize_async(
        self,
        output: torch.Tensor,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        apply_router_weight_on_input: bool,
        weight_and_reduce_impl: mk.TopKWeightAndReduce,
    ) -> Callable[[], None]:
        if not self.asynchronous or dbo_active():
            # DBO interleaves micro-batches on the one buffer (one async call at a
            # time): combine now, as vLLM 0.34's class does under DBO.
            self.finalize(output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                          weight_and_reduce_impl)
            return _noop
        handle = self._take_handle(0)
        pf = self._pf[False]
        reduced = self._reduced(output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                                weight_and_reduce_impl)
        if reduced is None:
            pending = pf.finalize_start(fused_expert_output, topk_weights, topk_ids, handle,
                                        apply_router_weight_on_input=apply_router_weight_on_input)
        else:
            pending = pf.finalize_reduced_start(reduced, handle)
        # vLLM's modular kernel runs the shared experts before calling this: the
        # combine is in flight meanwhile.
        return lambda: pf.finalize_wait(output, pending)

    def _reduced(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                 weight_and_reduce_impl) -> Optional[torch.Tensor]:
        """[rows, H] weighted and reduced expert outputs, or None where
        :class:`DeepEPPrepareFinalize`'s own weight-and-reduce applies (vLLM's
        Delegate / Contiguous reducers on a non-empty ``fused_expert_output``)."""
        if isinstance(weight_and_reduce_impl, (TopKWeightAndReduceDelegate, TopKWeightAndReduceContiguous)):
            if not _is_empty(fused_expert_output):
                return None
            # No rows here (the modular kernel hands back [0, H]): nothing to reduce.
            return fused_expert_output.new_empty((topk_ids.shape[0], output.shape[-1]))
        if isinstance(weight_and_reduce_impl, TopKWeightAndReduceNoOP) or _is_empty(fused_expert_output):
            # The experts already weighted and reduced: [rows, H].
            return fused_expert_output
        return weight_and_reduce_impl.apply(
            output=None,
            fused_expert_output=fused_expert_output,
            topk_weights=topk_weights,
            topk_ids=topk_ids,
            apply_router_weight_on_input=apply_router_weight_on_input,
        )

    def _take_handle(self, slot: int) -> DispatchHandle:
        """The handle of micro-batch ``slot``'s prepare, and its slot freed."""
        handle = self.handles[slot]
        if handle is None:
            raise RuntimeError("DeepEPV2PrepareAndFinalize.finalize: no dispatch handle (prepare was not called)")
        # Free the slot once its combine is issued. Under torch.compile a handle
        # left on `self` is an attribute write that Dynamo replays after the
        # graph, which makes the handle's tensors extra graph outputs, alive
        # until the next forward.
        self.handles[slot] = None
        return handle


def _noop() -> None:
    return None


def _is_empty(t: torch.Tensor) -> bool:
    """``t.numel() == 0`` without a data-dependent guard on unbacked sizes (False if unknown)."""
    return guard_or_false(t.numel() == 0)
