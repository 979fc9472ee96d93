"""The one module that touches private or version-specific torch APIs.

Every private API deepep-ops uses is reached through this module, and each
says which torch versions it was checked on (2.11 on the GPU machines, 2.13
and 2.15 in CI, 2.14 by hand). Where one is missing, the caller falls back to
the slow but public path, and an install function that cannot patch logs one
line saying so.

torch 2.14 renamed opaque objects to *custom classes*: ``torch._custom_class_base
.CustomClassBase`` and ``register_custom_class(typ="symbolic")`` replace
``torch._opaque_base.OpaqueBase`` and ``register_opaque_type(typ="reference")``,
which remain as shims that log a deprecation warning. torch 2.11–2.13 have only
the old names (checked 2.11–2.15).

Also here: stable compile-cache keys for the buffer, CUDA-graph trees that take
it as an input (a backport for torch 2.11, an identity check for all), Dynamo's
frame hook around the kernels, the dispatcher's no-op test of the eager path,
the C++ tensor guard that recognises the eager path's known calls, tensors'
version counters, the fake/proxy-mode test of the fake kernels, and
``guard_or_false`` for size tests on unbacked SymInts.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Iterable, Optional, TypeVar

import torch
from torch._C import _are_functorch_transforms_active, _is_torch_function_mode_enabled, _len_torch_dispatch_stack
from torch._C._autograd import _profiler_enabled
from torch._C._dynamo.eval_frame import set_eval_frame
from torch._library.opaque_object import MemberType, get_opaque_type_name

try:  # torch >= 2.14
    from torch._custom_class_base import CustomClassBase as OpaqueBase
    from torch._library.opaque_object import register_custom_class as _register

    _REFERENCE_KIND = "symbolic"
except ImportError:  # torch 2.11 - 2.13
    from torch._opaque_base import OpaqueBase
    from torch._library.opaque_object import register_opaque_type as _register

    _REFERENCE_KIND = "reference"

__all__ = [
    "CUDAGRAPH_INPUT_MARKER",
    "OpaqueBase",
    "STABLE_CACHE_KEY_METHOD",
    "dispatcher_is_a_no_op",
    "eager_mode_is_plain",
    "frame_counting_backend",
    "graph_breaks",
    "guard_or_false",
    "install_compile_hooks",
    "install_cudagraph_inputs",
    "install_stable_cache_keys",
    "is_real_meta_outside_tracing",
    "metadata_guard",
    "opaque_type_name",
    "register_autograd_kernel",
    "register_ordered_effect",
    "register_reference_type",
    "reset_compiler",
    "version_counter",
    "without_dynamo",
]

_F = TypeVar("_F", bound=Callable)
_log = logging.getLogger("deepep_ops")


def _cannot_patch(what: str, why: str) -> bool:
    """Log once (per call site: each install function runs once per import) that a
    patch was not applied, and return False."""
    _log.warning("deepep_ops: %s not installed on torch %s: %s", what, torch.__version__, why)
    return False


def register_reference_type(cls: type, trace_time_members: Iterable[str]) -> None:
    """Register ``cls`` (an :class:`OpaqueBase` subclass) as an opaque reference type.

    Objects of it become graph inputs under ``torch.compile``; the members named
    in ``trace_time_members`` are read off the real object while tracing and
    baked into the graph.
    """
    _register(cls, typ=_REFERENCE_KIND, members={m: MemberType.USE_REAL for m in trace_time_members})


def opaque_type_name(cls: type) -> str:
    """The name op schemas use for a registered opaque type."""
    return get_opaque_type_name(cls)


# ---------------------------------------------------------------------------
# Stable compile-cache keys for opaque reference objects.
#
# Inductor's FX-graph cache and the AOT-autograd cache key a graph by pickling
# its inputs and nodes (FxGraphCachePickler; AOTAutogradCachePickler subclasses
# it). A FakeScriptObject whose opaque type has members is pickled as its real
# object, after switching the pickler out of fast mode (torch 2.13: "opaque
# types may have cyclic references"). Measured on 2.13 with EPOpsBuffer: the key
# then differs from process to process (memo references depend on object
# identity), so every new process misses; and a buffer holding a ProcessGroup
# cannot be pickled at all ("Failed to pickle cache key", a bypass). Objects
# whose class defines ``STABLE_CACHE_KEY_METHOD`` are keyed by that method's
# plain-data result instead, in fast mode. Nothing here runs for other types.
# ---------------------------------------------------------------------------

#: ``obj.<this>() -> tuple`` of plain data describing what a graph may bake in.
STABLE_CACHE_KEY_METHOD = "_deepep_ops_cache_key"


def _stable_cache_key_ident(*description: object) -> tuple:
    # Never called: cache keys are hashed, not loaded. Module-level so it pickles by name.
    return description


def install_stable_cache_keys() -> bool:
    """Make Inductor/AOT-autograd cache keys use ``STABLE_CACHE_KEY_METHOD`` where defined.

    Idempotent. Returns False (and changes nothing, logging why) on a torch whose
    cache pickler has no ``_reduce_fake_script_object`` hook (present in 2.11–2.15).
    """
    try:
        from torch._inductor.codecache import FxGraphCachePickler
    except ImportError:  # pragma: no cover - torch without Inductor
        return _cannot_patch("stable compile-cache keys for EPOpsBuffer", "no torch._inductor.codecache")
    original = getattr(FxGraphCachePickler, "_reduce_fake_script_object", None)
    if original is None:
        return _cannot_patch(
            "stable compile-cache keys for EPOpsBuffer",
            "FxGraphCachePickler has no _reduce_fake_script_object (compiled graphs with an EPOpsBuffer "
            "then miss the FX/AOT caches in a new process)",
        )
    if getattr(original, "_deepep_ops_stable", False):
        return True

    def _reduce_fake_script_object(self, t):  # type: ignore[no-untyped-def]
        key_fn = getattr(type(getattr(t, "real_obj", None)), STABLE_CACHE_KEY_METHOD, None)
        if key_fn is None:
            return original(self, t)
        return (_stable_cache_key_ident, (t.script_class_name,) + tuple(key_fn(t.real_obj)))

    _reduce_fake_script_object._deepep_ops_stable = True  # type: ignore[attr-defined]
    FxGraphCachePickler._reduce_fake_script_object = _reduce_fake_script_object
    return True


# ---------------------------------------------------------------------------
# CUDA-graph trees (mode="reduce-overhead") for graphs that take an opaque
# reference object as an input.
#
# torch 2.11.0 (2.12 has pytorch/pytorch#179793) records no CUDA graph for such a
# graph: CompiledFxGraph.__init__ gives it the fail reason "non-Tensor inputs"
# (output_code.py: a FakeScriptObject is not a Tensor, SymInt or Generator), and
# cudagraph_partition_post_compile (graph_partition=True, the default) turns CUDA
# graphs off without a skip counted or logged; past that check, recording would
# trip CUDAGraphNode._allocate_and_copy_recording_inputs's assertion that a
# non-tensor input is an int or a Generator. Nothing else in 2.11's trees touches
# the object (it is not static, so never copied or pointer-checked).
#
# And in every torch 2.11-2.15, Dynamo guards a reference-type input on its type
# only, so two buffers share one compiled graph, and a CUDA graph recorded with
# buffer A replays A's device addresses when called with buffer B (measured on
# the H200, torch 2.11 with the backport: B's calls returned A's results;
# tests/test_gpu.py's test_reduce_overhead_replays_each_buffer_its_own_graph).
#
# Both patches act only on objects whose class sets CUDAGRAPH_INPUT_MARKER, wrap
# torch's functions instead of copying them, and are idempotent.
# ---------------------------------------------------------------------------

#: Class attribute: objects of the class may be CUDA-graph tree inputs (see above).
CUDAGRAPH_INPUT_MARKER = "_deepep_ops_cudagraph_input"
_PATCHED = "_deepep_ops_patched"
_NON_TENSOR_INPUTS = "non-Tensor inputs"  # the fail reason in output_code.CompiledFxGraph


def _marked(x: object) -> bool:
    """``x``, or the object a FakeScriptObject ``x`` stands for, is of a marked class."""
    real = getattr(x, "real_obj", x)
    return bool(getattr(type(real), CUDAGRAPH_INPUT_MARKER, False))


def _trees_take_opaque_inputs(node_cls: type) -> bool:
    # #179793 (torch 2.12) made check_invariants compare tensor inputs only
    # (self.tensor_static_input_idxs): its presence marks the fixed versions.
    fn = getattr(node_cls, "check_invariants", None)
    while getattr(fn, "__wrapped__", None) is not None:
        fn = fn.__wrapped__
    code = getattr(fn, "__code__", None)
    return code is None or "tensor_static_input_idxs" in code.co_names


def _allow_marked_inputs(example_inputs, compiled_graph) -> None:
    """Drop "non-Tensor inputs" from a compiled graph's CUDA-graph fail reasons when
    its only non-tensor inputs are marked objects (and the trees are on: the
    non-tree cudagraphify cannot replay a non-tensor input in any version).

    Not for a graph of several partitions (graph_partition=True around ops kept out
    of CUDA graphs): torch 2.11 can hand a partition another op's whole output
    tuple as an input, which its trees cannot record (measured on the H200: the
    partition after prefill's ``dispatch_exact`` failed the recording's assertion).
    Such graphs keep 2.11's verdict and run without CUDA graphs, as before."""
    import dataclasses

    info = getattr(compiled_graph, "cudagraph_info", None)
    if info is None or _NON_TENSOR_INPUTS not in info.cudagraph_fail_reasons:
        return
    if not torch._inductor.config.triton.cudagraph_trees:
        return
    partitions = getattr(compiled_graph, "partition_maps", None)
    if partitions is not None and len(partitions) > 1:
        return
    plain = (torch.Tensor, torch.SymInt, torch.Generator)
    if not all(isinstance(t, plain) or _marked(t) for t in example_inputs):
        return
    reasons = [r for r in info.cudagraph_fail_reasons if r != _NON_TENSOR_INPUTS]
    compiled_graph.cudagraph_info = dataclasses.replace(info, cudagraph_fail_reasons=reasons)


