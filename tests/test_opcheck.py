"""torch.library.opcheck on the deepep_ops:: ops (world size 1, group=None).

opcheck runs test_schema, test_autograd_registration, test_faketensor (fake vs
real metadata: shape, dtype, strides, storage offset) and
test_aot_dispatch_dynamic. All four apply to every op; the only restriction is
test_schema for float8 inputs (see ``_utils_for``), a torch CPU limitation.
"""

import pytest
import torch

import deepep_ops as D
import dense_reference as ref

H, K, E, CAP = 256, 2, 4, 16
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _buffer():
    return D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K))


def _inputs(fp8: bool, T: int = 5, seed: int = 0):
    inp = ref.make_global_inputs(seed, [T], H, K, E, fp8=fp8, neg_frac=0.2)[0]
    return inp.x, inp.x_scales, inp.topk_idx, inp.topk_weights


def _check(op, args, test_utils=ALL_UTILS):
    result = torch.library.opcheck(op, args, test_utils=test_utils)
    assert result == {u: "SUCCESS" for u in test_utils}, result


def _utils_for(fp8: bool):
    if fp8:
        # test_schema's SchemaCheckMode compares inputs before/after with torch.allclose, which has no
        # CPU kernel for float8_e4m3fn ("mul_cpu_reduced_float" not implemented); the schema (and
        # no-mutation of inputs) is the same for bf16 and is checked by the bf16 cases.
        return tuple(u for u in ALL_UTILS if u != "test_schema")
    return ALL_UTILS


CASES = [  # (fp8, T, M, A)
    (False, 5, 8, 1),
    (False, 5, 16, 2),
    (True, 3, 4, 4),
    (False, 0, 1, 1),
]


@pytest.mark.parametrize("fp8,T,M,A", CASES)
def test_opcheck_dispatch(fp8, T, M, A):
    x, sf, idx, w = _inputs(fp8, T)
    _check(torch.ops.deepep_ops.dispatch.default, (x, sf, idx, w, _buffer(), E, M, A), _utils_for(fp8))


@pytest.mark.parametrize("fp8,T,M,A", CASES)
def test_opcheck_dispatch_exact(fp8, T, M, A):
    x, sf, idx, w = _inputs(fp8, T)
    _check(torch.ops.deepep_ops.dispatch_exact.default, (x, sf, idx, w, _buffer(), E, CAP, A), _utils_for(fp8))


@pytest.mark.parametrize("op", ["dispatch", "dispatch_exact"])
def test_opcheck_int32_packed_scales(op):
    """Scales may be int32 (packed UE8M0x4, docs/deepep_contract.md §1): moved as opaque 4-byte values, dtype kept."""
    x, sf, idx, w = _inputs(True, 4, seed=3)
    packed = sf.view(torch.int32)  # any 4-byte payload
    M = 4 if op == "dispatch" else CAP
    _check(getattr(torch.ops.deepep_ops, op).default, (x, packed, idx, w, _buffer(), E, M, 1), _utils_for(True))
    out = getattr(torch.ops.deepep_ops, op)(x, packed, idx, w, _buffer(), E, M, 1)
    recv_scales = out[1] if op == "dispatch" else out[3]  # dispatch_exact returns (N, X, recv_x, scales, ...)
    assert recv_scales.dtype == torch.int32 and recv_scales.shape[1] == packed.shape[1]


def _combine_args(handle, rows, buf):
    # The flat argument list of the combine schema: rows, buffer, then the handle's fields.
    return (rows, buf) + tuple(handle)


@pytest.mark.parametrize("T,M,A", [(5, 8, 1), (3, 4, 2), (0, 1, 1)])
def test_opcheck_combine_decode(T, M, A):
    buf = _buffer()
    x, _sf, idx, w = _inputs(False, T, seed=1)
    r = D.dispatch(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=M, expert_alignment=A)
    _check(torch.ops.deepep_ops.combine.default, _combine_args(r.handle, r.recv_x, buf))


@pytest.mark.parametrize("T,A", [(5, 1), (6, 4), (0, 1)])
def test_opcheck_combine_exact(T, A):
    buf = _buffer()
    x, _sf, idx, w = _inputs(False, T, seed=2)
    r = D.dispatch_exact(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=CAP, expert_alignment=A)
    _check(torch.ops.deepep_ops.combine.default, _combine_args(r.handle, r.recv_x, buf))


@pytest.mark.parametrize("exact", [False, True])
def test_opcheck_combine_into(exact):
    """The out-variant: opcheck (schema incl. the declared mutation of out), and out == combine."""
    buf = _buffer()
    x, _sf, idx, w = _inputs(False, 5, seed=4)
    if exact:
        r = D.dispatch_exact(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=CAP, expert_alignment=2)
    else:
        r = D.dispatch(x, idx, w, buf, num_experts=E, num_max_tokens_per_rank=8)
    out = torch.full_like(x, float("nan"))
    _check(torch.ops.deepep_ops.combine_into.default, (out,) + _combine_args(r.handle, r.recv_x, buf))
    D.combine_into(out, r.recv_x, r.handle, buf)
    # Identity experts at world size 1 (contract §8): decode sends each token back once
    # (x if it has any expert), prefill sums one copy per valid lane (K=2: exact in bf16).
    valid = (idx >= 0).sum(dim=1, keepdim=True)
    copies = valid if exact else (valid > 0).to(valid.dtype)
    torch.testing.assert_close(out, (x.float() * copies).to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("T,cap,expected", [(1, 16, 1), (5, 16, 8), (16, 16, 16), (9, 12, 12)])
def test_token_bucket_real_and_fake(T, cap, expected):
    """Real: pow2_bucket of the token count. Fake: an unbacked SymInt whose range holds every real value."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv, free_unbacked_symbols

    x = torch.zeros(T, H, dtype=torch.bfloat16)
    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(None, num_max_tokens_per_rank=cap, hidden=H, num_topk=K))
    assert torch.ops.deepep_ops.token_bucket(x, buf) == expected
    shape_env = ShapeEnv()
    with FakeTensorMode(shape_env=shape_env) as mode:
        fake = torch.ops.deepep_ops.token_bucket(mode.from_tensor(x), buf)
    assert isinstance(fake, torch.SymInt) and free_unbacked_symbols(fake) == {fake.node.expr}
    vr = shape_env.var_to_range[fake.node.expr]
    assert int(vr.lower) == 1 and int(vr.upper) == cap and int(vr.lower) <= expected <= int(vr.upper)
