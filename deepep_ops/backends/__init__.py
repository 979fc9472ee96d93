"""Backends: one module per all-to-all implementation, behind :class:`Backend`.

- :mod:`deepep_ops.backends.deep_ep`: real DeepEP v2 (v2.1's ``deep_ep.ElasticBuffer``,
  v2.5's ``deep_ep.EPBuffer``; :func:`~deepep_ops.backends.deep_ep.new_buffer` builds
  whichever is installed).
- :mod:`deepep_ops.backends.reference`: :class:`deepep_ops.ReferenceElasticBuffer`.

:func:`as_backend` turns a user's buffer object into a :class:`Backend`. A new
backend (a DeepEP API change, another all-to-all library) is one new module
with a :class:`Backend` subclass and a ``from_object`` hook listed here.
"""

from __future__ import annotations

from typing import Optional

from deepep_ops.backends import deep_ep as _deep_ep
from deepep_ops.backends import reference as _reference
from deepep_ops.backends.base import Backend, DispatchOutput

#: ``from_object(obj) -> Backend | None`` of every backend module, tried in order.
_FROM_OBJECT = (_reference.from_object, _deep_ep.from_object)


def as_backend(obj: object, num_sms: Optional[int] = None) -> Backend:
    """``obj`` if it is a :class:`Backend`, else the backend that wraps it, its
    dispatch and combine running on ``num_sms`` SMs (None: the backend's choice).

    Raises:
        TypeError: no backend accepts ``obj``; ``num_sms`` given with a
            :class:`Backend` (it was built with its own).
    """
    if isinstance(obj, Backend):
        if num_sms is not None:
            raise TypeError(
                f"EPOpsBuffer: num_sms={num_sms!r} applies to a DeepEP or reference buffer; a "
                f"{type(obj).__qualname__} (a Backend) was built with its own (fixed_num_sms={obj.fixed_num_sms})"
            )
        return obj
    for from_object in _FROM_OBJECT:
        backend = from_object(obj, num_sms)
        if backend is not None:
            return backend
    raise TypeError(
        "EPOpsBuffer: buffer must be a DeepEP buffer (deep_ep.ElasticBuffer, v2.1, or deep_ep.EPBuffer, v2.5), "
        "a deepep_ops.ReferenceElasticBuffer or a "
        f"deepep_ops.backends.Backend, got {type(obj).__module__}.{type(obj).__qualname__}"
    )


__all__ = ["Backend", "DispatchOutput", "as_backend"]
