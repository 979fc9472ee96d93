"""Test tiers: the default run samples, the exhaustive tier runs everything.

``python -m pytest -q tests`` is the **default tier**: every kind of guarantee
(every mode, dtype, backend, fault scenario, one vLLM engine run per layout) at
sampled points. ``python -m pytest -q tests --exhaustive`` (or
``DEEPEP_OPS_EXHAUSTIVE=1``) is the **exhaustive tier**: every T of every sweep
and every engine run. CI runs both (``.ci/run``, leg a).

How a test follows the tiers (see DEVELOPERS.md, "Test tiers"):

- A sweep over token counts takes its T from :func:`sample_tokens` (or
  :func:`sample` for any other integer range): in the default tier the
  power-of-two boundaries 2^k − 1, 2^k, 2^k + 1, both ends, and a seeded random
  sample; in the exhaustive tier every value. The choice is read from the
  environment, so it is the same in spawned ranks and subprocesses.
- A test (or a parameter) that only the exhaustive tier runs is marked
  ``@pytest.mark.slow`` (or ``pytest.param(..., marks=pytest.mark.slow)``): the
  default tier reports it as skipped, naming ``--exhaustive``.

The random sample's seed is :data:`DEFAULT_SEED` unless ``DEEPEP_OPS_SAMPLE_SEED``
says otherwise (pytest prints the tier and seed in its header), so a run is
reproducible and another seed explores other points.
"""

from __future__ import annotations

import os
import random
from typing import Iterable, Tuple

#: Set to "1" by ``--exhaustive`` (tests/conftest.py) before any test module is
#: imported; spawned ranks and subprocesses inherit it.
EXHAUSTIVE_ENV = "DEEPEP_OPS_EXHAUSTIVE"
SEED_ENV = "DEEPEP_OPS_SAMPLE_SEED"
DEFAULT_SEED = 0
#: Random points added to the boundary set by default.
DEFAULT_RANDOM = 8


def exhaustive() -> bool:
    """True in the exhaustive tier (``--exhaustive`` or ``DEEPEP_OPS_EXHAUSTIVE=1``)."""
    flag = os.environ.get(EXHAUSTIVE_ENV, "")
    if flag not in ("", "0", "1"):
        raise ValueError(f"{EXHAUSTIVE_ENV} must be 0 or 1, got {flag!r}")
    return flag == "1"


def sample_seed() -> int:
    raw = os.environ.get(SEED_ENV, "")
    try:
        return int(raw) if raw else DEFAULT_SEED
    except ValueError:
        raise ValueError(f"{SEED_ENV} must be an integer, got {raw!r}") from None


def pow2_boundaries(lo: int, hi: int) -> Tuple[int, ...]:
    """Sorted {2^k − 1, 2^k, 2^k + 1} ∩ [lo, hi], plus lo and hi."""
    out = {lo, hi}
    k = 0
    while (1 << k) - 1 <= hi:
        out.update(v for v in ((1 << k) - 1, 1 << k, (1 << k) + 1) if lo <= v <= hi)
        k += 1
    return tuple(sorted(out))


def sample(lo: int, hi: int, *, n_random: int = DEFAULT_RANDOM, extra: Iterable[int] = (), salt: str = "") -> Tuple[int, ...]:
    """Integers of ``[lo, hi]`` for one sweep, sorted.

    Exhaustive tier: every value. Default tier: :func:`pow2_boundaries`, the
    values of ``extra`` that lie in the range, and ``n_random`` distinct values
    drawn uniformly (seed :func:`sample_seed` mixed with ``salt``, so two sweeps
    with different salts sample different points).
    """
    if lo > hi:
        raise ValueError(f"sample: lo must be <= hi, got lo={lo}, hi={hi}")
    if exhaustive():
        return tuple(range(lo, hi + 1))
    out = set(pow2_boundaries(lo, hi)) | {v for v in extra if lo <= v <= hi}
    rest = hi - lo + 1 - len(out)
    if rest > 0 and n_random > 0:
        rng = random.Random(f"{sample_seed()}:{salt}:{lo}:{hi}")
        pool = [v for v in range(lo, hi + 1) if v not in out]
        out.update(rng.sample(pool, min(n_random, len(pool))))
    return tuple(sorted(out))


def sample_tokens(cap: int, *, lo: int = 1, n_random: int = DEFAULT_RANDOM, extra: Iterable[int] = (),
                  salt: str = "") -> Tuple[int, ...]:
    """Token counts T for a sweep up to the buffer capacity ``cap``: :func:`sample` of ``[lo, cap]``."""
    return sample(lo, cap, n_random=n_random, extra=extra, salt=salt)


def describe() -> str:
    """One line for pytest's header."""
    if exhaustive():
        return "tier: exhaustive (every T of every sweep, slow tests included)"
    return (f"tier: default (sampled T, seed {sample_seed()}; slow tests skipped; "
            f"--exhaustive runs every T and every slow test)")
