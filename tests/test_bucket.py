"""pow2_bucket: the power-of-two bucketing of num_max_tokens_per_rank (M)."""

import re

import pytest

from deepep_ops import pow2_bucket


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@pytest.mark.parametrize(
    "n,expected",
    [(0, 1), (1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (7, 8), (8, 8), (9, 16), (100, 128), (129, 256)],
)
def test_small_values(n, expected):
    assert pow2_bucket(n, 8192) == expected


@pytest.mark.parametrize("p", range(14))
def test_exact_powers_map_to_themselves(p):
    assert pow2_bucket(1 << p, 8192) == 1 << p


@pytest.mark.parametrize(
    "n,capacity,expected",
    [(65, 100, 100), (100, 100, 100), (64, 100, 64), (33, 48, 48), (3, 3, 3), (1, 1, 1), (0, 1, 1), (5, 6, 6)],
)
def test_capped_at_capacity(n, capacity, expected):
    assert pow2_bucket(n, capacity) == expected


@pytest.mark.parametrize("n,capacity", [(101, 100), (2, 1), (8193, 8192)])
def test_n_above_capacity_raises_with_both_values(n, capacity):
    with pytest.raises(ValueError) as info:
        pow2_bucket(n, capacity)
    msg = str(info.value)
    assert re.search(rf"\bn\b\D*{n}\b", msg), msg
    assert re.search(rf"capacity\D*{capacity}\b", msg), msg


@pytest.mark.parametrize(
    "n,capacity",
    [(3.0, 16), ("3", 16), (None, 16), (True, 16), (3, 16.0), (3, None), (3, False)],
)
def test_non_int_raises_type_error(n, capacity):
    with pytest.raises(TypeError, match=r"\b(n|capacity)\b"):
        pow2_bucket(n, capacity)


def test_non_int_message_names_the_argument():
    with pytest.raises(TypeError, match=r"\bn\b"):
        pow2_bucket(2.5, 16)
    with pytest.raises(TypeError, match=r"capacity"):
        pow2_bucket(2, 16.0)


@pytest.mark.parametrize("n,capacity", [(-1, 16), (0, 0), (1, -4)])
def test_negative_n_or_nonpositive_capacity_raise(n, capacity):
    with pytest.raises(ValueError):
        pow2_bucket(n, capacity)


@pytest.mark.parametrize("capacity", [1, 2, 3, 7, 8, 100, 1000, 1024, 4097])
def test_property_over_all_n(capacity):
    prev = 0
    for n in range(0, capacity + 1):
        b = pow2_bucket(n, capacity)
        assert isinstance(b, int) and not isinstance(b, bool)
        assert b >= n and b >= 1 and b <= capacity, (n, capacity, b)
        assert _is_pow2(b) or b == capacity, (n, capacity, b)
        if n >= 1 and b != capacity:
            assert b < 2 * n, (n, capacity, b)
        if b != capacity:  # the smallest power of two >= n, so halving it is < n
            assert n <= 1 or b // 2 < n, (n, capacity, b)
        assert b >= prev, "monotone in n"
        prev = b


def test_distinct_values_bounded_for_capacity_8192():
    values = {pow2_bucket(n, 8192) for n in range(1, 8193)}
    assert len(values) == 14
    assert values == {1 << p for p in range(14)}


def test_distinct_values_non_pow2_capacity():
    # ceil(log2(capacity)) + 1 values at most: 1, 2, 4, ..., 64, and the cap 100
    values = {pow2_bucket(n, 100) for n in range(0, 101)}
    assert values == {1, 2, 4, 8, 16, 32, 64, 100}
