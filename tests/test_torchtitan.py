"""deepep-ops as torchtitan's expert-parallel token dispatcher (issue 30).

Skips without torchtitan, and under a torch that torchtitan 0.3 does not run
on (it calls ``torch.distributed.set_timeout``, new in 2.14): CI leg b
(torch 2.15) runs it, leg a (torch 2.13 + vLLM) skips it.

- In this process: the override factories and the configs' checks.
- On 2 gloo ranks (tests/torchtitan_moe.py, one spawn for all scenarios):
  torchtitan's own MoE trained 3 SGD steps with uneven tokens per rank,
  ours vs torchtitan's all-to-all vs EP=1 (outputs, input and every parameter
  gradient within bf16 tolerance), also with expert_alignment=8 and steps
  where a rank has no token; ours again through torchtitan's own
  ``MoE.parallelize`` (spmd_types, its default backend), eager and compiled,
  bitwise equal to the hand-wired run; compiled as torchtitan compiles blocks
  (``fullgraph=True``): aot_eager one frame, no break, bitwise equal to eager;
  torchtitan's SelectiveAC with its save list and with ours: calls of the
  reference buffer per step (ours: no dispatch recomputed in backward), eager
  and compiled; the command lines of docs/torchtitan.md parsed by torchtitan's
  ConfigManager, overridden as the Trainer does and built on the meta device.
- ``-m slow``: Inductor, and token counts that change between steps.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchtitan", reason="torchtitan is not installed (pip install 'deepep-ops[torchtitan]'; CI leg b)")
if not hasattr(torch.distributed, "set_timeout"):
    pytest.skip(
        f"torchtitan 0.3 needs torch >= 2.14 (it calls torch.distributed.set_timeout); this is {torch.__version__}",
        allow_module_level=True,
    )

import torchtitan_moe as tm  # noqa: E402
from _dist import run_distributed, run_scenarios  # noqa: E402

from deepep_ops.torchtitan import (  # noqa: E402
    DeepEPOpsSelectiveAC,
    DeepEPOpsTokenDispatcher,
    communication_ops,
    save_ops,
)
from deepep_ops.torchtitan import overrides  # noqa: E402


# ------------------------------------------------------------------------------ in process
def test_token_dispatcher_override_keeps_deepep_sizes():
    from torchtitan.models.common.token_dispatcher import DeepEPTokenDispatcher

    src = DeepEPTokenDispatcher.Config(num_experts=8, top_k=2, num_max_tokens_per_rank=1024, hidden_dim=512)
    cfg = overrides.token_dispatcher(src)
    assert type(cfg) is DeepEPOpsTokenDispatcher.Config
    assert (cfg.num_experts, cfg.top_k, cfg.num_max_tokens_per_rank, cfg.hidden_dim) == (8, 2, 1024, 512)
    assert (cfg.expert_alignment, cfg.backend) == (1, "auto")
    cfg = overrides.token_dispatcher(src, num_max_tokens_per_rank=64, backend="reference")
    assert (cfg.num_max_tokens_per_rank, cfg.hidden_dim, cfg.backend) == (64, 512, "reference")


def test_token_dispatcher_override_takes_pad_multiple_as_alignment():
    from torchtitan.models.common.token_dispatcher import TorchAOTokenDispatcher

    src = TorchAOTokenDispatcher.Config(num_experts=8, top_k=2, pad_multiple=16)
    cfg = overrides.token_dispatcher(src, num_max_tokens_per_rank=64, hidden_dim=256)
    assert cfg.expert_alignment == 16
    assert overrides.token_dispatcher(src, num_max_tokens_per_rank=64, hidden_dim=256, expert_alignment=32).expert_alignment == 32


def test_token_dispatcher_override_names_missing_sizes():
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher

    src = AllToAllTokenDispatcher.Config(num_experts=8, top_k=2)
    with pytest.raises(ValueError, match="num_max_tokens_per_rank or hidden_dim.*pass num_max_tokens_per_rank, hidden_dim"):
        overrides.token_dispatcher(src)
    with pytest.raises(ValueError, match="has no hidden_dim"):
        overrides.token_dispatcher(src, num_max_tokens_per_rank=64)


@pytest.mark.parametrize("field,value", [("num_max_tokens_per_rank", 0), ("hidden_dim", -256), ("expert_alignment", True),
                                         ("backend", "nccl")])
def test_config_rejects_bad_values(field, value):
    kwargs = dict(num_experts=8, top_k=2, num_max_tokens_per_rank=64, hidden_dim=256)
    kwargs[field] = value
    with pytest.raises(ValueError, match=f"Config.{field} must be"):
        DeepEPOpsTokenDispatcher.Config(**kwargs).build()


class _Mesh:
    """What init_buffer reads of a DeviceMesh, for the checks that run before any communication."""

    device_type = "cpu"

    def size(self) -> int:
        return 2

    def get_group(self):
        raise AssertionError("init_buffer reached the process group")


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_dim=320), "hidden_dim must be a multiple of 256"),
    (dict(num_experts=7), r"num_experts \(7\) must be a multiple of the EP size \(2\)"),
    (dict(hidden_dim=None), "needs hidden_dim"),
])
def test_init_buffer_checks_before_communicating(kwargs, match):
    cfg = dict(num_experts=8, top_k=2, num_max_tokens_per_rank=64, hidden_dim=256)
    cfg.update(kwargs)
    dispatcher = DeepEPOpsTokenDispatcher.Config(**cfg).build()
    with pytest.raises(ValueError, match=match):
        dispatcher.wire_meshes(ep_mesh=_Mesh())


def test_without_ep_mesh_it_reorders_locally():
    dispatcher = DeepEPOpsTokenDispatcher.Config(num_experts=4, top_k=2).build()
    dispatcher.wire_meshes(ep_mesh=None)
    assert dispatcher.buffer is None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(5)])
    scores = torch.rand(5, 2, generator=g)
    counts = torch.bincount(ids.flatten(), minlength=4)
    rows, got_counts, meta = dispatcher.dispatch(x, scores, ids, counts)
    assert torch.equal(got_counts, counts)
    out = dispatcher.combine(rows * 2, meta, x)
    torch.testing.assert_close(out, 2 * scores.sum(dim=1, keepdim=True) * x)


def test_selective_ac_override_keeps_fields_and_saves_our_ops():
    from torchtitan.distributed.activation_checkpoint import SelectiveAC, _get_default_save_ops

    src = SelectiveAC.Config(force_recompute_mm_shapes_by_fqns=["x.y"], preserve_rng_state=False)
    cfg = overrides.selective_ac(src)
    assert type(cfg) is DeepEPOpsSelectiveAC.Config
    assert (cfg.force_recompute_mm_shapes_by_fqns, cfg.preserve_rng_state) == (["x.y"], False)
    ops = communication_ops()
    assert {op.name() for op in ops} == {f"deepep_ops::{n}" for n in
                                         ("dispatch", "dispatch_exact", "combine", "cached_dispatch", "token_bucket")}
    assert not ops & set(_get_default_save_ops())  # what the override is for
    assert save_ops() == set(_get_default_save_ops()) | ops
    assert cfg.build().get_save_ops() == save_ops()


# ------------------------------------------------------------------------------ 2 gloo ranks
DEFAULT = tuple(n for n in tm.SCENARIOS if n not in tm.SLOW_SCENARIOS)
_RUNS: dict = {}


def _scenario(name: str, names: tuple, timeout: float) -> None:
    """Run ``names`` once (one spawn, cached) and fail with ``name``'s tracebacks."""
    if names not in _RUNS:
        try:
            # Compile scenarios: one rank may still compile while the other waits.
            _RUNS[names] = run_distributed(run_scenarios, 2, "torchtitan_moe", names, timeout=timeout,
                                           gloo_timeout_s=timeout / 2)
        except Exception as e:  # noqa: BLE001 - the whole spawn failed: every scenario reports it
            _RUNS[names] = [{n: str(e) for n in names}] * 2
    failures = [f"--- rank {r} ---\n{res[name]}" for r, res in enumerate(_RUNS[names]) if res[name] is not None]
    if failures:
        raise AssertionError(f"scenario {name!r} failed:\n" + "\n".join(failures))


@pytest.mark.parametrize("name", DEFAULT)
def test_torchtitan_moe(name):
    _scenario(name, DEFAULT, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("name", tm.SLOW_SCENARIOS)
def test_torchtitan_moe_slow(name):
    _scenario(name, tm.SLOW_SCENARIOS, timeout=1800)
