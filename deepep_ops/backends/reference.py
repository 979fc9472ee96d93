"""The pure-PyTorch reference: :class:`ReferenceBackend` over
:class:`deepep_ops.ReferenceElasticBuffer`.

The reference buffer has DeepEP's API, so it is driven through the very calls
of :class:`~deepep_ops.backends.deep_ep.DeepEPBackend`: the CPU tests exercise
the real backend's code path. It also writes combine results in place.

Another all-to-all library can reuse the reference's layout (the handle, the
row order, the reductions) by subclassing :class:`ReferenceElasticBuffer` and
overriding its transport, :meth:`ReferenceElasticBuffer.all_to_all_async`; such a
subclass is wrapped here with no registration of its own.
"""

from __future__ import annotations

from typing import Optional

import torch

from deepep_ops.backends.deep_ep import DeepEPBackend
from deepep_ops.reference.elastic import EPHandle, ReferenceElasticBuffer


class ReferenceBackend(DeepEPBackend):
    """:class:`DeepEPBackend` calls on a :class:`ReferenceElasticBuffer` (int64 ids)."""

    #: Plain PyTorch: nothing is compiled per shape.
    needs_warmup = False

    def __init__(self, buffer: ReferenceElasticBuffer, num_sms: Optional[int] = None) -> None:
        # num_sms only reaches the handles (as DeepEP's would record it): the reference runs on no SMs.
        super().__init__(buffer, EPHandle, torch.int64, num_sms=num_sms)

    def combine(self, x, handle, out=None):
        combined_x, _combined_weights, _event = self.buffer.combine(x, handle=self.native_handle(handle), out=out)
        return combined_x

    def _predict_num_channels(self, args, key):
        # The reference simulates hybrid mode with a fixed channel count (its
        # constructor's num_channels), whatever the device and layout; dispatch
        # still confirms it against every handle, as for real DeepEP.
        return self.buffer.num_channels


def from_object(obj: object, num_sms: Optional[int] = None) -> Optional[ReferenceBackend]:
    """A :class:`ReferenceBackend` for a :class:`ReferenceElasticBuffer`, else None."""
    return ReferenceBackend(obj, num_sms) if isinstance(obj, ReferenceElasticBuffer) else None
