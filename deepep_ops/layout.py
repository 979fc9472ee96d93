"""Shape formulas of DeepEP v2's dispatch (docs/deepep_contract.md §2, §3; the
hybrid-mode handle tensors §9), the glossary of the shape letters every docstring uses, and the one word
for the mode.

One place for every size the fake kernels, the reference buffer and the op
layer agree on. Each function accepts Python ints or SymInts.

Glossary:

====  ==================================================================
T     tokens on this rank (``x.shape[0]``)
H     hidden size
K     top-k: expert slots per token (``topk_idx.shape[1]``)
E     experts, global
EL    experts local to one rank: E / R
R     ranks in the EP group
M     ``num_max_tokens_per_rank``: receive slots per source rank, the same
      on every rank (the bucket; at most the buffer capacity)
A     ``expert_alignment``: prefill rows per local expert round up to it
N     tokens this rank received (R·M in decode mode, data-dependent in prefill)
X     expanded rows in prefill: one per (token, local expert), padded to A
P     scale columns of fp8 tokens (H / 128 for block fp8)
S     scale-out ranks (nodes) of the EP domain: 1 in direct mode (one
      node, or DeepEP's ``allow_hybrid_mode=False``), > 1 in hybrid mode
U     scale-up ranks per node (the NVLink domain): R / S (R in direct mode);
      rank r is scale-up peer r % U of node r // U
C     channels of a hybrid dispatch (DeepEP's ``num_channels``: num_sms
      times channels per SM), static per buffer, H, dtype, P, K and num_sms
mtpc  tokens per channel, ceil(M / C)
====  ==================================================================

The mode is one bool everywhere in the package, ``decode``: True for the
decode layout (no expand, no CPU sync: R·M rows, CUDA-graph capturable),
False for the prefill layout (expand + CPU sync: X exact rows). DeepEP calls it
``do_expand`` (the negation; only :mod:`deepep_ops.backends.deep_ep` says so)
and vLLM ``use_cudagraph`` (only :mod:`deepep_ops.vllm` says so);
:func:`layout_name` is its name in messages and tables.
"""

from __future__ import annotations

from typing import Union

import torch

IntLike = Union[int, torch.SymInt]

#: DeepEP's limits (contract §1): E, EL and R from `layout.cuh`, checked on DeepEP's
#: host; K a static_assert in its kernels (a JIT failure).
MAX_TOPK = 32
MAX_EXPERTS = 2048
MAX_LOCAL_EXPERTS = 256
MAX_RANKS = 1024
#: `recv_src_metadata` holds src_rank*M + t in int32.
INT32_MAX = 2**31 - 1
#: The combine kernels need H % 256 == 0 (static_assert in combine.cuh).
COMBINE_HIDDEN_ALIGNMENT = 256
#: Token dtypes dispatch moves: bf16, or fp8 data with separate scales.
DISPATCH_DTYPES = (torch.bfloat16, torch.float8_e4m3fn)
#: Token rows are copied in 32-byte TMA units (kNumTMAAlignBytes, layout.cuh:198;
#: stricter than buffer.hpp:754's 16): bf16 needs H % 16, fp8 H % 32.
DISPATCH_ROW_BYTES_ALIGNMENT = 32

#: Hybrid-mode limits of DeepEP's kernels (contract §9; research: hybrid_dispatch.cuh
#: static asserts, so past them the JIT compile fails): S <= 32, U <= 64, U + EL <= 128.
HYBRID_MAX_SCALEOUT_RANKS = 32
HYBRID_MAX_SCALEUP_RANKS = 64
HYBRID_MAX_SCALEUP_PLUS_LOCAL_EXPERTS = 128
#: How to leave hybrid mode, for every error that hybrid mode causes.
TURN_HYBRID_MODE_OFF = (
    "turn hybrid mode off to run the direct kernels across nodes: DeepEP ElasticBuffer(allow_hybrid_mode=False); "
    "vLLM VLLM_DEEPEP_V2_ALLOW_HYBRID_MODE=0; SGLang --deepep-v2-mode direct"
)


def layout_name(decode: bool) -> str:
    """``"decode"`` or ``"prefill"``: the mode's name in messages, tables and warm-up."""
    return "decode" if decode else "prefill"


def align(value: IntLike, alignment: int) -> IntLike:
    """Round ``value`` up to a multiple of ``alignment``."""
    return (value + alignment - 1) // alignment * alignment


def num_local_experts(num_experts: int, num_ranks: int) -> int:
    """EL = E / R."""
    return num_experts // num_ranks


def decode_num_recv_tokens(num_ranks: int, num_max_tokens_per_rank: IntLike) -> IntLike:
    """Rows of every non-expand receive tensor without CPU sync: R·M."""
    return num_ranks * num_max_tokens_per_rank


def decode_num_expanded_tokens(
    num_ranks: int,
    num_max_tokens_per_rank: IntLike,
    num_topk: int,
    num_experts: int,
    expert_alignment: int,
) -> IntLike:
    """Worst-case expanded rows without CPU sync: align(R·M·min(K, EL) + (A−1)·EL, A).

    What a decode handle carries as X (DeepEP's ``num_expanded_tokens``)."""
    local = num_local_experts(num_experts, num_ranks)
    worst = num_ranks * num_max_tokens_per_rank * min(num_topk, local)
    return align(worst + (expert_alignment - 1) * local, expert_alignment)


def recv_src_metadata_cols(num_topk: int) -> int:
    """``recv_src_metadata`` is [N, K+2]: global token id, rank·K + kmax, K expand slots."""
    return num_topk + 2


def tokens_per_channel(num_max_tokens_per_rank: IntLike, num_channels: int) -> IntLike:
    """mtpc = ceil(M / C): hybrid mode's tokens per channel (channel c sends tokens c, c+C, ...)."""
    return (num_max_tokens_per_rank + num_channels - 1) // num_channels


def forward_rows(num_scaleout_ranks: int, num_max_tokens_per_rank: IntLike, num_channels: int) -> IntLike:
    """S·mtpc + 1: rows per channel of the hybrid ``token_metadata_at_forward`` and
    ``channel_linked_list`` (at most S·mtpc forwarded tokens, plus a terminator row)."""
    return num_scaleout_ranks * tokens_per_channel(num_max_tokens_per_rank, num_channels) + 1


def token_metadata_cols(num_topk: int) -> int:
    """``token_metadata_at_forward`` is [C, S·mtpc+1, 2+2K]: source token id, chunk
    end flag, K scale-up destinations, K scale-up slots."""
    return 2 + 2 * num_topk
