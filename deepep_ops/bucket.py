"""Power-of-two bucketing of DeepEP's ``num_max_tokens_per_rank``.

Every distinct M is a fresh JIT compile of four DeepEP kernels (3.6–7.2 s on
H200, spec §8), and every decode consumer processes all R·M received rows, so
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
