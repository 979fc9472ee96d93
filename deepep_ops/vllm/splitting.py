"""Keeping the non-capturable prefill dispatch out of vLLM's CUDA graphs.

``deepep_ops::dispatch_exact`` (prefill: expand + CPU sync, data-dependent sizes)
cannot be captured; the decode ``deepep_ops::dispatch`` can and must stay inside the
captured pieces. vLLM splits its graph at ``CompilationConfig.splitting_ops``
(FX-level ``split_graph``), or, with ``use_inductor_graph_partition=True``, hands
the same list to Inductor's ``custom_should_partition_ops``: either way the ops
belong in ``splitting_ops``.

The FX split leaves ``dispatch_exact`` alone in its piece with the items of its
outputs (its unbacked sizes are outputs too, see ``deepep_ops.schemas``). The
pieces after it still have data-dependent shapes, and vLLM's CUDA-graph wrapper
replays by batch size only: a prefill-mode layer needs vLLM's CUDA graphs off,
which is how vLLM runs it (prefill mode only with ``enforce_eager``).
"""

from __future__ import annotations

from typing import Any, List, Optional

#: Ops that must run outside CUDA graphs (vLLM splitting-op names).
NON_CAPTURABLE_OPS = (
    "deepep_ops::dispatch_exact",
    # The adapter's prepare_async: the same dispatch, started and waited for.
    "deepep_ops::dispatch_exact_start",
    "deepep_ops::dispatch_exact_wait",
)


def splitting_ops(compilation_config: Optional[Any] = None) -> List[str]:
    """The deepep ops vLLM must split at, added to ``compilation_config`` when given.

    Args:
        compilation_config: a ``vllm.config.CompilationConfig`` (or None to just
            get the names). Its ``splitting_ops`` gets ``deepep_ops::dispatch_exact``
            and its async pair appended (idempotent). If it is still ``None`` (vLLM's "use the
            defaults", resolved in ``VllmConfig`` post-init), it is first set to
            the defaults vLLM would pick — its attention ops, plus the KV-cache
            update ops when Inductor graph partition is off — so that adding our
            op does not drop them.

    Returns:
        The op names (no config) or the config's resulting ``splitting_ops``.
    """
    if compilation_config is None:
        return list(NON_CAPTURABLE_OPS)
    from deepep_ops.vllm._compat import attention_splitting_ops

    ops = compilation_config.splitting_ops
    ops = attention_splitting_ops(compilation_config) if ops is None else list(ops)
    for op in NON_CAPTURABLE_OPS:
        if op not in ops:
            ops.append(op)
    compilation_config.splitting_ops = ops
    return ops
