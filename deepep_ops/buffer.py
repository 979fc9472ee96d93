"""The long-lived EP buffer as an opaque custom-op argument, and its bucket.

:class:`EPOpsBuffer` is registered as an opaque *reference* type, so under
``torch.compile`` it becomes a graph input rather than a constant: one graph
serves every layer and every process, and nothing per-process is baked in. The
fake kernels read only ``num_ranks``, ``capacity``, the EP domain
(``num_scaleout_ranks``, ``num_scaleup_ranks``) and, in hybrid mode, the
backend's channel count (:meth:`EPOpsBuffer.num_channels`) from it.

The buffer also owns the token count its bucket M is computed from (its
*token source*), so the eager path (:meth:`EPOpsBuffer.bucket`) and the compiled
path (``deepep_ops::token_bucket``) of one caller always pick the same M.

The class was called ``EPBuffer`` until DeepEP v2.5 named its own buffer
``deep_ep.EPBuffer`` (the buffer ours wraps): ``deepep_ops.EPBuffer`` is a
deprecated alias of :class:`EPOpsBuffer` (a DeprecationWarning on every
lookup), so that one user file can hold both without one name meaning two things.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

from deepep_ops._torch_compat import (
    CUDAGRAPH_INPUT_MARKER,
    STABLE_CACHE_KEY_METHOD,
    OpaqueBase,
    opaque_type_name,
    register_reference_type,
)
from deepep_ops.agreement import Agreement
from deepep_ops.backends import Backend, as_backend
from deepep_ops.bucket import pow2_bucket
from deepep_ops.known_calls import KnownCalls
from deepep_ops.exchange import HostExchange

#: ``source(local_num_tokens) -> tokens to bucket``, run on the host.
TokenSource = Callable[[int], int]


class EPOpsBuffer(OpaqueBase):
    """Wraps a backend (DeepEP's buffer: v2.1's ``deep_ep.ElasticBuffer`` or v2.5's
    ``deep_ep.EPBuffer``; a :class:`ReferenceElasticBuffer`; or a
    :class:`deepep_ops.backends.Backend`).

    Args:
        buffer: the buffer to wrap.
        num_tokens_source: ``source(local_num_tokens) -> int``, the token count
            to bucket; with a DP group it must return the DP-global maximum
            (the same on every rank). ``None``: the maximum of the local counts
            over the EP group, exchanged on the host at every call (cheap over
            gloo; on GPU give a source, e.g. vLLM's DP metadata).
        check: cross-rank check mode (:mod:`deepep_ops.agreement`): ``None``
            reads ``DEEPEP_OPS_CHECK``, else on for CPU tensors only.
        num_sms: the SMs DeepEP's dispatch and combine kernels run on, the same
            on every rank (the ranks agree on it). ``None``: DeepEP's
            ``get_theoretical_num_sms``, which is every SM of the GPU at R = 1.
            Give fewer to leave SMs to the compute overlapped with the async
            ops (docs/overlap.md). Not with a
            :class:`~deepep_ops.backends.Backend` (it has its own).

    Attributes:
        backend: the :class:`~deepep_ops.backends.Backend`.
        num_ranks: R, the EP group size.
        rank: this process's rank in the EP group.
        capacity: the largest M.
        num_scaleout_ranks: S, the nodes of the EP domain: 1 in direct mode,
            > 1 in hybrid mode (docs/deepep_contract.md §9).
        num_scaleup_ranks: U = R / S, the ranks per node.
        topk_idx_dtype: the dtype ``topk_idx`` must have.
        exchange: the :class:`~deepep_ops.exchange.HostExchange` over the EP group.
        agreement: the :class:`~deepep_ops.agreement.Agreement` of this buffer.
        known_calls: the :class:`~deepep_ops.known_calls.KnownCalls` of the eager path and the op kernels.
    """

    def __init__(
        self,
        buffer: object,
        *,
        num_tokens_source: Optional[TokenSource] = None,
        check: Optional[bool] = None,
        num_sms: Optional[int] = None,
    ) -> None:
        self.backend: Backend = as_backend(buffer, num_sms)
        self.num_ranks: int = self.backend.num_ranks
        self.rank: int = self.backend.rank
        self.capacity: int = self.backend.capacity
        self.num_scaleout_ranks: int = self.backend.num_scaleout_ranks
        self.num_scaleup_ranks: int = self.backend.num_scaleup_ranks
        self.topk_idx_dtype = self.backend.topk_idx_dtype
        self.num_tokens_source = num_tokens_source
        self.exchange = HostExchange(self.backend.group, self.num_ranks)
        self.agreement = Agreement(self.exchange, check)
        self.known_calls = KnownCalls()
        #: The async call in flight (:mod:`deepep_ops.pending`), or None.
        self.pending = None

    def bucket(self, num_local_tokens: int) -> int:
        """M for a step with ``num_local_tokens`` here: ``pow2_bucket`` of the
        source's count (ValueError past the capacity)."""
        source = self.num_tokens_source
        if source is not None:
            n = source(num_local_tokens)
        elif self.num_ranks > 1:
            # Ranks may hold different T: a bucket of the local T would give each
            # rank its own M, and the collective aborts (gloo) or hangs.
            n = self.agreement.max_over_ranks(num_local_tokens)
        else:
            n = num_local_tokens
        return pow2_bucket(n, self.capacity)

    @property
    def hybrid(self) -> bool:
        """Whether the EP domain is in hybrid mode (several scale-out ranks)."""
        return self.num_scaleout_ranks > 1

    def rank_layout(self) -> Tuple[int, int]:
        """``(R, S)``: the EP group size and the number of scale-out ranks.

        The wrappers read these through this method, not the attributes: under
        ``torch.compile(dynamic=True)`` Dynamo turns an int attribute of a graph
        input into a symbolic input (torch 2.11-2.15), while a registered
        method's result is baked as a constant, as the fake kernels bake R·M and S.
        """
        return self.num_ranks, self.num_scaleout_ranks

    def num_channels(self, args) -> int:
        """C of a dispatch of ``args`` (a :class:`~deepep_ops.handle.DispatchArgs`)
        in hybrid mode, 0 in direct mode (:meth:`Backend.num_channels
        <deepep_ops.backends.Backend.num_channels>`)."""
        return self.backend.num_channels(args) if self.num_scaleout_ranks > 1 else 0

    def __obj_flatten__(self) -> tuple:
        # Nothing for Inductor to count: torch 2.11's Inductor sizes graph-input
        # objects through this (ir.TorchBindObject.get_buf_bytes) even for opaque
        # types; 2.13 skips opaque types. No tensors here belong to the graph.
        return ()

    # --- identity across copies and processes (compile caches; issue 17) ---

    def cache_description(self) -> tuple:
        """What a compiled graph may depend on, as plain data: the backend type,
        R, the capacity, the id dtype and S (hybrid shapes). Not the rank (one
        graph serves every rank), not the token source (read at run time), never
        the ProcessGroup."""
        backend = type(self.backend)
        return (f"{backend.__module__}.{backend.__qualname__}", self.num_ranks, self.capacity, str(self.topk_idx_dtype),
                self.num_scaleout_ranks)

    def __deepcopy__(self, memo: dict) -> "EPOpsBuffer":
        # A long-lived communication resource: copies of a module or graph share it.
        return self

    def __copy__(self) -> "EPOpsBuffer":
        return self

    def __reduce__(self) -> tuple:
        # Pickles (for compile-cache keys) as its description; loading it fails clearly.
        return (_unpickle_ep_buffer, self.cache_description())

    def __repr__(self) -> str:
        domain = f", {self.num_scaleout_ranks}x{self.num_scaleup_ranks} hybrid" if self.hybrid else ""
        return (
            f"EPOpsBuffer({type(self.backend).__name__}, rank={self.rank}/{self.num_ranks}{domain}, "
            f"capacity={self.capacity})"
        )


def _unpickle_ep_buffer(*description: object) -> EPOpsBuffer:
    raise TypeError(
        f"EPOpsBuffer{description} cannot be unpickled: it wraps a live communication buffer; "
        "build an EPOpsBuffer in the receiving process instead"
    )


# Read at trace time and baked: these are the same on every rank and layer.
register_reference_type(
    EPOpsBuffer,
    trace_time_members=("num_ranks", "capacity", "topk_idx_dtype", "num_scaleout_ranks", "num_scaleup_ranks",
                        "rank_layout"),
)
# Compile caches key graphs by cache_description(), the same in every process.
setattr(EPOpsBuffer, STABLE_CACHE_KEY_METHOD, EPOpsBuffer.cache_description)
# mode="reduce-overhead": CUDA-graph trees take the buffer as an input (torch 2.11
# needs a backport for that), and a graph recorded with one buffer re-records
# rather than replay its device addresses for another.
setattr(EPOpsBuffer, CUDAGRAPH_INPUT_MARKER, True)
# The hooks that act on these two markers patch Inductor, whose import costs
# seconds: they are installed when a graph holding our ops is first traced
# (fake_impls), not by `import deepep_ops`.

#: The name schemas use for the buffer argument.
EP_BUFFER_TYPE = opaque_type_name(EPOpsBuffer)


def as_ep_buffer(buffer: object) -> EPOpsBuffer:
    """Wrap a backend in :class:`EPOpsBuffer` unless it already is one."""
    return buffer if isinstance(buffer, EPOpsBuffer) else EPOpsBuffer(buffer)


def unwrap_ep_buffer(buffer: object) -> EPOpsBuffer:
    """The real :class:`EPOpsBuffer` behind a custom-op argument (fake kernels get a wrapper).

    Raises:
        TypeError: ``buffer`` is not an :class:`EPOpsBuffer` (e.g. a raw backend).
    """
    real = getattr(buffer, "real_obj", buffer)
    if not isinstance(real, EPOpsBuffer):
        raise TypeError(
            "deepep_ops: buffer must be a deepep_ops.EPOpsBuffer (wrap the backend: "
            f"deepep_ops.EPOpsBuffer(buffer)), got {type(real).__module__}.{type(real).__qualname__}"
        )
    return real


#: Names kept for user code, each with the one it became.
_DEPRECATED_NAMES = {"EPBuffer": "EPOpsBuffer"}


def deprecated_name(module: str, name: str) -> object:
    """The object a deprecated public name stands for, with a DeprecationWarning
    attributed to the caller's caller (user code); AttributeError for other names.
    The ``__getattr__`` of :mod:`deepep_ops` and of this module."""
    new = _DEPRECATED_NAMES.get(name)
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    import warnings

    warnings.warn(
        f"{module}.{name} is deprecated, use {module}.{new}: the same class, renamed because DeepEP v2.5 "
        f"calls its own buffer (the one this class wraps) deep_ep.{name}",
        DeprecationWarning,
        stacklevel=3,
    )
    return globals()[new]


def __getattr__(name: str) -> object:
    return deprecated_name(__name__, name)
