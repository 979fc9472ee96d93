"""Fake kernels of ``deepep_ops::combine`` ([T, H] bf16, T = the dispatched tokens) and
``deepep_ops::combine_into`` (writes ``out`` in place, returns nothing)."""

from __future__ import annotations

import torch

from deepep_ops.agreement import COMBINE_FIELDS, combine_signature
from deepep_ops.handle import DispatchHandle
from fake_impls._eager_meta import reject_eager_meta


def combine_fake(x, buffer, topk_idx, *handle_rest):
    reject_eager_meta("combine", x, topk_idx, buffer=buffer, agree=lambda: (
        "combine", COMBINE_FIELDS, combine_signature(x, DispatchHandle(topk_idx, *handle_rest))))
    return x.new_empty((topk_idx.shape[0], x.shape[1]), dtype=torch.bfloat16)


def combine_into_fake(out, x, buffer, *handle):
    reject_eager_meta("combine_into", out, x, buffer=buffer, agree=lambda: (
        "combine", COMBINE_FIELDS, combine_signature(x, DispatchHandle(*handle))))
    return None
