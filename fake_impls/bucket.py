"""Fake kernel of ``deepep_ops::token_bucket``: an unbacked SymInt in [1, capacity]."""

from __future__ import annotations

import torch

from deepep_ops.buffer import unwrap_ep_buffer
from deepep_ops.validation import check_token_bucket
from fake_impls._eager_meta import reject_eager_meta


def token_bucket_fake(tokens, buffer):
    check_token_bucket(tokens)
    reject_eager_meta("token_bucket", tokens)
    # The value depends on host state (the buffer's token source, e.g. the
    # DP-global count), so the graph must not derive it from tokens.shape[0]:
    # it is a fresh unbacked symbol.
    return torch.library.get_ctx().new_dynamic_size(min=1, max=unwrap_ep_buffer(buffer).capacity)
