"""Pre-warm every bucket's DeepEP kernels before serving.

DeepEP v2 JIT-compiles its dispatch/combine kernels per ``num_max_tokens_per_rank``
(M), hidden size, top-k, expert count, dtype and mode (docs/deepep_contract.md §5): seconds
for each new M on its first dispatch + combine, unless a later process finds
them in ``EP_JIT_CACHE_DIR`` (figures: contract §8, README).
Decode buckets M over the powers of two up to the capacity
(:func:`deepep_ops.pow2_bucket`), so a server that does not warm up stalls for
seconds the first time each batch size shows up.

:func:`warmup` runs one dispatch + combine per bucket (decode) and one at the
capacity (prefill), collectively on every rank, with one token (or none) per
rank, through the same ``deepep_ops::`` ops a serving step uses. Every rank must
call it with the same arguments: it issues the same collectives in the same
order on each.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import torch

from deepep_ops.api import combine, dispatch, dispatch_exact
from deepep_ops.buffer import EPOpsBuffer, as_ep_buffer
from deepep_ops.layout import layout_name
from deepep_ops.prepare_finalize import FP8_BLOCK, quantize_block_fp8

log = logging.getLogger(__name__)

#: ``warmup(num_tokens=FULL)``: every step carries a full bucket, M tokens per rank.
FULL = "full"

#: Modes :func:`warmup` knows (:func:`~deepep_ops.layout.layout_name`): decode runs
#: every bucket, prefill the capacity.
MODES = (layout_name(True), layout_name(False))
_DECODE = MODES[0]
_DISPATCH_DTYPES = (torch.bfloat16, torch.float8_e4m3fn)


class WarmupRow(NamedTuple):
    """One warm-up step: dispatch + combine of ``num_tokens`` tokens per rank at M."""

    mode: str
    dtype: str
    num_max_tokens_per_rank: int
    num_tokens: int
    seconds: float


#: ``progress(i, n, row)`` after step i (1-based) of n.
Progress = Callable[[int, int, WarmupRow], None]


def warmup_buckets(capacity: int) -> List[int]:
    """Every M :func:`deepep_ops.pow2_bucket` can return: 1, 2, 4, … below ``capacity``, and ``capacity``."""
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"warmup_buckets: capacity must be an int >= 1, got {capacity!r}")
    buckets, m = [], 1
    while m < capacity:
        buckets.append(m)
        m *= 2
    return buckets + [capacity]


def warm_key(
    hidden: int, num_topk: int, num_experts: int, expert_alignment: int,
    dispatch_dtypes: Sequence[torch.dtype], modes: Sequence[str],
) -> tuple:
    """What a warm-up covers, for :func:`warmed_up` bookkeeping."""
    return (hidden, num_topk, num_experts, expert_alignment, tuple(str(d) for d in dispatch_dtypes), tuple(modes))


def warmed_up(buffer: EPOpsBuffer) -> set:
    """The :func:`warm_key` values :func:`warmup` has completed on this buffer.

    Held by the wrapped buffer object itself (a ``deep_ep.ElasticBuffer`` lives
    as long as the kernels it warmed, and every layer's :class:`EPOpsBuffer`
    wraps the same one), so layers sharing it warm up once.
    """
    owner = getattr(buffer.backend, "buffer", buffer.backend)
    return vars(owner).setdefault("_deepep_ops_warmed_up", set())


#: The switch: ``0`` off, ``1`` on; unset: on for real DeepEP, off for the reference.
WARMUP_ENV = "DEEPEP_OPS_WARMUP"


def warmup_enabled(buffer: EPOpsBuffer, override: Optional[bool] = None) -> bool:
    """Whether start-up warm-up runs: ``override`` if given, else ``DEEPEP_OPS_WARMUP``
    (``0``/``1``), else the backend's :attr:`~deepep_ops.backends.Backend.needs_warmup`
    (real DeepEP's JIT; the reference buffer has nothing to warm).

    Raises:
        ValueError: ``DEEPEP_OPS_WARMUP`` is set to something other than 0 or 1.
    """
    if override is not None:
        return bool(override)
    value = os.environ.get(WARMUP_ENV)
    if value is not None and value.strip() != "":
        if value.strip() not in ("0", "1"):
            raise ValueError(f"{WARMUP_ENV} must be 0 or 1, got {value!r}")
        return value.strip() == "1"
    return buffer.backend.needs_warmup


def _check_args(buf: EPOpsBuffer, hidden, num_topk, num_experts, expert_alignment, dispatch_dtypes, modes,
                num_tokens, buckets) -> List[int]:
    def fail(arg: str, expected: str, got: object) -> None:
        raise ValueError(f"warmup: {arg} must be {expected}, got {got!r}")

    for name, value in (("hidden", hidden), ("num_topk", num_topk), ("num_experts", num_experts),
                        ("expert_alignment", expert_alignment)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(name, "an int >= 1", value)
    if num_experts % buf.num_ranks:
        fail("num_experts", f"a multiple of the EP group size {buf.num_ranks}", num_experts)
    if num_topk > num_experts:
        fail("num_topk", f"<= num_experts={num_experts}", num_topk)
    if not modes or any(m not in MODES for m in modes):
        fail("modes", f"a non-empty subset of {MODES}", tuple(modes))
    if not dispatch_dtypes or any(d not in _DISPATCH_DTYPES for d in dispatch_dtypes):
        fail("dispatch_dtypes", f"a non-empty subset of {_DISPATCH_DTYPES}", tuple(dispatch_dtypes))
    if torch.float8_e4m3fn in dispatch_dtypes and hidden % FP8_BLOCK:
        fail("hidden", f"a multiple of {FP8_BLOCK} for float8_e4m3fn (block-fp8) dispatch", hidden)
    all_buckets = warmup_buckets(buf.capacity)
    if buckets is None:
        buckets = all_buckets
    else:
        buckets = list(buckets)
        bad = [m for m in buckets if m not in all_buckets]
        if bad:
            fail("buckets", f"buckets of capacity {buf.capacity} ({all_buckets})", bad)
    smallest = min(buckets) if _DECODE in modes else buf.capacity
    if num_tokens != FULL and (not isinstance(num_tokens, int) or isinstance(num_tokens, bool)
                               or not 0 <= num_tokens <= smallest):
        fail("num_tokens", f"{FULL!r} or an int in [0, {smallest}] (the smallest M warmed)", num_tokens)
    return buckets


def _inputs(num_tokens: int, hidden: int, num_topk: int, num_experts: int, rank: int, device: torch.device,
            dtype: torch.dtype, idx_dtype: torch.dtype):
    """``num_tokens`` tokens routed to ``num_topk`` distinct experts spread over the ranks."""
    x = torch.zeros(num_tokens, hidden, dtype=torch.bfloat16, device=device)
    scales = None
    if dtype == torch.float8_e4m3fn:
        x, scales = quantize_block_fp8(x)
    stride = max(num_experts // num_topk, 1)
    ids = [(rank + j * stride) % num_experts for j in range(num_topk)]
    topk_idx = torch.tensor([ids] * num_tokens, dtype=idx_dtype, device=device).view(num_tokens, num_topk)
    topk_weights = torch.full((num_tokens, num_topk), 1.0 / num_topk, dtype=torch.float32, device=device)
    return x, scales, topk_idx, topk_weights


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warmup(
    buffer: Union[EPOpsBuffer, object],
    *,
    hidden: int,
    num_topk: int,
    num_experts: int,
    dispatch_dtypes: Sequence[torch.dtype] = (torch.bfloat16,),
    expert_alignment: int = 1,
    modes: Sequence[str] = MODES,
    num_tokens: Union[int, str] = 1,
    buckets: Optional[Sequence[int]] = None,
    device: Optional[Union[torch.device, str]] = None,
    progress: Optional[Progress] = None,
) -> List[WarmupRow]:
    """Run one dispatch + combine per bucket, collectively on every rank.

    Args:
        buffer: the :class:`EPOpsBuffer` (or a backend to wrap).
        hidden: H of the layers that will use the buffer.
        num_topk: K.
        num_experts: E, global.
        dispatch_dtypes: bfloat16 and/or float8_e4m3fn (block fp8, [T, H/128]
            float32 scales), each warmed in every mode.
        expert_alignment: A.
        modes: ``"decode"`` (no expand: every bucket of :func:`warmup_buckets`)
            and/or ``"prefill"`` (expand + CPU sync: at the capacity only, as
            :class:`deepep_ops.DeepEPPrepareFinalize` dispatches prefill).
        num_tokens: tokens per rank in each step, at most the smallest M (0 or
            1 warms the JIT only); ``"full"``: M tokens at every step, so that
            the first serving step of each bucket also finds the caching
            allocator's blocks and the CUDA kernels of a full bucket loaded
            (what a step then costs is the steady cost, bench_warmup.py).
        buckets: decode buckets to warm (default: all of them).
        device: where the tokens live (default: the current CUDA device if
            CUDA is available, else CPU).
        progress: ``progress(i, n, row)`` after each step; each step is also
            logged at INFO on ``deepep_ops.warmup``.

    Returns:
        One :class:`WarmupRow` per step, in order (see :func:`format_warmup_table`).

    Raises:
        ValueError: a bad argument, before any collective.
        RuntimeError: called while compiling or capturing a CUDA graph.
    """
    buf = as_ep_buffer(buffer)
    modes, dispatch_dtypes = tuple(modes), tuple(dispatch_dtypes)
    buckets = _check_args(buf, hidden, num_topk, num_experts, expert_alignment, dispatch_dtypes, modes,
                          num_tokens, buckets)
    if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        raise RuntimeError("warmup: run it eagerly, before torch.compile and CUDA-graph capture")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)

    steps = [(mode, dtype, m) for dtype in dispatch_dtypes for mode in modes
             for m in (buckets if mode == _DECODE else [buf.capacity])]
    rows: List[WarmupRow] = []
    for i, (mode, dtype, m) in enumerate(steps, 1):
        n = m if num_tokens == FULL else num_tokens
        x, scales, topk_idx, topk_weights = _inputs(n, hidden, num_topk, num_experts, buf.rank, device, dtype,
                                                    buf.topk_idx_dtype)
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            kwargs = dict(num_experts=num_experts, num_max_tokens_per_rank=m,
                          expert_alignment=expert_alignment, x_scales=scales)
            out = (dispatch if mode == _DECODE else dispatch_exact)(x, topk_idx, topk_weights, buf, **kwargs)
            # Combine takes bf16 rows, whatever was dispatched.
            expert_out = torch.zeros(out.recv_x.shape, dtype=torch.bfloat16, device=device)
            combine(expert_out, out.handle, buf)
        _sync(device)
        row = WarmupRow(mode, str(dtype).removeprefix("torch."), m, n, time.perf_counter() - start)
        rows.append(row)
        log.info("deepep_ops warmup: step %d of %d (%s %s, M=%d) took %.3f s", i, len(steps), row.mode, row.dtype,
                 m, row.seconds)
        if progress is not None:
            progress(i, len(steps), row)
    warmed_up(buf).add(warm_key(hidden, num_topk, num_experts, expert_alignment, dispatch_dtypes, modes))
    return rows


def format_warmup_table(rows: Sequence[WarmupRow]) -> str:
    """A plain-text table of :func:`warmup` rows, with the total."""
    lines = [f"{'mode':<8} {'dtype':<14} {'M':>6} {'T':>6} {'seconds':>9}"]
    lines += [f"{r.mode:<8} {r.dtype:<14} {r.num_max_tokens_per_rank:>6} {r.num_tokens:>6} {r.seconds:>9.3f}"
              for r in rows]
    lines.append(f"{'total':<8} {'':<14} {'':>6} {'':>6} {sum(r.seconds for r in rows):>9.3f}")
    return "\n".join(lines)
