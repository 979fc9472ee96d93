"""Fake kernel of ``deepep_ops::weight_and_reduce``: [rows, H] in expert_output's dtype."""

from __future__ import annotations

from deepep_ops.validation import check_weight_and_reduce


def weight_and_reduce_fake(expert_output, topk_weights, topk_ids, apply_weights):
    check_weight_and_reduce(expert_output, topk_weights, topk_ids)
    return expert_output.new_empty((expert_output.shape[0], expert_output.shape[2]))