def _patch_trees() -> bool:
    """Patch CUDA-graph trees (module comment), once; returns whether this torch needed
    the backport (2.11). Called by the post-compile hooks below, so that
    ``torch._inductor.cudagraph_trees`` (~0.9 s to import) loads only for graphs
    compiled for CUDA graphs, as Inductor itself loads it."""
    from torch._inductor.cudagraph_trees import CUDAGraphNode
    from torch._inductor.cudagraph_utils import CheckInvariantStatus

    backport = not _trees_take_opaque_inputs(CUDAGraphNode)
    allocate = CUDAGraphNode._allocate_and_copy_recording_inputs
    if backport and not getattr(allocate, _PATCHED, False):

        @functools.wraps(allocate)
        def _allocate_and_copy_recording_inputs(self, inputs):
            marked = {i: x for i, x in enumerate(inputs) if _marked(x)}
            if not marked:
                return allocate(self, inputs)
            # 2.11 asserts a non-tensor input is an int or a Generator: an int
            # stand-in takes the same pass-through branch (no copy, no allocation).
            for i in marked:
                inputs[i] = 0
            try:
                recording_inputs = allocate(self, inputs)
            finally:
                for i, x in marked.items():
                    inputs[i] = x
            for i, x in marked.items():
                recording_inputs[i] = x
            return recording_inputs

        setattr(_allocate_and_copy_recording_inputs, _PATCHED, True)
        CUDAGraphNode._allocate_and_copy_recording_inputs = _allocate_and_copy_recording_inputs

    check = CUDAGraphNode.check_invariants
    if not getattr(check, _PATCHED, False):
        mismatch = CheckInvariantStatus.StaticInputIdxMismatch

        @functools.wraps(check)
        def check_invariants(self, inputs):
            # reconstructed_inputs keeps each non-tensor recording input as it was.
            recorded = getattr(self, "reconstructed_inputs", None)
            idxs = self.__dict__.get("_deepep_ops_marked_idxs")
            if idxs is None and recorded is not None:
                idxs = self.__dict__["_deepep_ops_marked_idxs"] = tuple(
                    i for i, x in enumerate(recorded) if _marked(x)
                )
            for i in idxs or ():
                if inputs[i] is not recorded[i]:
                    # Re-record for this object instead of replaying another's addresses.
                    return mismatch, lambda i=i: f"input {i} is not the {type(inputs[i]).__name__} recorded"
            return check(self, inputs)

        setattr(check_invariants, _PATCHED, True)
        CUDAGraphNode.check_invariants = check_invariants
    return backport


