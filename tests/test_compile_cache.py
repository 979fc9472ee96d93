"""Compiled graphs reused across processes: FX-graph and AOT-autograd cache hits.

Each phase is a fresh ``python`` subprocess at world size 1 (a real gloo
ProcessGroup behind the reference buffer, as a served model has) compiling the
decode MoE layer with Inductor into one shared, initially empty
``TORCHINDUCTOR_CACHE_DIR``. The second process must hit both caches and print
no pickling/deepcopy warnings; a third with another buffer capacity must miss
(the capacity is baked into the graph, so it must be part of the key).
"""

from __future__ import annotations

import json
import os
import sys

from _dist import run_watched

HERE = os.path.dirname(os.path.abspath(__file__))

_CHILD = r"""
import json, os, sys, tempfile, time
import torch, torch.distributed as dist
import deepep_ops as D
from deepep_ops.moe import MoELayer, make_moe_weights
from torch._dynamo.utils import counters

torch.set_num_threads(1)
cap = int(sys.argv[1])
# A FileStore, not a port picked by binding port 0 (another process may take it in between).
store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
H, K, E = 256, 2, 4
buf = D.EPBuffer(D.ReferenceElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=cap, hidden=H, num_topk=K))
layer = MoELayer(make_moe_weights(E, H, 32), D.DeepEPPrepareFinalize(buf, E, K, decode=True))
f = torch.compile(layer, fullgraph=True, dynamic=True, backend="inductor")
x = torch.randn(3, H).to(torch.bfloat16)
start = time.perf_counter()
y = f(x)
seconds = time.perf_counter() - start
torch.testing.assert_close(y, layer(x), atol=2e-2, rtol=2e-2)
dist.destroy_process_group()
print("RESULT " + json.dumps({"seconds": seconds, "inductor": dict(counters["inductor"]),
                              "aot": dict(counters["aot_autograd"])}))
"""


def _compile_in_fresh_process(cache_dir: str, capacity: int) -> tuple:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")]))
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    proc = run_watched([sys.executable, "-c", _CHILD, str(capacity)], env=env)  # fails on a hang, not when slow
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), proc.stderr


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
