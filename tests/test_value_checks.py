"""The host checks of ``topk_idx`` values on CUDA: one Triton kernel's verdict
(``deepep_ops.triton_validation``) against a plain-Python reference, and the
errors an eager prefill dispatch raises through it. CUDA only (skips elsewhere);
the torch form that CPU tensors take is covered by test_bad_input.py."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

E = 16


def _python_ok(rows: list, num_experts: int) -> bool:
    for row in rows:
        if any(not (v == -1 or 0 <= v < num_experts) for v in row):
            return False
        experts = [v for v in row if v >= 0]
        if len(experts) != len(set(experts)):
            return False
    return True


def _case(rng: random.Random, T: int, K: int, kind: str) -> list:
    """[T, K] ids: valid rows (distinct experts, some -1, repeated -1 allowed) with,
    for ``kind`` != "valid", one bad entry at a random place."""
    rows = []
    for _ in range(T):
        row = rng.sample(range(E), min(K, E)) + [-1] * max(0, K - E)
        rows.append([-1 if rng.random() < 0.3 else v for v in row])
    if kind != "valid" and T:
        t, k = rng.randrange(T), rng.randrange(K)
        if kind == "below":
            rows[t][k] = -2
        elif kind == "above":
            rows[t][k] = E + rng.randrange(3)
        elif kind == "duplicate" and K > 1:
            other = rng.choice([j for j in range(K) if j != k])
            rows[t][k] = rows[t][other] = rng.randrange(E)
    return rows


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("K", [1, 2, 8, 9])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 300])
def test_kernel_verdict_matches_python(T, K, dtype):
    from deepep_ops.triton_validation import topk_idx_values_ok

    rng = random.Random(1000 * T + K)
    for kind in ("valid", "below", "above", "duplicate"):
        for _ in range(3):
            rows = _case(rng, T, K, kind)
            ids = torch.tensor(rows, dtype=dtype, device="cuda")
            assert topk_idx_values_ok(ids, E) == _python_ok(rows, E), (kind, rows)
            # The same values with a row stride of 2K (a column slice of a wider tensor).
            wide = torch.full((T, 2 * K), -7, dtype=dtype, device="cuda")
            wide[:, :K] = ids
            assert topk_idx_values_ok(wide[:, :K], E) == _python_ok(rows, E), (kind, "strided")


def test_prefill_dispatch_names_the_bad_entry_on_cuda():
    import deepep_ops as D

    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=8, hidden=256, num_topk=2))
    x = torch.randn(4, 256, device="cuda").bfloat16()
    w = torch.rand(4, 2, device="cuda")
    ids = torch.tensor([[0, 1], [2, 3], [4, -1], [-1, -1]], device="cuda")
    D.dispatch_exact(x, ids, w, buf, num_experts=E, num_max_tokens_per_rank=8)  # valid: passes
    bad = ids.clone()
    bad[1, 0] = E + 3
    with pytest.raises(ValueError, match=r"topk_idx\[1, 0\] must be -1 or in \[0, num_experts=16\), got 19"):
        D.dispatch_exact(x, bad, w, buf, num_experts=E, num_max_tokens_per_rank=8)
    dup = ids.clone()
    dup[2, 1] = 4
    with pytest.raises(ValueError, match=r"topk_idx\[2\] must be free of repeated expert ids, got \[4, 4\]"):
        D.dispatch_exact(x, dup, w, buf, num_experts=E, num_max_tokens_per_rank=8)
