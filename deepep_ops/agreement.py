"""Cross-rank agreement: every EP rank fails together, with one clear error.

A collective whose ranks disagree on its sizes does not raise: gloo aborts the
process (``EnforceNotMet``, uncatchable), NCCL hangs or reads garbage, and a
rank that rejects its own input leaves its peers waiting for the whole
process-group timeout. Before the first payload collective of an op, the ranks
therefore exchange (over the EP group, on the host, :mod:`deepep_ops.exchange`:
a fixed-size digest, and only when something differs the values themselves) a
small tuple of the values that must match (:data:`DISPATCH_FIELDS`,
:data:`COMBINE_FIELDS`) plus their local validation verdict, and all raise the
same error when anything is off. Every site that agrees goes through
:func:`agree_dispatch` or :func:`agree_combine`.

Two modes, per :class:`EPOpsBuffer`:

- *agree once* (default on GPU): the exchange runs the first time the buffer
  sees each distinct combination of the fields; a seen combination costs a
  tuple build and a set lookup, no collective, so the steady state stays
  CUDA-graph capturable. A local rejection is raised locally (as before).
- *check mode* (default for CPU tensors, i.e. gloo; opt in with
  ``EPOpsBuffer(check=True)`` or ``DEEPEP_OPS_CHECK=1``; ``DEEPEP_OPS_CHECK=0`` or
  ``check=False`` turns it off): the exchange runs on every call, so a per-call
  difference (one rank's M) and one rank's rejection reach every rank.

Never during CUDA-graph capture: a host collective there would break capture
(NCCL) or stall it; captured calls skip the exchange.

Limits (agree-once mode): a disagreement that starts after warm-up on some
ranks only (one rank meets a new combination, its peers a seen one) sends the
ranks into different collectives; only check mode catches it.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional, Sequence

import torch

from deepep_ops.exchange import HostExchange
from deepep_ops.layout import layout_name
from deepep_ops.validation import device_of

#: The values of a dispatch that must be the same on every EP rank.
DISPATCH_FIELDS = (
    "mode",
    "num_max_tokens_per_rank",
    "num_experts",
    "x.shape[1] (hidden)",
    "topk_idx.shape[1] (num_topk)",
    "x.dtype",
    "x_scales.shape[1]",
    "x_scales.dtype",
    "expert_alignment",
    "num_scaleout_ranks (EP domain)",
    "num_scaleup_ranks (EP domain)",
    "num_channels (hybrid mode)",
    "EPOpsBuffer num_sms (None: DeepEP's choice)",
)

#: The values of a combine that must be the same on every EP rank.
COMBINE_FIELDS = (
    "mode",
    "handle.num_max_tokens_per_rank",
    "handle.num_experts",
    "x.shape[1] (hidden)",
    "handle.topk_idx.shape[1] (num_topk)",
    "handle.expert_alignment",
    "num_scaleout_ranks (EP domain)",
    "num_scaleup_ranks (EP domain)",
    "handle num_channels (hybrid mode)",
)


def _safe(fn) -> object:
    """``fn()``, or None when the input is too broken to say (validation names it)."""
    try:
        v = fn()
    except Exception:  # noqa: BLE001 - a malformed argument; its own check reports it
        return None
    # Plain Python values only: they are pickled across ranks and compared.
    return str(v) if isinstance(v, torch.dtype) else v


def _dispatch_mode(decode: bool) -> str:
    return f"{layout_name(decode)} ({'dispatch' if decode else 'dispatch_exact'})"


def _domain(buf, num_channels) -> tuple:
    """The EP domain's part of both signatures: S, U and C (``num_channels()``; 0 in
    direct mode, None when it cannot be told: validation says why). Ranks that
    disagree on it would run different kernels (hybrid vs direct) or channel
    layouts (a sender's channel c feeds the forwarder's channel c): a timeout or
    wrong data, not an error (contract §9)."""
    if buf is None:
        return (1, None, 0)
    return (buf.num_scaleout_ranks, buf.num_scaleup_ranks, _safe(num_channels))


def dispatch_signature(args, buf=None) -> tuple:
    """The :data:`DISPATCH_FIELDS` of one dispatch call (a :class:`~deepep_ops.handle.DispatchArgs`)
    on the :class:`~deepep_ops.EPOpsBuffer` ``buf``."""
    return (_dispatch_args_signature(args) + _domain(buf, lambda: buf.num_channels(args))
            + (None if buf is None else buf.backend.fixed_num_sms,))


def _dispatch_args_signature(args) -> tuple:
    x, x_scales, topk_idx, _w, num_experts, num_max_tokens_per_rank, expert_alignment, decode = args
    try:  # well-formed arguments (the hot path): plain reads
        return (
            _dispatch_mode(decode),
            int(num_max_tokens_per_rank),
            int(num_experts),
            x.shape[1],
            topk_idx.shape[1],
            str(x.dtype),
            None if x_scales is None else x_scales.shape[1],
            None if x_scales is None else str(x_scales.dtype),
            int(expert_alignment),
        )
    except Exception:  # noqa: BLE001 - malformed: field by field (validation names the culprit)
        pass
    return (
        _dispatch_mode(decode),
        _safe(lambda: int(num_max_tokens_per_rank)),
        _safe(lambda: int(num_experts)),
        _safe(lambda: int(x.shape[1])),
        _safe(lambda: int(topk_idx.shape[1])),
        _safe(lambda: x.dtype),
        None if x_scales is None else _safe(lambda: int(x_scales.shape[1])),
        None if x_scales is None else _safe(lambda: x_scales.dtype),
        _safe(lambda: int(expert_alignment)),
    )


def combine_signature(x, handle, buf=None) -> tuple:
    """The :data:`COMBINE_FIELDS` of one combine call on ``buf``."""
    return _combine_args_signature(x, handle) + _domain(buf, lambda: handle.num_channels)


def _combine_args_signature(x, handle) -> tuple:
    try:  # the hot path
        return (
            layout_name(handle.decode),
            int(handle.num_max_tokens_per_rank),
            int(handle.num_experts),
            x.shape[1],
            handle.topk_idx.shape[1],
            int(handle.expert_alignment),
        )
    except Exception:  # noqa: BLE001 - malformed: field by field
        pass
    return (
        _safe(lambda: layout_name(handle.decode)),
        _safe(lambda: int(handle.num_max_tokens_per_rank)),
        _safe(lambda: int(handle.num_experts)),
        _safe(lambda: int(x.shape[1])),
        _safe(lambda: int(handle.topk_idx.shape[1])),
        _safe(lambda: int(handle.expert_alignment)),
    )


def _digest(ok: bool, signature: tuple) -> tuple:
    """(ok, 63-bit digest of the signature): what the fast path exchanges.

    ``repr`` of a tuple of ints, strings and None is the same in every process
    (``hash()`` of strings is not: it is salted per process).
    """
    h = int.from_bytes(hashlib.blake2b(repr(signature).encode(), digest_size=8).digest(), "little") >> 1
    return (int(ok), h)


def _env_check() -> Optional[bool]:
    v = os.environ.get("DEEPEP_OPS_CHECK")
    return None if v in (None, "") else v not in ("0", "false", "False")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class Agreement:
    """The agreement state of one :class:`EPOpsBuffer` (see the module doc).

    Args:
        exchange: the host exchange over the buffer's EP group.
        check: check mode on/off; ``None``: ``DEEPEP_OPS_CHECK`` (read when the
            buffer is built) if set, else on for CPU tensors only.
    """

    def __init__(self, exchange: HostExchange, check: Optional[bool] = None) -> None:
        self._exchange = exchange
        # DEEPEP_OPS_CHECK is read once, here: the hot path does no environment lookup.
        self._check = _env_check() if check is None else check
        # Combinations every rank has agreed on: (op kind, signature).
        self._seen: set = set()

    def check_mode(self, device: torch.device) -> bool:
        """Whether every call exchanges (check mode) for tensors on ``device``."""
        return device.type == "cpu" if self._check is None else self._check

    def agree(
        self, op: str, kind: str, fields: Sequence[str], signature: tuple,
        error: Optional[BaseException], device: torch.device,
    ) -> None:
        """Raise ``error`` (or a peer's, or a disagreement) on every rank, or return.

        Args:
            op: the op's name, for messages.
            kind: ``"dispatch"`` or ``"combine"`` (keys the seen set).
            fields: the names of ``signature``'s entries.
            signature: this rank's values that must match across ranks.
            error: this rank's validation error, or None.
            device: the tokens' device (selects the default mode).
        """
        key = (kind, signature)
        check = self.check_mode(device)
        if not check:
            if error is not None:
                raise error  # agree-once mode: peers are not told (module doc)
            if key in self._seen:
                return
        if _capturing(device):
            if error is not None:
                raise error
            return
        # Fast path: one small fixed-size exchange. Every rank sees the same
        # digests, so all of them take the slow path (names and messages) together.
        digests = self._exchange.all_gather_ints(_digest(error is None, signature))
        if digests is None:  # the backend cannot exchange (no group): local checks only
            if error is not None:
                raise error
            return
        if all(d == digests[0] for d in digests) and digests[0][0]:
            self._seen.add(key)
            return
        verdict = None if error is None else f"{type(error).__name__}: {error}"
        gathered = self._exchange.all_gather_object((verdict, signature))
        if gathered is None:  # the backend cannot exchange (no group): local checks only
            if error is not None:
                raise error
            return
        failed = [(r, v) for r, (v, _sig) in enumerate(gathered) if v is not None]
        if failed:
            if error is not None:
                raise error
            r, msg = failed[0]
            raise ValueError(f"{op}: rank {r} of {len(gathered)} rejected its input, so every rank stops: {msg}")
        signatures = [sig for _v, sig in gathered]
        mismatches = []
        for i, name in enumerate(fields):
            values = [sig[i] for sig in signatures]
            if any(v != values[0] for v in values):
                per_rank = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
                mismatches.append(f"{name} must be the same on every EP rank, got {per_rank}")
        if mismatches:
            raise ValueError(f"{op}: " + "; ".join(mismatches))
        self._seen.add(key)

    def max_over_ranks(self, value: int, device: Optional[torch.device] = None) -> int:
        """The maximum of ``value`` over the EP group (host exchange); ``value``
        itself without a group, or during CUDA-graph capture."""
        if device is not None and _capturing(device):
            return value
        gathered = self._exchange.all_gather_ints((value,))
        return value if gathered is None else max(v for (v,) in gathered)


def agree_dispatch(
    op: str, buf, args, error: Optional[BaseException], device: Optional[torch.device] = None
) -> None:
    """Agree on a dispatch (``args``: a :class:`~deepep_ops.handle.DispatchArgs`)
    with every EP rank of ``buf``, given this rank's validation ``error``
    (:func:`deepep_ops.validation.verdict`): all raise together, or return.

    ``device`` overrides x's (selects the default mode; meta tensors are host-side)."""
    buf.agreement.agree(
        op, "dispatch", DISPATCH_FIELDS, dispatch_signature(args, buf), error, device or device_of(args.x)
    )


def agree_combine(
    op: str, buf, x, handle, error: Optional[BaseException], device: Optional[torch.device] = None
) -> None:
    """Agree on a combine of ``x`` with ``handle`` (the combine ops, the backward's
    cached dispatch and weighted combine, finalize's rejection of expert outputs,
    a fake kernel's rejection of meta tensors) with every EP rank of ``buf``,
    given this rank's ``error``: all raise together, or return.

    ``device`` overrides x's (selects the default mode; meta tensors are host-side).
    """
    buf.agreement.agree(
        op, "combine", COMBINE_FIELDS, combine_signature(x, handle, buf), error, device or device_of(x)
    )
