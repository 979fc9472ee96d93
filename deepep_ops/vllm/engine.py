"""Run deepep-ops inside a vLLM engine (``--all2all-backend deepep_v2``).

:func:`install` is called by the plugin (:mod:`deepep_ops.vllm.plugin`) in every
vLLM process when ``DEEPEP_OPS_VLLM=1``. It rebinds module globals of vLLM's
``fused_moe.all2all_utils`` that vLLM looks up at call time; no vLLM file is
edited and nothing changes unless the engine runs with
``--enable-expert-parallel --all2all-backend deepep_v2``:

- ``all2all_utils.DeepEPV2PrepareAndFinalize`` → :class:`EngineDeepEPV2PrepareAndFinalize`
  (our adapter; vLLM constructs it in ``maybe_make_prepare_finalize`` with
  ``use_cudagraph = not enforce_eager``, i.e. prefill layout under
  ``enforce_eager``, decode layout otherwise, and calls its
  ``maybe_roundup_layer_hidden_size`` from ``maybe_roundup_layer_hidden_size``).
- ``all2all_utils.get_ep_all2all_manager`` → a wrapper that, where vLLM has no
  DeepEP v2 manager (the CPU platform makes an all-gather/reduce-scatter manager
  instead), installs :class:`ReferenceAll2AllManager` on the EP group's device
  communicator: its ``get_handle`` builds a :class:`deepep_ops.ReferenceElasticBuffer`
  over the EP group's gloo ``cpu_group`` with vLLM's capacity
  (``moe.max_num_tokens``), hidden, top-k and fp8 settings. Where vLLM does have
  one (CUDA with ``deep_ep`` installed) its ``deep_ep.ElasticBuffer`` is used,
  wrapped by our adapter.

With ``DEEPEP_OPS_VLLM_UNWRAP_MOE=1`` it also wraps ``MoERunner._select_forward``
(``fused_moe/runner/moe_runner.py``) so that MoE layers of the DeepEP v2
backend call vLLM's Python ``_moe_forward`` instead of the opaque
``torch.ops.vllm.moe_forward`` custom op that vLLM uses on CUDA: Dynamo then
traces router, ``deepep_ops::dispatch``/``combine`` and the experts.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import torch

from deepep_ops.reference import ReferenceElasticBuffer
from deepep_ops.vllm._compat import (
    All2AllManagerBase,
    all2all_utils as _all2all_utils,
    current_platform,
    get_current_vllm_config,
    get_ep_group,
    moe_runner as _moe_runner,
)
from deepep_ops.vllm.prepare_finalize import DeepEPV2PrepareAndFinalize, ForwardContextTokens

#: A child of vLLM's ``vllm`` logger, which vLLM's logging config gives its handler
#: (with ``propagate=False``): our INFO lines show in vLLM's output, formatted as its own.
LOGGER_NAME = "vllm.deepep_ops"
logger = logging.getLogger(LOGGER_NAME)

#: Opt-in switches (environment; ``DEEPEP_OPS_VLLM=1``, read by the plugin, installs these hooks).
ENV_UNWRAP_MOE = "DEEPEP_OPS_VLLM_UNWRAP_MOE"
#: Test-only: select vLLM's CUDA-style opaque ``vllm::moe_forward`` on CPU too.
ENV_FORCE_OPAQUE_MOE = "DEEPEP_OPS_VLLM_FORCE_OPAQUE_MOE"

# What install() rebound (vLLM's module globals are process-wide, so is this
# record of them), and, for the test report only, what this process built.
_state: dict[str, Any] = {"installed": False, "originals": {}, "adapters": [], "buffers": [], "announced": False,
                          "replaced_manager": None}


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")




# ------------------------------------------------------------------ adapter


class EngineDeepEPV2PrepareAndFinalize(DeepEPV2PrepareAndFinalize):
    """Our adapter as vLLM's engine constructs it, plus what vLLM's CPU experts need.

    vLLM's CPU experts (``experts/cpu_moe.py``, ``cpu_fused_moe``) index their
    *local* weights with ``topk_ids`` directly: they ignore ``expert_map``,
    need int32 ids in ``[0, num_local_experts)`` and fp32 weights, and weight
    and reduce themselves (``TopKWeightAndReduceNoOP``). DeepEP's contract
    (and our adapter's) is global ids with −1 for lanes routed elsewhere, as
    vLLM's GPU experts take them with ``expert_map``. With
    ``expert_ids="local_int32"`` (the default on the CPU platform) the
    receiver hands out local int32 ids, lanes routed elsewhere become expert 0
    with weight 0, and rows past the received count (decode padding, stale
    data) are zeroed so that weight 0 really contributes 0.
    """

    def __init__(self, *args, expert_ids: Optional[str] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if expert_ids is None:
            expert_ids = "local_int32" if current_platform.is_cpu() else "global"
        if expert_ids not in ("global", "local_int32"):
            raise ValueError(f"expert_ids must be 'global' or 'local_int32', got {expert_ids!r}")
        self.expert_ids = expert_ids
        self.num_local_experts = self.num_experts // self.buffer.num_ranks
        if os.environ.get(ENV_REPORT):
            # Equal to the ForwardContextTokens the base class installed, plus a record.
            self.buffer.num_tokens_source = _RecordingForwardContextTokens(self.sp_size)
        _state["adapters"].append(self)
        _write_report()
        if not _state["announced"]:
            _state["announced"] = True
            logger.info("%s", describe(self))

    def topk_indices_dtype(self) -> Optional[torch.dtype]:
        # The router produces these; dispatch takes int64 either way.
        return torch.int64

    def _prepare(self, a1, *args, **kwargs):
        receive = super()._prepare(a1, *args, **kwargs)
        num_tokens = a1.shape[0]
        if not (self.use_cudagraph and self.buffer.num_ranks > 1 and torch.compiler.is_compiling()):
            return receive

        def receive_checked():
            result = receive()
            # Decode rows are R·M >= 2·T > T. Telling the compiler lets vLLM's
            # `output_alias.shape == fused_out.shape` test in
            # FusedMoEKernelModularImpl._fused_experts resolve without a
            # data-dependent guard on the in-graph bucket M.
            torch._check(result[0].shape[0] != num_tokens)
            return result

        return receive_checked

    def finalize(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                 weight_and_reduce_impl):
        super().finalize(output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                         weight_and_reduce_impl)
        _debug_nonfinite("finalize in", fused_expert_output, topk_ids=topk_ids)
        _debug_nonfinite("finalize out", output)

    def finalize_async(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                       weight_and_reduce_impl):
        receive = super().finalize_async(output, fused_expert_output, topk_weights, topk_ids,
                                         apply_router_weight_on_input, weight_and_reduce_impl)
        _debug_nonfinite("finalize in", fused_expert_output, topk_ids=topk_ids)

        def receive_checked():
            receive()
            _debug_nonfinite("finalize out", output)

        return receive_checked

    def _receive(self, p, quant_config, quantize_after):
        a1q, a1q_scale, meta, topk_ids, topk_weights = super()._receive(p, quant_config, quantize_after)
        _debug_nonfinite("dispatched tokens", a1q, topk_ids=topk_ids)
        if self.expert_ids == "local_int32":
            routed = topk_ids >= 0
            # vLLM's cpu_fused_moe lets one non-finite row poison the other rows
            # of its batch, and an idle DP rank's dummy batch sends non-finite
            # hidden states: keep only finite values (rows of real tokens are
            # finite; a dummy token's output is discarded by its own rank).
            keep = torch.isfinite(a1q)
            if self.use_cudagraph:
                # Decode padding rows (past the received count) hold stale data.
                num_recv = p.handle.psum_num_recv_tokens_per_scaleup_rank[-1]
                real = torch.arange(a1q.shape[0], device=a1q.device) < num_recv
                keep = keep & real.unsqueeze(1)
            a1q = torch.where(keep, a1q, torch.zeros((), dtype=a1q.dtype, device=a1q.device))
            offset = self._pf[False].rank_expert_offset
            topk_ids = torch.where(routed, topk_ids - offset, 0).to(torch.int32)
            # Non-finite router weights (a dummy token's) would turn its expert row into NaN.
            topk_weights = torch.where(routed & torch.isfinite(topk_weights), topk_weights.float(), 0.0)
        return a1q, a1q_scale, meta, topk_ids, topk_weights


def describe(adapter: "EngineDeepEPV2PrepareAndFinalize") -> str:
    """The one line a process logs when vLLM builds its first adapter: backend, buffer, layout."""
    backend = adapter.buffer.backend
    native = getattr(backend, "buffer", backend)
    if isinstance(native, ReferenceElasticBuffer):
        where = "over the EP group's gloo cpu_group"
        replaced = _state["replaced_manager"]
        if replaced:
            where += f", in place of vLLM's {replaced} (its 'Falling back to allgather_reducescatter' above)"
    else:
        where = "vLLM's own buffer (DeepEPV2All2AllManager)"
    hidden = getattr(native, "hidden", None)
    layout = ("decode (use_cudagraph: R*M rows, M = pow2 bucket of the DP-global token count)"
              if adapter.use_cudagraph else
              "prefill (enforce_eager: dispatch_exact, exact rows, a host sync per MoE layer)")
    ids = ("local int32 ids for vLLM's CPU experts" if adapter.expert_ids == "local_int32"
           else "global ids (-1: another rank's expert)")
    return (
        f"deepep_ops: --all2all-backend deepep_v2 runs through deepep-ops (DEEPEP_OPS_VLLM=1): "
        f"backend {type(native).__name__} {where}; "
        f"buffer EP rank {adapter.buffer.rank} of {adapter.buffer.num_ranks}, capacity {adapter.buffer.capacity} "
        f"tokens per rank{f', hidden {hidden}' if hidden else ''}, top-{adapter.num_topk}, "
        f"{'block-fp8' if adapter.use_fp8_dispatch else 'bf16'} dispatch; layout {layout}; {ids}"
        f"{'; MoE forward unwrapped (DEEPEP_OPS_VLLM_UNWRAP_MOE=1)' if _flag(ENV_UNWRAP_MOE) else ''}"
    )


class _RecordingForwardContextTokens(ForwardContextTokens):
    """The adapter's token source (DP-global count from vLLM's forward context),
    remembering which (local, DP-global) pairs it saw, for :func:`report`."""

    def __call__(self, local_num_tokens: int) -> int:
        n = super().__call__(local_num_tokens)
        seen = _state.setdefault("bucket_inputs", [])
        if [local_num_tokens, n] not in seen and len(seen) < 64:
            seen.append([local_num_tokens, n])
            _write_report()
        return n

    def __repr__(self) -> str:
        return f"vLLM forward-context token count (sp_size={self.sp_size}, recording)"


def _debug_nonfinite(where: str, t: torch.Tensor, **info) -> None:
    """``DEEPEP_OPS_VLLM_DEBUG=1``: log tensors with non-finite values (eager only)."""
    if not _flag("DEEPEP_OPS_VLLM_DEBUG") or torch.compiler.is_compiling():
        return
    bad = ~torch.isfinite(t.float())
    if bool(bad.any()):
        rows = bad.reshape(t.shape[0], -1).any(dim=1).nonzero().flatten().tolist() if t.dim() else []
        logger.warning("deepep_ops debug: non-finite %s shape=%s rows=%s %s", where, tuple(t.shape), rows[:16],
                       {k: v[rows[:4]].tolist() if isinstance(v, torch.Tensor) and rows else v
                        for k, v in info.items()})


# ------------------------------------------------------------- all2all manager


class ReferenceAll2AllManager(All2AllManagerBase):
    """vLLM all2all manager whose handles are :class:`ReferenceElasticBuffer` s.

    One buffer per distinct set of buffer arguments (vLLM asks once per MoE
    layer with the same arguments), over ``group`` (the EP group's gloo
    ``cpu_group`` by default).
    """

    def __init__(self, cpu_group, group=None) -> None:
        super().__init__(cpu_group)
        self.group = cpu_group if group is None else group
        self._buffers: dict = {}

    def get_handle(self, kwargs):
        kwargs = dict(kwargs)
        kwargs.pop("num_experts", None)
        key = tuple(sorted(kwargs.items()))
        buf = self._buffers.get(key)
        if buf is None:
            buf = ReferenceElasticBuffer(group=self.group, explicitly_destroy=True, **kwargs)
            self._buffers[key] = buf
            _state["buffers"].append(buf)
            logger.debug("deepep_ops: ReferenceElasticBuffer(%s) over the EP cpu_group (rank %d of %d)",
                         kwargs, self.rank, self.world_size)
        return buf

    def max_sms_used(self):
        return None

    def destroy(self) -> None:
        for buf in self._buffers.values():
            buf.destroy()
        self._buffers.clear()


def _get_ep_all2all_manager(ep_group=None):
    """``all2all_utils.get_ep_all2all_manager`` that provides a DeepEP v2 manager on CPU."""
    if ep_group is None:
        ep_group = get_ep_group()
    comm = ep_group.device_communicator
    manager = comm.all2all_manager if comm is not None else None
    if isinstance(manager, ReferenceAll2AllManager) or not _wants_deepep_v2():
        return _state["originals"]["get_ep_all2all_manager"](ep_group)
    if type(manager).__name__ != "DeepEPV2All2AllManager":
        # CpuCommunicator made an all-gather/reduce-scatter manager for deepep_v2.
        ours = ReferenceAll2AllManager(ep_group.cpu_group)
        if manager is not None:
            manager.destroy()
        comm.all2all_manager = ours
        _state["replaced_manager"] = type(manager).__name__
        logger.debug("deepep_ops: EP all2all manager %s -> ReferenceAll2AllManager", type(manager).__name__)
    return _state["originals"]["get_ep_all2all_manager"](ep_group)


def _wants_deepep_v2() -> bool:
    try:
        return get_current_vllm_config().parallel_config.all2all_backend == "deepep_v2"
    except Exception:  # no current config
        return False


# --------------------------------------------------------------- MoE unwrap


def _select_forward(self) -> Callable:
    """``MoERunner._select_forward``: Python ``_moe_forward`` for our layers when unwrapping."""
    original = _state["originals"]["_select_forward"]
    uses_ours = bool(getattr(self.moe_config, "use_deepep_v2_kernels", False)) and _state["installed"]
    if uses_ours and _flag(ENV_UNWRAP_MOE):
        return _moe_runner._moe_forward if self._shared_experts is None else _moe_runner._moe_forward_shared
    if _flag(ENV_FORCE_OPAQUE_MOE):
        ops = torch.ops.vllm
        return ops.moe_forward if self._shared_experts is None else ops.moe_forward_shared
    return original(self)


# ------------------------------------------------------------------ install


def install() -> None:
    """Rebind the vLLM hook points (idempotent). See the module docstring."""
    if _state["installed"]:
        return
    originals = _state["originals"]
    # vLLM's class, install_hint()'s stand-in, or None (undefined): uninstall() puts it back.
    originals["DeepEPV2PrepareAndFinalize"] = getattr(_all2all_utils, "DeepEPV2PrepareAndFinalize", None)
    originals["get_ep_all2all_manager"] = _all2all_utils.get_ep_all2all_manager
    originals["_select_forward"] = _moe_runner.MoERunner._select_forward
    _all2all_utils.DeepEPV2PrepareAndFinalize = EngineDeepEPV2PrepareAndFinalize
    _all2all_utils.get_ep_all2all_manager = _get_ep_all2all_manager
    _moe_runner.MoERunner._select_forward = _select_forward
    _state["installed"] = True
    logger.debug("deepep_ops: engine hooks installed (DEEPEP_OPS_VLLM=1) in process %d", os.getpid())


def uninstall() -> None:
    """Undo :func:`install` (tests)."""
    if not _state["installed"]:
        return
    originals = _state["originals"]
    if originals["DeepEPV2PrepareAndFinalize"] is None:
        del _all2all_utils.DeepEPV2PrepareAndFinalize
    else:
        _all2all_utils.DeepEPV2PrepareAndFinalize = originals["DeepEPV2PrepareAndFinalize"]
    _all2all_utils.get_ep_all2all_manager = originals["get_ep_all2all_manager"]
    _moe_runner.MoERunner._select_forward = originals["_select_forward"]
    _state["installed"] = False


def installed() -> bool:
    return _state["installed"]


# ------------------------------------------------------- half on: the hint


def unavailable_message() -> str:
    """Why vLLM cannot run ``--all2all-backend deepep_v2`` here, and what to do."""
    if current_platform.is_cuda_alike():
        return ("vLLM's --all2all-backend deepep_v2 needs DeepEP v2 (the deep_ep package, built from source: "
                "https://github.com/deepseek-ai/DeepEP), which is not installed in this environment; with it "
                "installed, DEEPEP_OPS_VLLM=1 runs that backend through deepep-ops' ops")
    return (f"vLLM has no DeepEP v2 prepare/finalize on this platform ({current_platform.device_type or 'cpu'}; "
            "vLLM's own needs CUDA and deep_ep), so --all2all-backend deepep_v2 cannot run as is. deepep-ops "
            "runs it here (a reference buffer over gloo): set DEEPEP_OPS_VLLM=1 in the environment of the vLLM "
            "command, e.g. DEEPEP_OPS_VLLM=1 python -m vllm.entrypoints.openai.api_server ... "
            "(docs/vllm_engine.md in deepep-ops)")


class DeepEPV2Unavailable:
    """Stands in for vLLM's ``DeepEPV2PrepareAndFinalize`` where vLLM defines none (its
    import is guarded by CUDA and ``deep_ep``): where vLLM would raise
    ``NameError: DeepEPV2PrepareAndFinalize``, this raises :func:`unavailable_message`."""

    def __init__(self, *args, **kwargs) -> None:
        raise RuntimeError(unavailable_message())

    @staticmethod
    def maybe_roundup_layer_hidden_size(*args, **kwargs) -> int:
        # vLLM's first use of the name (FusedMoE.__init__ for a deepep_v2 layer).
        raise RuntimeError(unavailable_message())


def install_hint() -> None:
    """Without the engine hooks: give vLLM's missing ``DeepEPV2PrepareAndFinalize`` name a
    stand-in that says what to do (:class:`DeepEPV2Unavailable`). Changes nothing where
    vLLM has the name (CUDA with ``deep_ep``) or the hooks are installed."""
    if _state["installed"] or hasattr(_all2all_utils, "DeepEPV2PrepareAndFinalize"):
        return
    _all2all_utils.DeepEPV2PrepareAndFinalize = DeepEPV2Unavailable


#: Test hook: where each process writes :func:`report` (``{pid}`` is substituted).
ENV_REPORT = "DEEPEP_OPS_VLLM_REPORT"


def _write_report() -> None:
    path = os.environ.get(ENV_REPORT)
    if path:
        import json

        with open(path.replace("{pid}", str(os.getpid())), "w") as f:
            json.dump(report(), f)


def report() -> dict:
    """What this process built (for tests and logs)."""
    return {
        "installed": _state["installed"],
        "adapters": [
            {"use_cudagraph": a.use_cudagraph, "expert_ids": a.expert_ids, "capacity": a.buffer.capacity,
             "num_ranks": a.buffer.num_ranks, "rank": a.buffer.rank}
            for a in _state["adapters"]
        ],
        "buffers": [type(b).__name__ for b in _state["buffers"]],
        # (local tokens, DP-global tokens) the decode bucket was computed from.
        "bucket_inputs": _state.get("bucket_inputs", []),
    }
