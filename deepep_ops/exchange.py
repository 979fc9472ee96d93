"""Small host-side exchanges over a backend's EP process group.

Cross-rank agreement (:mod:`deepep_ops.agreement`) and the buffer's bucket
(``EPOpsBuffer.bucket`` without a token source) all-gather a few ints, and rarely
a small picklable value, before any payload collective. Any backend that
exposes its process group (:attr:`deepep_ops.backends.Backend.group`) gets
them from here: nothing backend-specific is needed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class HostExchange:
    """All-gathers of small host values over ``group`` (``num_ranks`` ranks).

    World size 1 needs no group. With more ranks and no group there is nothing
    to exchange with: both methods return None and callers fall back to local
    checks.
    """

    def __init__(self, group: Optional["dist.ProcessGroup"], num_ranks: int) -> None:
        self.group = group
        self.num_ranks = num_ranks

    def all_gather_ints(self, values: tuple) -> Optional[list]:
        """Every rank's ``values`` (a fixed-length tuple of int64s), in rank order:
        one small collective, no pickling. None without a group."""
        if self.num_ranks == 1:
            return [tuple(values)]
        if self.group is None:
            return None
        # NCCL moves device tensors only; gloo host tensors.
        if dist.get_backend(self.group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        mine = torch.tensor(values, dtype=torch.int64, device=device)
        out = [torch.empty_like(mine) for _ in range(self.num_ranks)]
        dist.all_gather(out, mine, group=self.group)
        return [tuple(t.tolist()) for t in out]

    def all_gather_object(self, obj: object) -> Optional[list]:
        """Every rank's ``obj`` (a small picklable value), in rank order. None without a group."""
        if self.num_ranks == 1:
            return [obj]
        if self.group is None:
            return None
        out = [None] * self.num_ranks
        dist.all_gather_object(out, obj, group=self.group)
        return out
