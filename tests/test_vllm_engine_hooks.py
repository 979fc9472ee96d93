"""Fast, single-process checks of deepep_ops.vllm.engine (the hooks the plugin installs)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

E, K, H, CAP = 4, 2, 256, 32


@pytest.fixture
def engine():
    from deepep_ops.vllm import engine

    was = engine.installed()
    yield engine
    if not was:
        engine.uninstall()


def test_install_rebinds_and_uninstall_restores(engine):
    import vllm.model_executor.layers.fused_moe.all2all_utils as a2a
    import vllm.model_executor.layers.fused_moe.runner.moe_runner as mr

    engine.uninstall()
    before = (getattr(a2a, "DeepEPV2PrepareAndFinalize", None), a2a.get_ep_all2all_manager, mr.MoERunner._select_forward)
    engine.install()
    engine.install()  # idempotent
    assert a2a.DeepEPV2PrepareAndFinalize is engine.EngineDeepEPV2PrepareAndFinalize
    assert a2a.get_ep_all2all_manager is engine._get_ep_all2all_manager
    assert mr.MoERunner._select_forward is engine._select_forward
    engine.uninstall()
    after = (getattr(a2a, "DeepEPV2PrepareAndFinalize", None), a2a.get_ep_all2all_manager, mr.MoERunner._select_forward)
    assert after == before


def test_plugin_installs_only_when_opted_in(monkeypatch, engine):
    from deepep_ops.vllm import plugin

    engine.uninstall()
    monkeypatch.delenv("DEEPEP_OPS_VLLM", raising=False)
    plugin.register()
    assert not engine.installed()
    monkeypatch.setenv("DEEPEP_OPS_VLLM", "1")
    plugin.register()
    assert engine.installed()


@pytest.mark.parametrize("decode", [False, True])
def test_local_int32_ids_for_cpu_experts(engine, decode):
    """What vLLM's CPU experts receive: local int32 ids, weight 0 (expert 0) for lanes routed elsewhere."""
    import deepep_ops
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG

    buf = deepep_ops.ReferenceElasticBuffer(None, num_max_tokens_per_rank=CAP, hidden=H, num_topk=K)
    pf = engine.EngineDeepEPV2PrepareAndFinalize(
        buf, num_dispatchers=1, dp_size=1, rank_expert_offset=0, num_experts=E, num_topk=K,
        use_cudagraph=decode, expert_ids="local_int32",
    )
    g = torch.Generator().manual_seed(0)
    T = 5
    x = torch.randn(T, H, generator=g).bfloat16()
    w = torch.rand(T, K, generator=g).softmax(-1)
    ids = torch.tensor([[0, 1], [2, 3], [3, -1], [1, 0], [2, 1]])
    a1q, _, _, tids, tw = pf.prepare(x, w, ids, E, None, False, FUSED_MOE_UNQUANTIZED_CONFIG)
    assert tids.dtype == torch.int32 and tw.dtype == torch.float32
    assert int(tids.min()) >= 0 and int(tids.max()) < E
    # Weighted sum of one-hot experts per received row reproduces the routing mass.
    assert torch.allclose(tw.sum(), w[ids >= 0].sum(), atol=1e-5)
    if decode:
        # Rows past the received count are zeroed, so weight 0 contributes exactly 0.
        n = int(pf.handles[0].psum_num_recv_tokens_per_scaleup_rank[-1])
        assert a1q.shape[0] > n and bool((a1q[n:] == 0).all())
