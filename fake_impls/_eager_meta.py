"""Meta-device tensors reaching a fake kernel outside tracing are an error.

The fake kernels are registered for the Meta dispatch key too, so an eager call
with meta tensors would get shapes back without validation and without entering
the collective, leaving the peers waiting. Under tracing the inputs are
FakeTensors (or a fake/proxy mode is active), which pass.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor

from deepep_ops.buffer import unwrap_ep_buffer


def reject_eager_meta(op: str, *tensors: object, buffer: object = None, agree: Optional[Callable[[], tuple]] = None) -> None:
    """Raise if a real (non-fake) meta tensor is given while nothing traces.

    With ``buffer`` and ``agree() -> (kind, fields, signature)`` (called only on
    this error path: reading a SymInt's value while tracing would specialize it) the error first
    goes through the buffer's cross-rank agreement, so the peers (which called
    the real kernel) raise too instead of waiting in the collective.
    """
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_meta and not isinstance(t, FakeTensor):
            if (
                torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None
                and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is None
            ):
                error = ValueError(
                    f"deepep_ops.{op}: got meta-device tensors outside tracing; the op communicates "
                    "with the other EP ranks, so it needs real tensors (meta/fake tensors are only "
                    "meaningful under torch.compile or another tracer)"
                )
                if buffer is not None and agree is not None:
                    kind, fields, signature = agree()
                    # Meta tensors are host-side: the CPU default of check mode applies.
                    unwrap_ep_buffer(buffer).agreement.agree(
                        f"deepep_ops.{op}", kind, fields, signature, error, torch.device("cpu")
                    )
                raise error
            return
