"""A vLLM post-grad pass: ``out.copy_(deepep_ops.combine(...))`` → ``deepep_ops.combine_into(out, ...)``.

Finalize writes the combined tokens into the caller's output buffer. When that
buffer is a graph input (a persistent output buffer, a slice of one, an ``out=``
argument), the post-grad graph Inductor hands to
``post_grad_custom_post_pass`` ends with::

    combine = torch.ops.deepep_ops.combine.default(x, topk_idx, ..., num_expanded_tokens)
    copy_ = torch.ops.aten.copy_.default(out, combine)

i.e. combine allocates a [T, H] result that is then copied. This pass rewrites
each such pair into the out-variant::

    combine_into = torch.ops.deepep_ops.combine_into.default(out, x, topk_idx, ...)

which combines straight into ``out`` (DeepEP backends that can write ``out``
skip the intermediate buffer; the others copy once inside the op). Code that
goes on using the result (``out.copy_(y); return out + r``) reaches post-grad
with other readers of ``combine``; they are pointed at ``out``, and
``combine_into`` then takes combine's place, which is done only when ``out``
is a graph input that nothing but the copy touches. When the
output buffer is allocated inside the graph (``torch.empty_like`` in vLLM's
modular kernel), Inductor has already folded the copy away before this pass
runs and there is nothing to rewrite. (The functional ``aten.copy.default``
form of the copy does not reach post-grad custom passes on torch 2.13: it is
turned into ``copy_`` on inputs or removed for fresh buffers.)

Enable it in vLLM::

    from vllm.config import CompilationConfig
    from deepep_ops.vllm.passes import CombineIntoPass
    CompilationConfig(inductor_compile_config={"post_grad_custom_post_pass": CombineIntoPass()})

or by name (``inductor_passes`` only takes strings in vLLM 0.32; the name
exists once the plugin has run, see :mod:`deepep_ops.vllm.plugin`)::

    CompilationConfig(inductor_passes={"post_grad_custom_post_pass": "deepep_ops.vllm_combine_into_pass"})

vLLM's ``PostGradPassManager`` then runs it after its built-in passes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

import deepep_ops  # noqa: F401  (registers the ops)
from deepep_ops.vllm._compat import VllmInductorPass

COMBINE = torch.ops.deepep_ops.combine.default
COMBINE_INTO = torch.ops.deepep_ops.combine_into.default
COPY_ = torch.ops.aten.copy_.default


def _val(node) -> Optional[torch.Tensor]:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _insertion_point(copy_node: fx.Node) -> Optional[fx.Node]:
    """Where ``combine_into`` goes for this ``copy_`` node, or None if it is not rewritable.

    The copy must be a plain same-shape bf16 copy (no broadcast, no cast) of a
    ``combine`` result. If nothing else reads that result, ``combine_into``
    takes the copy's place. If other nodes read it too (``out.copy_(y); return
    out + r`` reaches post-grad as ``add(combine, r)`` beside ``copy_(out,
    combine)``), they read ``out`` instead, so ``combine_into`` must take
    combine's place; that moves the write to ``out`` earlier, which is safe
    only when ``out`` is a graph input that nothing but this copy touches.
    """
    if copy_node.op != "call_function" or copy_node.target is not COPY_:
        return None
    dst, src = copy_node.args[0], copy_node.args[1]
    if not (isinstance(src, fx.Node) and src.op == "call_function" and src.target is COMBINE):
        return None
    if copy_node.kwargs.get("non_blocking", False):
        return None
    dst_val, src_val = _val(dst), _val(src)
    if dst_val is None or src_val is None:
        return None
    if not (dst_val.dtype == src_val.dtype == torch.bfloat16 and dst_val.shape == src_val.shape):
        return None
    if len(src.users) == 1:
        return copy_node
    if dst.op == "placeholder" and set(dst.users) == {copy_node}:
        return src
    return None


def rewrite_combine_copies(graph: fx.Graph) -> int:
    """Rewrite every ``copy_(out, combine(...))`` of ``graph`` in place; returns how many."""
    count = 0
    for copy_node in list(graph.nodes):
        where = _insertion_point(copy_node)
        if where is None:
            continue
        dst, combine_node = copy_node.args[0], copy_node.args[1]
        with graph.inserting_before(where):
            new = graph.call_function(COMBINE_INTO, (dst, *combine_node.args), dict(combine_node.kwargs))
        new.meta.update({k: v for k, v in copy_node.meta.items() if k in ("stack_trace", "nn_module_stack")})
        new.meta["val"] = None
        # copy_ returns its destination, and out now holds what combine returned:
        # every later reader of either reads ``out`` itself.
        copy_node.replace_all_uses_with(dst)
        graph.erase_node(copy_node)
        combine_node.replace_all_uses_with(dst)
        graph.erase_node(combine_node)
        count += 1
    if count:
        graph.lint()
    return count


class CombineIntoPass(VllmInductorPass):
    """vLLM post-grad pass around :func:`rewrite_combine_copies`.

    Args:
        config: the ``VllmConfig`` (as every ``VllmInductorPass`` takes); optional,
            since the rewrite reads nothing from it, so the pass can be built
            before a ``VllmConfig`` exists (e.g. inside ``CompilationConfig``).
    """

    def __init__(self, config=None) -> None:
        if config is not None:
            super().__init__(config)
        else:
            self.compilation_config = None
            self.pass_config = None
            self.model_dtype = None
            self.device = None
            self.pass_name = type(self).__name__
        #: copies rewritten in the last graph this pass ran on (for tests and logs)
        self.matched_count = 0

    @VllmInductorPass.time_and_log
    def __call__(self, graph: fx.Graph) -> None:
        self.matched_count = rewrite_combine_copies(graph)

    def uuid(self) -> str:
        # The rewrite lives in module functions: hash them with the class.
        return self.hash_source(self, rewrite_combine_copies, _insertion_point)


def combine_into_pass(graph: fx.Graph) -> None:
    """Plain-callable form (vLLM wraps it in ``CallableInductorPass``)."""
    rewrite_combine_copies(graph)
