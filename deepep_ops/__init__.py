"""DeepEP v2 dispatch/combine as ``torch.library`` ops that ``torch.compile`` sees through.

``import deepep_ops`` defines ``torch.ops.deepep_ops.{dispatch, dispatch_exact,
combine, combine_into, token_bucket}`` and registers their fake kernels
(:mod:`fake_impls`). ``deep_ep`` is optional and imported lazily.
"""

import fake_impls as _fake_impls
from deepep_ops import ops as _ops

_fake_impls.register(_ops.lib)

from deepep_ops import autograd as _autograd  # noqa: E402

_autograd.register(_ops.lib, _ops.KERNELS)

from deepep_ops.api import (  # noqa: E402
    PendingCombine,
    PendingDispatch,
    cached_dispatch,
    combine,
    combine_into,
    combine_start,
    combine_wait,
    dispatch,
    dispatch_exact,
    dispatch_exact_start,
    dispatch_start,
    dispatch_wait,
)
from deepep_ops.backends import Backend  # noqa: E402
from deepep_ops.bucket import pow2_bucket, token_bucket  # noqa: E402
from deepep_ops.buffer import EPOpsBuffer, as_ep_buffer, deprecated_name as _deprecated_name  # noqa: E402
from deepep_ops.handle import DispatchHandle, DispatchResult, ExactDispatchResult  # noqa: E402
from deepep_ops.prepare_finalize import DeepEPPrepareFinalize, PendingPrepare, PreparedTokens  # noqa: E402
from deepep_ops.reference import ReferenceElasticBuffer  # noqa: E402
# The function shadows its module as an attribute: import helpers from deepep_ops.warmup.
from deepep_ops.warmup import WarmupRow, format_warmup_table, warmup  # noqa: E402

__all__ = [
    "Backend",
    "DeepEPPrepareFinalize",
    "DispatchHandle",
    "DispatchResult",
    "EPOpsBuffer",
    "ExactDispatchResult",
    "PendingCombine",
    "PendingDispatch",
    "PendingPrepare",
    "PreparedTokens",
    "ReferenceElasticBuffer",
    "WarmupRow",
    "as_ep_buffer",
    "cached_dispatch",
    "combine",
    "combine_into",
    "combine_start",
    "combine_wait",
    "dispatch",
    "dispatch_exact",
    "dispatch_exact_start",
    "dispatch_start",
    "dispatch_wait",
    "format_warmup_table",
    "pow2_bucket",
    "token_bucket",
    "warmup",
]


def __getattr__(name: str) -> object:
    # EPBuffer: the old name of EPOpsBuffer, with a DeprecationWarning (deepep_ops.buffer).
    return _deprecated_name(__name__, name)
