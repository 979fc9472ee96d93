"""Cross-rank agreement: every EP rank fails together, with one clear error.

A collective whose ranks disagree on its sizes does not raise: gloo aborts the
process (``EnforceNotMet``, uncatchable), NCCL hangs or reads garbage, and a
rank that rejects its own input leaves its peers waiting for the whole
process-group timeout. Before the first payload collective of an op, the ranks
therefore exchange (over the EP group, on the host: a fixed-size digest through
:meth:`Backend.all_gather_ints`, and only when something differs the values
themselves through :meth:`Backend.all_gather_object`) a small tuple of the values that must match
(:data:`DISPATCH_FIELDS`, :data:`COMBINE_FIELDS`) plus their local validation
verdict, and all raise the same error when anything is off.

Two modes, per :class:`EPBuffer`:

- *agree once* (default on GPU): the exchange runs the first time the buffer
  sees each distinct combination of the fields; a seen combination costs a
  tuple build and a set lookup, no collective, so the steady state stays
  CUDA-graph capturable. A local rejection is raised locally (as before).
- *check mode* (default for CPU tensors, i.e. gloo; opt in with
  ``EPBuffer(check=True)`` or ``DEEPEP_OPS_CHECK=1``; ``DEEPEP_OPS_CHECK=0`` or
  ``check=False`` turns it off): the exchange runs on every call, so a per-call
  difference (one rank's M) and one rank's rejection reach every rank.

Agree-once mode also remembers the eager calls that passed (:attr:`Agreement.known_calls`):
keyed on the mode, T and the int arguments, each with a guard over every
property of the tensor arguments that validation reads except their values
(:mod:`deepep_ops.ops`), so a repeat skips validation's explainers and the
signature build too.

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
)

#: The values of a combine that must be the same on every EP rank.
COMBINE_FIELDS = (
    "mode",
    "handle.num_max_tokens_per_rank",
    "handle.num_experts",
    "x.shape[1] (hidden)",
    "handle.topk_idx.shape[1] (num_topk)",
    "handle.expert_alignment",
)


def _safe(fn) -> object:
    """``fn()``, or None when the input is too broken to say (validation names it)."""
    try:
        v = fn()
    except Exception:  # noqa: BLE001 - a malformed argument; its own check reports it
        return None
    # Plain Python values only: they are pickled across ranks and compared.
    return str(v) if isinstance(v, torch.dtype) else v


def dispatch_signature(x, x_scales, topk_idx, num_experts, num_max_tokens_per_rank, expert_alignment, exact) -> tuple:
    """The :data:`DISPATCH_FIELDS` of one dispatch call."""
    try:  # well-formed arguments (the hot path): plain reads
        return (
            "prefill (dispatch_exact)" if exact else "decode (dispatch)",
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
        "prefill (dispatch_exact)" if exact else "decode (dispatch)",
        _safe(lambda: int(num_max_tokens_per_rank)),
        _safe(lambda: int(num_experts)),
        _safe(lambda: int(x.shape[1])),
        _safe(lambda: int(topk_idx.shape[1])),
        _safe(lambda: x.dtype),
        None if x_scales is None else _safe(lambda: int(x_scales.shape[1])),
        None if x_scales is None else _safe(lambda: x_scales.dtype),
        _safe(lambda: int(expert_alignment)),
    )


def _combine_mode(do_expand: bool) -> str:
    return "prefill (do_expand=True)" if do_expand else "decode (do_expand=False)"


def combine_signature(x, handle) -> tuple:
    """The :data:`COMBINE_FIELDS` of one combine call."""
    try:  # the hot path
        return (
            _combine_mode(handle.do_expand),
            int(handle.num_max_tokens_per_rank),
            int(handle.num_experts),
            x.shape[1],
            handle.topk_idx.shape[1],
            int(handle.expert_alignment),
        )
    except Exception:  # noqa: BLE001 - malformed: field by field
        pass
    return (
        _safe(lambda: _combine_mode(handle.do_expand)),
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


#: Bound on :meth:`Agreement.remember_call`'s keys (one per T, dtype, ... seen).
_MAX_KNOWN_CALLS = 4096


def _env_check() -> Optional[bool]:
    v = os.environ.get("DEEPEP_OPS_CHECK")
    return None if v in (None, "") else v not in ("0", "false", "False")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class Agreement:
    """The agreement state of one :class:`EPBuffer` (see the module doc).

    Args:
        backend: the buffer's backend; its ``all_gather_object`` exchanges.
        check: check mode on/off; ``None``: ``DEEPEP_OPS_CHECK`` (read when the
            buffer is built) if set, else on for CPU tensors only.
    """

    def __init__(self, backend, check: Optional[bool] = None) -> None:
        self._backend = backend
        # DEEPEP_OPS_CHECK is read once, here: the hot path does no environment lookup.
        self._check = _env_check() if check is None else check
        # Combinations every rank has agreed on: (op kind, signature).
        self._seen: set = set()
        #: Agree-once mode: eager call keys (deepep_ops.ops) that passed validation
        #: and agreement -> what the op derived from them (read it; add through
        #: :meth:`remember_call`). Bounded: a key holds T.
        self.known_calls: dict = {}

    def check_mode(self, device: torch.device) -> bool:
        """Whether every call exchanges (check mode) for tensors on ``device``."""
        return device.type == "cpu" if self._check is None else self._check

    def remember_call(self, key: Optional[tuple], value: tuple, device: torch.device) -> None:
        """Remember that a call with ``key`` passed validation and agreement, in
        agree-once mode only (check mode exchanges on every call)."""
        if key is None or self.check_mode(device):
            return
        if len(self.known_calls) >= _MAX_KNOWN_CALLS:
            self.known_calls.clear()
        self.known_calls[key] = value

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
        digests = self._backend.all_gather_ints(_digest(error is None, signature))
        if digests is None:  # the backend cannot exchange (no group): local checks only
            if error is not None:
                raise error
            return
        if all(d == digests[0] for d in digests) and digests[0][0]:
            self._seen.add(key)
            return
        verdict = None if error is None else f"{type(error).__name__}: {error}"
        gathered = self._backend.all_gather_object((verdict, signature))
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
        gathered = self._backend.all_gather_ints((value,))
        return value if gathered is None else max(v for (v,) in gathered)
