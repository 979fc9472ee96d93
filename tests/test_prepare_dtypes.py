"""``DeepEPPrepareFinalize.prepare`` checks its input dtypes up front.

Without the check a float32 ``a1`` ran all the way through dispatch and the
experts and only failed in finalize ("combine needs bfloat16"), which under
``torch.compile`` is what Dynamo's graph-break text reported. The check names
the argument and its dtype, eagerly and in the compiled error.
"""

from __future__ import annotations

import pytest
import torch

import deepep_ops as D
from deepep_ops import DeepEPPrepareFinalize

H, K, E, CAP, T = 256, 2, 8, 16, 3


def _step():
    pf = DeepEPPrepareFinalize(
        D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K)),
        E, K, decode=True,
    )

    def step(x, w, ids):
        p = pf.prepare(x, w, ids, num_max_tokens_per_rank=4)
        y = p.expert_x.unsqueeze(1).expand(-1, K, -1)
        out = torch.empty_like(x)
        pf.finalize(out, y, p.topk_weights, p.topk_ids, p.handle)
        return out

    return step


def _good():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(T, H, generator=g).bfloat16(),
        torch.rand(T, K, generator=g),
        torch.tensor([[0, 1], [2, 3], [4, -1]], dtype=torch.int64),
    )


BAD = [
    pytest.param(0, torch.float32, "a1 must be torch.bfloat16", id="a1_float32"),
    pytest.param(0, torch.float16, "a1 must be torch.bfloat16", id="a1_float16"),
    pytest.param(1, torch.bfloat16, "topk_weights must be torch.float32", id="weights_bf16"),
    pytest.param(2, torch.int32, "topk_ids must be torch.int64", id="ids_int32"),
]


def _with(args, pos, dtype):
    args = list(args)
    args[pos] = args[pos].to(dtype)
    return args


@pytest.mark.parametrize("pos,dtype,msg", BAD)
def test_eager_type_error_names_argument_and_dtype(pos, dtype, msg):
    with pytest.raises(TypeError, match=f"prepare: {msg} .*got {dtype}$"):
        _step()(*_with(_good(), pos, dtype))


def test_good_dtypes_pass():
    out = _step()(*_good())
    assert out.dtype == torch.bfloat16 and out.shape == (T, H)


@pytest.mark.parametrize("pos,dtype,msg", BAD[:1] + BAD[2:])
def test_compiled_fullgraph_error_names_the_real_cause(pos, dtype, msg):
    torch._dynamo.reset()
    try:
        compiled = torch.compile(_step(), fullgraph=True, dynamic=True, backend="aot_eager")
        with pytest.raises(Exception) as info:
            compiled(*_with(_good(), pos, dtype))
    finally:
        torch._dynamo.reset()
    text = str(info.value)
    assert f"prepare: {msg}" in text and f"got {dtype}" in text, text
    assert "bfloat16 expert outputs" not in text, text  # not finalize's downstream error
