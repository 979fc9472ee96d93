"""The interface the op kernels call: dispatch in, plain tensors and sizes out;
combine from a :class:`~deepep_ops.handle.DispatchHandle` of plain tensors.

Shape letters: see the glossary in :mod:`deepep_ops.layout`.
"""

from __future__ import annotations

import abc
from typing import NamedTuple, Optional

import torch

from deepep_ops.handle import DispatchArgs, DispatchHandle
from deepep_ops.layout import TURN_HYBRID_MODE_OFF


class DispatchOutput(NamedTuple):
    """What a backend's dispatch returns.

    - ``recv_x`` [rows, H]; ``recv_x_scales`` [rows, P] or None without scales.
    - ``recv_topk_idx`` [R·M, K] local ids (decode), None in prefill mode.
    - ``recv_topk_weights`` [R·M, K] (decode) or [X] (prefill) float32.
    - ``handle_tensors``: the five int32 handle tensors in
      :data:`deepep_ops.handle.HANDLE_TENSORS` order.
    - ``native_handle``: the backend's own handle object, if it has one; eager
      combine passes it back (see :class:`deepep_ops.handle.DispatchedHandle`).
    - ``hybrid_tensors``: the two hybrid-only int32 tensors in
      :data:`deepep_ops.handle.HYBRID_TENSORS` order; ``(None, None)`` in direct mode.
    """

    recv_x: torch.Tensor
    recv_x_scales: Optional[torch.Tensor]
    recv_topk_idx: Optional[torch.Tensor]
    recv_topk_weights: torch.Tensor
    handle_tensors: tuple
    native_handle: Optional[object] = None
    hybrid_tensors: tuple = (None, None)


class Done:
    """A started call whose result is already there: ``wait()`` returns it (the
    default of :meth:`Backend.dispatch_async` / :meth:`Backend.combine_async`)."""

    __slots__ = ("_result",)

    def __init__(self, result: object) -> None:
        self._result = result

    def wait(self) -> object:
        return self._result


class Backend(abc.ABC):
    """One EP buffer of one all-to-all implementation.

    Attributes:
        num_ranks: R, the EP group size.
        rank: this process's rank in the EP group.
        capacity: the largest M a dispatch may use.
        topk_idx_dtype: the dtype ``topk_idx`` must have.
        hidden: the largest H the buffer was sized for (None: any).
        group: the EP process group, or None (world size 1, or a backend that
            cannot exchange on the host: its ranks then skip cross-rank
            agreement). :mod:`deepep_ops.exchange` runs the host exchanges on it.
        needs_warmup: whether the backend compiles kernels per shape on first
            use (DeepEP's JIT), so that serving should warm every bucket up
            front (:func:`deepep_ops.warmup.warmup_enabled`).
        num_scaleout_ranks: S, the nodes of the EP domain (docs/deepep_contract.md
            §9): 1 in direct mode (the default), > 1 in hybrid mode.
        num_scaleup_ranks: U = R / S, the ranks per node (R in direct mode).
    """

    num_ranks: int
    rank: int
    capacity: int
    topk_idx_dtype: torch.dtype
    hidden: Optional[int] = None
    group: Optional[object] = None
    needs_warmup: bool = False
    num_scaleout_ranks: int = 1
    #: The SMs every dispatch and combine of this backend runs on, as the user
    #: pinned them (``EPOpsBuffer(num_sms=)``), or None: the library's own choice.
    #: The ranks agree on it (:data:`deepep_ops.agreement.DISPATCH_FIELDS`).
    fixed_num_sms: Optional[int] = None

    @property
    def num_scaleup_ranks(self) -> int:
        return self.num_ranks // self.num_scaleout_ranks

    def num_channels(self, args: DispatchArgs) -> int:
        """C of a hybrid-mode dispatch of ``args`` (static per buffer, H, x dtype, P,
        K and the backend's num_sms); 0 in direct mode. The fake kernels shape the
        hybrid handle tensors with it at trace time.

        Raises:
            ValueError: hybrid mode and the backend cannot tell C (the message
                names the switch that turns hybrid mode off).
        """
        if self.num_scaleout_ranks == 1:
            return 0
        raise ValueError(
            f"{type(self).__name__}: hybrid mode (num_scaleout_ranks={self.num_scaleout_ranks}) needs the "
            f"backend's num_channels; this backend does not implement it. {TURN_HYBRID_MODE_OFF}"
        )

    @abc.abstractmethod
    def dispatch(self, args: DispatchArgs) -> DispatchOutput:
        """Direct-mode dispatch (docs/deepep_contract.md §2) of validated ``args``: decode (R·M rows,
        no host sync) or prefill (expand + CPU sync + zeroed padding)."""

    @abc.abstractmethod
    def combine(self, x: torch.Tensor, handle: DispatchHandle, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Unweighted combine (contract §4) of ``x`` [rows, H] bf16 into [T, H] bf16,
        written into ``out`` when given (and returned). ``handle`` may be a
        :class:`~deepep_ops.handle.DispatchedHandle` carrying ``native``, the
        ``native_handle`` this backend's dispatch returned."""

    # Asynchrony (deepep_ops::dispatch_start / _wait, combine_start / _wait). A
    # backend without it runs the call at start: correct, with nothing to overlap.
    def dispatch_async(self, args: DispatchArgs) -> "Done":
        """Start :meth:`dispatch`: returns an object whose ``wait()`` (called once,
        by the matching wait op) returns its :class:`DispatchOutput`; until then
        the communication may be in flight while the caller computes."""
        return Done(self.dispatch(args))

    def combine_async(self, x: torch.Tensor, handle: DispatchHandle) -> "Done":
        """Start :meth:`combine`: ``wait()`` returns the [T, H] bf16 result."""
        return Done(self.combine(x, handle))

    # Training: the two calls the backward passes make. Not abstract, so
    # forward-only backends keep working; the op kernels raise their error.
    def cached_dispatch(
        self, x: torch.Tensor, x_scales: Optional[torch.Tensor], handle: DispatchHandle
    ) -> tuple:
        """Dispatch reusing ``handle``'s routing (DeepEP's ``dispatch(x, handle=...)``).

        Args:
            x: [T, H] (T = ``handle.topk_idx.shape[0]``); x_scales [T, P] or None.
        Returns:
            ``(recv_x, recv_x_scales or None)`` with the rows of the handle's
            dispatch: [R·M, H] in decode mode (rows >= psum[-1] unspecified),
            [X, H] in prefill mode (padding rows zero).
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement cached_dispatch (needed for backward)")

    def combine_with_weights(
        self, x: torch.Tensor, topk_weights: torch.Tensor, handle: DispatchHandle
    ) -> tuple:
        """:meth:`combine` that also carries ``topk_weights`` back (DeepEP combine's ``topk_weights=``).

        Args:
            x: [rows, H] bf16; topk_weights: [R·M, K] (decode) or [X] (prefill) float32.
        Returns:
            ``(combined_x [T, H] bf16, combined_topk_weights [T, K] float32)``:
            lane k of token t comes from the rank owning its expert, 0 where
            ``topk_idx[t, k] < 0``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement combine_with_weights (needed for backward)"
        )
