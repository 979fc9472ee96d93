"""Meta-device tensors reaching a fake kernel outside tracing are an error.

The fake kernels are registered for the Meta dispatch key too, so an eager call
with meta tensors would get shapes back without validation and without entering
the collective, leaving the peers waiting. Under tracing the inputs are
FakeTensors (or a fake/proxy mode is active), which pass.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor


def reject_eager_meta(op: str, *tensors: object) -> None:
    """Raise if a real (non-fake) meta tensor is given while nothing traces."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_meta and not isinstance(t, FakeTensor):
            if (
                torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None
                and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is None
            ):
                raise ValueError(
                    f"deepep_ops.{op}: got meta-device tensors outside tracing; the op communicates "
                    "with the other EP ranks, so it needs real tensors (meta/fake tensors are only "
                    "meaningful under torch.compile or another tracer)"
                )
            return
