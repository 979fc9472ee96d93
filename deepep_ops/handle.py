"""What ``dispatch`` returns and ``combine`` consumes, as pytree-friendly tuples.

The handle is plain tensors plus ints (no Python object per call, nothing
mutable), so it flows through Dynamo and AOT graphs like any other value.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from deepep_ops.layout import IntLike



class DispatchHandle(NamedTuple):
    """DeepEP's ``EPHandle`` as graph values (spec §3, direct mode).

    Tensors are int32 on the tokens' device except ``topk_idx``:

    - ``topk_idx`` [T, K] topk_idx_t: the dispatched routing (the caller's tensor).
    - ``psum_num_recv_tokens_per_scaleup_rank`` [R]: inclusive prefix sum of
      received tokens per source rank; ``[-1]`` is the real N.
    - ``psum_num_recv_tokens_per_expert`` [EL].
    - ``num_unaligned_recv_tokens_per_expert`` [EL].
    - ``recv_src_metadata`` [N, K+2] (N = R·M in decode mode).
    - ``dst_buffer_slot_idx`` [T, K].
    """

    topk_idx: torch.Tensor
    psum_num_recv_tokens_per_scaleup_rank: torch.Tensor
    psum_num_recv_tokens_per_expert: torch.Tensor
    num_unaligned_recv_tokens_per_expert: torch.Tensor
    recv_src_metadata: torch.Tensor
    dst_buffer_slot_idx: torch.Tensor
    num_experts: int
    num_max_tokens_per_rank: IntLike
    expert_alignment: int
    do_expand: bool
    num_expanded_tokens: IntLike


class DispatchResult(NamedTuple):
    """Decode-mode dispatch output. Rows ≥ ``handle.psum_num_recv_tokens_per_scaleup_rank[-1]``
    are padding with unspecified content.

    - ``recv_x`` [R·M, H], the dtype of x.
    - ``recv_x_scales`` [R·M, P] (None without scales).
    - ``recv_topk_idx`` [R·M, K]: local expert ids, −1 where the expert is elsewhere.
    - ``recv_topk_weights`` [R·M, K] float32 (lanes of other ranks unspecified).
    """

    recv_x: torch.Tensor
    recv_x_scales: Optional[torch.Tensor]
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    handle: DispatchHandle


class ExactDispatchResult(NamedTuple):
    """Prefill-mode (expanded) dispatch output; X is data-dependent.

    - ``recv_x`` [X, H]: rows grouped by local expert, each group padded to
      ``expert_alignment`` (padding rows are zero).
    - ``recv_x_scales`` [X, P] (None without scales).
    - ``recv_topk_weights`` [X] float32: the weight of the (token, expert) pair of each row.
    - ``num_recv_tokens_per_expert`` [EL] int32: aligned rows per local expert (sum X).
    """

    recv_x: torch.Tensor
    recv_x_scales: Optional[torch.Tensor]
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert: torch.Tensor
    handle: DispatchHandle