def install_cudagraph_inputs() -> bool:
    """Let CUDA-graph trees take objects of marked classes as graph inputs (module comment).

    Wraps Inductor's two CUDA-graph post-compile hooks, which run (on a compile and
    on a compile-cache hit) before any graph is recorded: the first one patches the
    trees, and on torch 2.11 each lifts the "non-Tensor inputs" verdict for graphs
    whose only non-tensor inputs are marked objects. Idempotent; False (nothing
    changed, logging why) where torch lacks the hooks (present in 2.11–2.15).
    """
    try:
        from torch._inductor import output_code
    except ImportError:  # pragma: no cover - torch without Inductor
        return _cannot_patch("CUDA-graph inputs for EPOpsBuffer", "no torch._inductor.output_code")
    names = ("cudagraph_post_compile", "cudagraph_partition_post_compile")
    hooks = [getattr(output_code, name, None) for name in names]
    if not all(callable(h) for h in hooks):
        missing = [n for n, h in zip(names, hooks) if not callable(h)]
        return _cannot_patch(
            "CUDA-graph inputs for EPOpsBuffer",
            f"torch._inductor.output_code lacks {missing} (mode='reduce-overhead' then runs graphs with an "
            "EPOpsBuffer input without CUDA graphs on torch 2.11, and may replay one buffer's graph for another)",
        )
    for name, original in zip(names, hooks):
        if getattr(original, _PATCHED, False):
            continue

        def wrap(original):
            @functools.wraps(original)
            def post_compile(example_inputs, compiled_graph, *args, **kwargs):
                if _patch_trees():
                    _allow_marked_inputs(example_inputs, compiled_graph)
                return original(example_inputs, compiled_graph, *args, **kwargs)

            setattr(post_compile, _PATCHED, True)
            return post_compile

        setattr(output_code, name, wrap(original))
    return True


