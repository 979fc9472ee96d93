"""Meta-device tensors reaching a fake kernel outside tracing are an error.

The fake kernels are registered for the Meta dispatch key too, so an eager call
with meta tensors would get shapes back without validation and without entering
the collective, leaving the peers waiting. Under tracing the inputs are
FakeTensors (or a fake/proxy mode is active), which pass.
"""

from __future__ import annotations

from typing import Callable, Optional

from deepep_ops._torch_compat import is_real_meta_outside_tracing


def reject_eager_meta(op: str, *tensors: object, agree: Optional[Callable[[Exception], None]] = None) -> None:
    """Raise if a real (non-fake) meta tensor is given while nothing traces.

    ``agree(error)`` (called only on this error path: reading a SymInt's value
    while tracing would specialize it) first shares the error through the
    buffer's cross-rank agreement (:mod:`deepep_ops.agreement`), so the peers
    (which called the real kernel) raise too instead of waiting in the collective.
    """
    if any(is_real_meta_outside_tracing(t) for t in tensors):
        error = ValueError(
            f"deepep_ops.{op}: got meta-device tensors outside tracing; the op communicates "
            "with the other EP ranks, so it needs real tensors (meta/fake tensors are only "
            "meaningful under torch.compile or another tracer)"
        )
        if agree is not None:
            agree(error)
        raise error
