"""The async ops' bookkeeping: which start of a buffer is waiting for its wait.

A start op (``deepep_ops::dispatch_start``, ``dispatch_exact_start``,
``combine_start``) launches the communication and returns a *ticket*, an empty
tensor; the matching wait takes the ticket back. Between the two the buffer
holds one :class:`PendingCall`: at most one async call per buffer is in flight
(DeepEP v2.5 receives a deferred dispatch out of the buffer's own memory at
the wait, so a second call before it would overwrite it). Misuse is a clear
``ValueError`` naming both ops, never a collective that hangs or reads the
wrong data:

- a start while another call is pending, or any synchronous op (a dispatch,
  combine, cached dispatch, ...) while one is (a start whose wait never came
  before the next collective): the new call's verdict, agreed with every rank
  like any other invalid input (:mod:`deepep_ops.agreement`);
- a wait with no pending call (a wait without its start, or a second wait),
  or with another call's ticket: raised by the waiting rank (every rank runs
  the same program, so each one that misuses it raises).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class PendingCall(NamedTuple):
    """An async call in flight on a buffer."""

    #: The start op's name (``deepep_ops.dispatch_start``, ...), for messages.
    op: str
    #: The wait op its ticket belongs to.
    wait_op: str
    #: The start's output, which only its own wait may present.
    ticket: torch.Tensor
    #: The backend's started call: ``started.wait()`` returns the result.
    started: object


def ticket_like(x: torch.Tensor) -> torch.Tensor:
    """A new ticket: an empty uint8 tensor on the tokens' device (no memory, no kernel)."""
    return torch.empty((0,), dtype=torch.uint8, device=x.device)


def outstanding_error(op: str, buf) -> Optional[ValueError]:
    """The error for calling ``op`` on ``buf`` while an async call is pending, or None."""
    pending = buf.pending
    if pending is None:
        return None
    return ValueError(
        f"{op}: the EP buffer still has {pending.op} in flight; its {pending.wait_op} must come before "
        "any other EP collective on the buffer (at most one async call per buffer is in flight)"
    )


def begin(buf, op: str, wait_op: str, ticket: torch.Tensor, started: object) -> torch.Tensor:
    """Record a started call on ``buf``; returns its ticket."""
    buf.pending = PendingCall(op, wait_op, ticket, started)
    return ticket


def take(buf, wait_op: str, ticket: torch.Tensor) -> object:
    """The started call that ``ticket`` belongs to, no longer pending.

    Raises:
        ValueError: nothing is pending on ``buf``, or ``ticket`` is not the
            pending call's, or the pending call is waited for by another op.
    """
    pending = buf.pending
    if pending is None:
        raise ValueError(
            f"{wait_op}: no async call is in flight on this EP buffer: every wait needs its start, "
            "and a start is waited for once"
        )
    if pending.ticket is not ticket or pending.wait_op != wait_op:
        raise ValueError(
            f"{wait_op}: the ticket is not the one the buffer's pending {pending.op} returned "
            f"(that one is waited for by {pending.wait_op}); pass each start's ticket to its own wait"
        )
    buf.pending = None
    return pending.started