def frame_counting_backend(backend: str):
    """A ``torch.compile`` backend that compiles with ``backend`` and counts the frames
    it compiles (``.frame_count``): Dynamo's ``CompileCounterWithBackend`` (demos;
    ``torch._dynamo.testing``, checked 2.11–2.15)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    return CompileCounterWithBackend(backend)


def graph_breaks() -> int:
    """Graph breaks Dynamo counted in this process since :func:`reset_compiler`
    (``torch._dynamo.utils.counters``, checked 2.11–2.15)."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def reset_compiler() -> None:
    """``torch.compiler.reset()`` and Dynamo's counters (demos compile each mode afresh)."""
    from torch._dynamo.utils import counters

    torch.compiler.reset()
    counters.clear()


def install_compile_hooks() -> None:
    """:func:`install_stable_cache_keys` and :func:`install_cudagraph_inputs`, both
    idempotent. Called by the fake kernels, which run when Dynamo first traces a
    graph holding our ops: before any of that graph's cache keys or CUDA-graph
    post-compile steps, and without importing Inductor in processes that never
    compile (``import deepep_ops`` stays light)."""
    install_stable_cache_keys()
    install_cudagraph_inputs()


def without_dynamo(fn: _F) -> _F:
    """``fn`` run with Dynamo's frame hook off (what ``torch.library.register_kernel``
    does through ``torch._disable_dynamo``), at a fraction of its cost
    (``benchmarks/bench_op_overhead.py``; figures in benchmarks/README.md).

    An op kernel that runs eagerly while Dynamo's hook is live (code after a
    graph break inside a compiled function) must not have its own frames traced.
    ``torch._disable_dynamo`` does this through four Python frames, a stance
    lookup and an export check per call; the kernels only need the hook off,
    which is ``set_eval_frame(None)`` around the call and the prior hook back
    after it (the core of ``torch._dynamo.eval_frame.DisableContext``, torch
    2.11-2.13).
    """

    @functools.wraps(fn)
    def kernel(*args, **kwargs):
        prior = set_eval_frame(None)
        try:
            return fn(*args, **kwargs)
        finally:
            set_eval_frame(prior)

    return kernel  # type: ignore[return-value]


