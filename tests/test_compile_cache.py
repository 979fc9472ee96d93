"""Compiled graphs reused across processes: FX-graph and AOT-autograd cache hits.

Each phase is a fresh process at world size 1 (a real gloo ProcessGroup
behind the reference buffer, as a served model has) compiling the decode MoE
layer with Inductor into one shared, initially empty
``TORCHINDUCTOR_CACHE_DIR``. The second process must hit both caches and print
no pickling/deepcopy warnings; a third with another buffer capacity must miss
(the capacity is baked into the graph, so it must be part of the key). The
processes are forked from the test harness's fork server (tests/_dist.py: torch
and deepep_ops already imported, nothing compiled, in-memory caches empty), so
what carries over from one to the next is the cache directory only.
"""

from __future__ import annotations

from _dist import run_distributed


def _compile_once(rank: int, world: int, cache_dir: str, capacity: int) -> dict:
    """In a fresh process: compile and run the decode layer once; the compile counters."""
    import os
    import time

    import torch
    import torch._inductor.config
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    import deepep_ops as D
    from deepep_ops.moe import MoELayer, make_moe_weights

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    torch._inductor.config.force_disable_caches = False
    H, K, E = 256, 2, 4
    buf = D.EPOpsBuffer(D.ReferenceElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=capacity, hidden=H, num_topk=K))
    layer = MoELayer(make_moe_weights(E, H, 32), D.DeepEPPrepareFinalize(buf, E, K, decode=True))
    f = torch.compile(layer, fullgraph=True, dynamic=True, backend="inductor")
    x = torch.randn(3, H).to(torch.bfloat16)
    start = time.perf_counter()
    y = f(x)
    seconds = time.perf_counter() - start
    torch.testing.assert_close(y, layer(x), atol=2e-2, rtol=2e-2)
    return {"seconds": seconds, "inductor": dict(counters["inductor"]), "aot": dict(counters["aot_autograd"])}


def _compile_in_fresh_process(cache_dir: str, capacity: int) -> tuple:
    """(counters, everything the process printed)."""
    out: list = []
    (result,) = run_distributed(_compile_once, 1, cache_dir, capacity, outputs=out)
    return result, out[0]


def test_second_process_hits_fx_and_aot_caches(tmp_path):
    cache = str(tmp_path / "inductor")
    cold, cold_err = _compile_in_fresh_process(cache, 16)
    warm, warm_err = _compile_in_fresh_process(cache, 16)
    other, _ = _compile_in_fresh_process(cache, 32)
    for err in (cold_err, warm_err):
        lowered = err.lower()
        assert "pickle" not in lowered and "deepcopy" not in lowered, err[-4000:]
    assert cold["inductor"].get("fxgraph_cache_miss", 0) > 0, cold
    assert warm["inductor"].get("fxgraph_cache_hit", 0) > 0, warm
    assert warm["inductor"].get("fxgraph_cache_miss", 0) == 0, warm
    assert warm["aot"].get("autograd_cache_hit", 0) > 0, warm
    # Another capacity is another graph: a hit here would run stale code.
    assert other["inductor"].get("fxgraph_cache_hit", 0) == 0, other
    assert other["aot"].get("autograd_cache_hit", 0) == 0, other
    print(f"\ncompile: cold {cold['seconds']:.1f} s, warm {warm['seconds']:.1f} s")
