"""Fake kernel of ``deepep_ops::token_bucket``: an unbacked SymInt in [1, capacity]."""

from __future__ import annotations

import torch


@torch.library.register_fake("deepep_ops::token_bucket")
def token_bucket_fake(tokens, capacity):
    # The value depends on host state (the DP-global token count), so the graph
    # must not derive it from tokens.shape[0]: it is a fresh unbacked symbol.
    return torch.library.get_ctx().new_dynamic_size(min=1, max=capacity)
