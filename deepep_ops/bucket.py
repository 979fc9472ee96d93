"""Power-of-two bucketing of DeepEP's ``num_max_tokens_per_rank``.

Every distinct M is a fresh JIT compile of four DeepEP kernels (seconds each
time, docs/deepep_contract.md §5, §8), and every decode consumer processes all
R·M received rows, so
M must be small *and* drawn from a bounded set: the powers of two up to the
buffer capacity, ⌈log2(capacity)⌉ + 1 values at most.
"""

from __future__ import annotations


def pow2_bucket(n: int, capacity: int) -> int:
    """Smallest power of two ≥ ``n`` (0 and 1 map to 1), capped at ``capacity``.

    Args:
        n: token count, the DP-global maximum when there is a DP group.
        capacity: the buffer's ``num_max_tokens_per_rank``.

    Raises:
        TypeError: ``n`` or ``capacity`` is not a Python int.
        ValueError: ``capacity < 1``, ``n < 0`` or ``n > capacity``.
    """
    for name, value in (("n", n), ("capacity", capacity)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(
                f"pow2_bucket: {name} must be a Python int, got {type(value).__name__} "
                f"({value!r}); inside a compiled region use deepep_ops.token_bucket"
            )
    if capacity < 1:
        raise ValueError(f"pow2_bucket: capacity must be >= 1, got capacity={capacity}")
    if n < 0:
        raise ValueError(f"pow2_bucket: n must be >= 0, got n={n}")
    if n > capacity:
        raise ValueError(
            f"pow2_bucket: n={n} tokens exceed the buffer capacity={capacity} "
            "(num_max_tokens_per_rank the buffer was built with)"
        )
    return min(1 << max(n - 1, 0).bit_length(), capacity)


# ---------------------------------------------------------------------------
# The bucket inside a compiled graph.
#
# vLLM compiles once with a symbolic token count and drops Dynamo's guards, so
# M must be derived from that SymInt in the graph. On torch 2.13 every in-graph
# formula failed (benchmarks/README.md): bit_length recompiles on every n, a
# Python loop gives one graph per bucket, log2/ceil recompiles on every n once
# the FX/AOT cache is warm, bit smearing takes minutes to compile, sym_ite
# never finishes. What works is to compute the bucket on the host at run time: the
# ``deepep_ops::token_bucket`` op returns it as an unbacked SymInt. No guard is ever
# installed on it (so no recompiles, cold or warm cache), compile cost is one
# tiny node, and the DP-global maximum can be read on the host without a device
# sync (the buffer's token source). Under CUDA graphs, Inductor runs this host-only node outside the graph
# partition (it binds an unbacked symbol); it launches no kernel. The graph
# gains two host-side bound checks on the unbacked M (from the fake's min/max);
# compile time and step time stay within a few percent of a bucket passed in
# as an int (benchmarks/bench_bucket_compile.py).
# ---------------------------------------------------------------------------

import torch  # noqa: E402


def token_bucket(tokens: "torch.Tensor", buffer) -> "int | torch.SymInt":
    """``buffer.bucket(tokens.shape[0])``, usable in a compiled graph.

    Args:
        tokens: [T, ...]; only ``tokens.shape[0]`` is read (it also tells
            Inductor the device).
        buffer: the :class:`deepep_ops.EPOpsBuffer`; its token source gives the
            count to bucket (the DP-global maximum with a DP group).

    Eager: returns an int. Compiled: an unbacked SymInt in [1, capacity].
    """
    return torch.ops.deepep_ops.token_bucket(tokens, buffer)
