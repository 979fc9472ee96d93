"""Fake kernels of the ops the backward passes call: ``deepep_ops::cached_dispatch``
and ``deepep_ops::combine_with_weights``. Every size follows from the handle
(R·M or its X rows, its T tokens): nothing new is unbacked."""

from __future__ import annotations

import torch

from deepep_ops.handle import DispatchHandle, recv_rows


def cached_dispatch_fake(x, x_scales, buffer, *handle):
    rows = recv_rows(DispatchHandle(*handle))
    scales = None if x_scales is None else x_scales.new_empty((rows, x_scales.shape[1]))
    return x.new_empty((rows, x.shape[1])), scales


def combine_with_weights_fake(x, topk_weights, buffer, topk_idx, *handle_rest):
    T, K = topk_idx.shape
    return (
        x.new_empty((T, x.shape[1]), dtype=torch.bfloat16),
        topk_weights.new_empty((T, K), dtype=torch.float32),
    )