def dispatcher_is_a_no_op(*tensors: torch.Tensor) -> bool:
    """Whether calling an op's ``CompositeExplicitAutograd`` kernel directly does what
    the dispatcher would do with these tensor arguments: plain eager execution.

    False while Dynamo traces (the call must be recorded as the op), under any
    torch-function or torch-dispatch mode (fake tensors, make_fx, export,
    DebugMode, FlopCounter), functorch transforms, the profiler (it should see
    the op), for tensor subclasses and meta tensors, and when autograd would
    record (an input needs grad): each of those is what the dispatcher is for.
    Private flags of ``torch._C`` (checked 2.11–2.15).
    """
    if (
        _is_compiling()
        or _is_torch_function_mode_enabled()
        or _len_torch_dispatch_stack()
        or _are_functorch_transforms_active()
        or _profiler_enabled()
    ):
        return False
    plain = torch.Tensor
    # Meta tensors go to the ops' Meta kernels (the fakes), which reject them
    # outside tracing after telling the peers (deepep_ops.agreement).
    if _is_grad_enabled():
        for t in tensors:
            if type(t) is not plain or t.requires_grad or t.is_meta:
                return False
        return True
    for t in tensors:
        if type(t) is not plain or t.is_meta:
            return False
    return True


_is_compiling = torch.compiler.is_compiling
_is_grad_enabled = torch.is_grad_enabled


#: The dispatch keys our ``CompositeExplicitAutograd`` kernels are what comes right
#: below autograd for: plain CPU and CUDA tensors, no mode, no functionalization.
_PLAIN_BACKEND_KEYS = (torch._C.DispatchKey.CPU, torch._C.DispatchKey.CUDA)


def register_ordered_effect(lib: "torch.library.Library", name: str) -> None:
    """Give ``lib``'s op ``name`` an ordered side effect: AOTAutograd threads an
    effect token through every such op (``with_effects``), so compiled graphs
    never reorder them against one another and never drop one whose outputs go
    unused. ``Library._register_effectful_op`` and ``EffectType`` (private;
    checked 2.13–2.15, and 2.11 on the GPU machines)."""
    from torch._library.effects import EffectType

    lib._register_effectful_op(f"{lib.ns}::{name}", EffectType.ORDERED)


def register_autograd_kernel(
    lib: "torch.library.Library",
    name: str,
    kernel: Callable,
    backward: Optional[Callable],
    setup_context: Optional[Callable],
    no_grad_error: Optional[str] = None,
) -> None:
    """``torch.library.register_autograd(f"{lib.ns}::{name}", backward, setup_context=...)``
    with a cheaper path where autograd records nothing.

    torch's own Autograd kernel (``torch._library.autograd``) redispatches below
    autograd through the dispatcher on every call, also where nothing records:
    inside every compiled graph, whose ops AOTAutograd calls with grad mode off.
    That costs about as much as the dispatcher call itself
    (benchmarks/README.md). Here, when nothing records and the next kernel
    below autograd is ours for a plain CPU or CUDA tensor (``keyset`` holds no
    mode, functionalization or other key), ``kernel`` (the op's
    ``CompositeExplicitAutograd`` kernel) is called directly; otherwise the call
    takes the same ``autograd.Function`` / redispatch route as torch's. Private
    dispatcher APIs (``_after_autograd_keyset``, ``_AutoDispatchBelowAutograd``,
    ``_any_requires_grad``), checked on 2.11–2.15.

    ``backward=None``: the op has no gradient; where autograd would record, it
    raises ``ValueError(no_grad_error)`` instead of returning outputs that
    silently carry none.
    """
    op = getattr(getattr(torch.ops, lib.ns), name).default
    after_autograd = torch._C._after_autograd_keyset
    below_autograd = torch._C._AutoDispatchBelowAutograd
    schema_args = op._schema.arguments

    def with_defaults(args: tuple) -> tuple:
        # The dispatcher drops trailing arguments equal to their defaults; setup_context sees them all.
        return args + tuple(a.default_value for a in schema_args[len(args):])

    def forward(ctx, *args):
        keyset, args = args[-1], args[:-1]
        with below_autograd():
            output = op.redispatch(keyset & after_autograd, *args)
        setup_context(ctx, with_defaults(args), output)
        return output

    def backward_(ctx, *grads):
        needs_input_grad = ctx.needs_input_grad
        ctx.needs_input_grad = needs_input_grad[:-1]  # not the keyset's
        try:
            return (*backward(ctx, *grads), None)
        finally:
            ctx.needs_input_grad = needs_input_grad

    function = type(f"DeepEPOpsBackwardFor_{name}", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward_)})
    any_requires_grad = torch._C._any_requires_grad
    is_grad_enabled = torch.is_grad_enabled
    plain = _PLAIN_BACKEND_KEYS

    def autograd_kernel(keyset, *args):
        if is_grad_enabled() and any_requires_grad(*args):
            if backward is None:
                raise ValueError(no_grad_error)
            return function.apply(*args, keyset)
        below = keyset & after_autograd
        if below.highestPriorityTypeId() in plain:
            return kernel(*args)
        with below_autograd():
            return op.redispatch(below, *args)

    lib.impl(name, without_dynamo(autograd_kernel), "Autograd", with_keyset=True)


