"""The deepep ops under ``torch.compile`` without ``fullgraph``: graph breaks
must fall back to eager cleanly, never fail.

A branch on a data-dependent size (``if rows == 0``, as vLLM's modular kernel
has) makes Dynamo graph-break at the op that produced the size and run the op
eagerly while its frame hook is still live; the op's kernel frame must then not
be traced (it unwraps the opaque ``EPOpsBuffer``).
"""

import torch
from torch._dynamo.testing import CompileCounterWithBackend

import deepep_ops as D
import dense_reference as ref

H, K, E, CAP = 256, 2, 4, 16


def test_data_dependent_branch_after_dispatch_exact_falls_back_to_eager():
    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K))

    def step(x, idx, w):
        r = D.dispatch_exact(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=CAP)
        if r.recv_x.shape[0] == 0:  # data-dependent: Dynamo cannot trace this branch
            rows = r.recv_x
        else:
            rows = (r.recv_x.float() * r.recv_topk_weights[:, None]).to(torch.bfloat16)
        return D.combine(rows, r.handle, buf)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, dynamic=True, backend=counter)
    for T in (5, 9, 0):
        inp = ref.make_global_inputs(T, [T], H, K, E, fp8=False, neg_frac=0.2)[0]
        args = (inp.x, inp.topk_idx, inp.topk_weights)
        torch.testing.assert_close(compiled(*args), step(*args), rtol=0, atol=0, msg=f"T={T}")
    assert counter.frame_count >= 2, "expected the data-dependent branch to split the function"
    torch._dynamo.reset()
