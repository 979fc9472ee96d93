"""DeepEP v2 dispatch/combine as ``torch.library`` ops that ``torch.compile`` sees through.

``import deepep_ops`` registers ``torch.ops.deepep_ops.{dispatch, dispatch_exact,
combine}`` and their fake kernels. ``deep_ep`` is optional and imported lazily.
"""

from deepep_ops import ops as _ops  # noqa: F401  (registers the ops)
import fake_impls as _fake_impls  # noqa: F401  (registers the fake kernels)

from deepep_ops.api import combine, combine_into, dispatch, dispatch_exact
from deepep_ops.bucket import pow2_bucket
from deepep_ops.bucket import token_bucket
from deepep_ops.buffer import EPBuffer, as_ep_buffer
from deepep_ops.handle import DispatchHandle, DispatchResult, ExactDispatchResult
from deepep_ops.prepare_finalize import DeepEPPrepareFinalize, PreparedTokens
from deepep_ops.protocol import ElasticBufferBackend
from deepep_ops.reference import ReferenceElasticBuffer

__all__ = [
    "DeepEPPrepareFinalize",
    "DispatchHandle",
    "DispatchResult",
    "EPBuffer",
    "ElasticBufferBackend",
    "ExactDispatchResult",
    "ReferenceElasticBuffer",
    "as_ep_buffer",
    "combine",
    "combine_into",
    "dispatch",
    "dispatch_exact",
    "pow2_bucket",
    "PreparedTokens",
    "token_bucket",
]