def eager_mode_is_plain() -> bool:
    """The part of :func:`dispatcher_is_a_no_op` that no tensor guard sees: not
    tracing with Dynamo, no torch-function mode, no profiler."""
    return not (_is_compiling() or _is_torch_function_mode_enabled() or _profiler_enabled())


try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - every torch this package supports has it
    _TensorGuards = None


def metadata_guard(tensors: tuple, dynamic_rows: tuple = (), allow_grad: bool = False) -> Optional[Callable[..., bool]]:
    """``check(*others) -> bool``, True only if each of ``others`` has the Python
    type, dtype, device, sizes, strides and ``requires_grad`` of the tensor of
    ``tensors`` in its place, and the dispatch keys it had under the thread's
    dispatch state then: under a torch-dispatch mode, a functorch transform,
    inference mode or autocast they differ, so the check fails. One C++ call
    (Dynamo's TENSOR_MATCH guard, ``torch._C._dynamo.guards.TensorGuards``,
    checked 2.11–2.15), several times cheaper than reading the same properties
    in Python (benchmarks/README.md).

    Args:
        tensors: plain tensors, none requiring grad unless ``allow_grad``.
        dynamic_rows: indices into ``tensors`` whose dim 0 is not checked.
        allow_grad: for callers below the dispatcher's autograd layer (op
            kernels), where whether autograd records is already decided; the
            guard then still requires the same ``requires_grad`` per tensor.

    Returns:
        None if a tensor is not a plain tensor, or needs grad and ``allow_grad``
        is false (the guard does not look at grad mode, so it could not tell
        when autograd records), or if this torch has no ``TensorGuards``: the
        caller then keeps checking in full.
    """
    if _TensorGuards is None:
        return None
    for t in tensors:
        if type(t) is not torch.Tensor or (t.requires_grad and not allow_grad):
            return None
    sizes = [[None if i in dynamic_rows and d == 0 else n for d, n in enumerate(t.shape)] for i, t in enumerate(tensors)]
    strides = [list(t.stride()) for t in tensors]
    try:
        return _TensorGuards(*tensors, dynamic_dims_sizes=sizes, dynamic_dims_strides=strides).check
    except (TypeError, RuntimeError):  # pragma: no cover - a constructor this module does not know
        return None


def version_counter(t: torch.Tensor) -> Optional[int]:
    """``t._version`` (bumped by every in-place write to ``t`` or a view of it), or
    None for an inference tensor, which has no version counter (checked 2.11–2.15)."""
    try:
        return t._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


def is_real_meta_outside_tracing(t: object) -> bool:
    """``t`` is a real (not fake) meta-device tensor and no fake or proxy dispatch
    mode is active: an eager call with meta tensors, not a trace. Uses
    ``FakeTensor`` and ``torch._C._get_dispatch_mode`` (checked 2.11–2.15)."""
    from torch._subclasses.fake_tensor import FakeTensor

    if not (isinstance(t, torch.Tensor) and t.is_meta) or isinstance(t, FakeTensor):
        return False
    keys = torch._C._TorchDispatchModeKey
    return torch._C._get_dispatch_mode(keys.FAKE) is None and torch._C._get_dispatch_mode(keys.PROXY) is None


def guard_or_false(condition) -> bool:
    """``condition`` (a bool or a SymBool) if it can be decided without a guard on an
    unbacked size, else False (``torch.fx.experimental.symbolic_shapes``, checked 2.11–2.15)."""
    from torch.fx.experimental.symbolic_shapes import guard_or_false as _guard_or_false

    return _guard_or_false(condition)
