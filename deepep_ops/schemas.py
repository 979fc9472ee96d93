"""The ``deepep_ops::`` op schemas, each written once.

A dispatch handle travels through graphs as the five tensors of
``HANDLE_TENSORS`` plus static ints; the real kernels rebuild DeepEP's
``EPHandle`` from them (see :mod:`deepep_ops.handle`).
"""

from deepep_ops.buffer import EP_BUFFER_TYPE

NAMESPACE = "deepep_ops"

#: Handle tensors in the order every schema lists them (all int32).
HANDLE_TENSORS = (
    "psum_num_recv_tokens_per_scaleup_rank",
    "psum_num_recv_tokens_per_expert",
    "num_unaligned_recv_tokens_per_expert",
    "recv_src_metadata",
    "dst_buffer_slot_idx",
)

_HANDLE_RETURNS = ", ".join(f"Tensor {name}" for name in HANDLE_TENSORS)
_HANDLE_ARGS = ", ".join(f"Tensor {name}" for name in HANDLE_TENSORS)

_DISPATCH_ARGS = (
    "Tensor x, Tensor? x_scales, Tensor topk_idx, Tensor topk_weights, "
    f"{EP_BUFFER_TYPE} buffer, int num_experts, SymInt num_max_tokens_per_rank, "
    "int expert_alignment=1"
)

#: Decode mode: no expand, no CPU sync; every size is a function of R·M.
DISPATCH = (
    f"dispatch({_DISPATCH_ARGS}) -> (Tensor recv_x, Tensor recv_x_scales, "
    f"Tensor recv_topk_idx, Tensor recv_topk_weights, {_HANDLE_RETURNS})"
)

#: Prefill mode: expand + CPU sync; exact, data-dependent sizes.
#:
#: The two sizes come first, as SymInts: Dynamo binds each unbacked symbol to
#: the first output that carries it, so N and X are bound to ``getitem`` nodes
#: of the op itself rather than to ``aten.sym_size`` reads of its tensors.
#: vLLM's ``split_graph`` keeps getitems in the splitting op's piece; size reads
#: would land in the next piece and ``split_module`` would find a cycle (the
#: op's piece needs the symbol its successor binds).
DISPATCH_EXACT = (
    f"dispatch_exact({_DISPATCH_ARGS}) -> (SymInt num_recv_tokens, SymInt num_expanded_tokens, "
    f"Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_weights, "
    f"Tensor num_recv_tokens_per_expert, {_HANDLE_RETURNS})"
)

_COMBINE_ARGS = (
    f"Tensor x, Tensor topk_idx, {_HANDLE_ARGS}, {EP_BUFFER_TYPE} buffer, int num_experts, "
    "SymInt num_max_tokens_per_rank, int expert_alignment, bool do_expand, "
    "SymInt num_expanded_tokens"
)

#: Expert outputs + handle -> [T, H] bf16.
COMBINE = f"combine({_COMBINE_ARGS}) -> Tensor"


#: pow2_bucket(max DP tokens, capacity) computed on the host at run time from
#: tokens.shape[0] (never its data) and
#: returned as an unbacked SymInt (see deepep_ops.bucket.token_bucket).
TOKEN_BUCKET = "token_bucket(Tensor tokens, int capacity) -> SymInt"

#: ``combine`` writing into the caller's ``out`` [T, H] bf16: what the vLLM
#: post-grad pass turns ``copy_(out, combine(...))`` into.
COMBINE_INTO = f"combine_into(Tensor(a!) out, {_COMBINE_ARGS}) -> ()"
