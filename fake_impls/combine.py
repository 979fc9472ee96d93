"""Fake kernels of ``deepep_ops::combine`` ([T, H] bf16, T = the dispatched tokens) and
``deepep_ops::combine_into`` (writes ``out`` in place, returns nothing)."""

from __future__ import annotations

import torch

from deepep_ops.agreement import agree_combine
from deepep_ops.buffer import unwrap_ep_buffer
from deepep_ops.handle import DispatchHandle
from fake_impls._eager_meta import reject_eager_meta


def reject_meta_combine(op: str, x, buffer, handle: DispatchHandle, *tensors) -> None:
    # Meta tensors are host-side: the CPU default of check mode applies.
    reject_eager_meta(op, x, handle.topk_idx, *tensors, agree=lambda error: agree_combine(
        f"deepep_ops.{op}", unwrap_ep_buffer(buffer), x, handle, error, device=torch.device("cpu")))


def combine_fake(x, buffer, *handle):
    handle = DispatchHandle(*handle)
    reject_meta_combine("combine", x, buffer, handle)
    return x.new_empty((handle.topk_idx.shape[0], x.shape[1]), dtype=torch.bfloat16)


def combine_into_fake(out, x, buffer, *handle):
    reject_meta_combine("combine_into", x, buffer, DispatchHandle(*handle), out)
    return None
