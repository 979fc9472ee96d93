"""Compile cost of the two ways of supplying the decode bucket M.

- host: the caller passes ``pow2_bucket(T, capacity)`` as an int (a SymInt in the graph);
- in-graph: ``deepep_ops::token_bucket`` computes it on the host at run time and the
  graph sees an unbacked SymInt (what a vLLM-style caller, compiled once with
  its guards dropped, needs).

For each, a cold compile (fresh Dynamo state and a fresh Inductor cache dir) of
the decode MoE layer, then the calls for T = 1..64: frames compiled, seconds in
the first dynamic call (T = 2, the compile), and the median step time after
(last of ``--rounds`` alternating rounds).

    python benchmarks/bench_bucket_compile.py [--backend inductor|aot_eager]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def measure(backend: str, in_graph: bool) -> tuple[int, float, float]:
    import deepep_ops
    from deepep_ops.moe import MoELayer, make_moe_weights
    from deepep_ops.prepare_finalize import DeepEPPrepareFinalize
    from torch._dynamo.testing import CompileCounterWithBackend

    capacity, hidden, experts, topk = 64, 256, 8, 2
    buffer = deepep_ops.EPOpsBuffer(
        deepep_ops.ReferenceElasticBuffer(None, num_max_tokens_per_rank=capacity, hidden=hidden, num_topk=topk)
    )
    layer = MoELayer(make_moe_weights(experts, hidden, 128), DeepEPPrepareFinalize(buffer, experts, topk, decode=True))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    compile_s, steps = 0.0, []
    for T in range(1, capacity + 1):
        x = torch.randn(T, hidden, dtype=torch.bfloat16)
        m = None if in_graph else deepep_ops.pow2_bucket(T, capacity)
        t0 = time.perf_counter()
        compiled(x, m)
        dt = time.perf_counter() - t0
        if T == 2:
            compile_s = dt
        elif T > 2:
            steps.append(dt)
    return counter.frame_count, compile_s, statistics.median(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = {}
    # Alternate and keep the last round: the first compile of a process also
    # starts Inductor's compile workers, which would be charged to whoever goes first.
    for _round in range(args.rounds):
        for name, in_graph in (("host int", False), ("in-graph token_bucket", True)):
            with tempfile.TemporaryDirectory() as cache:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
                rows[name] = measure(args.backend, in_graph)
    rows = [(name, *values) for name, values in rows.items()]
    print(f"\ndecode MoE layer, world size 1, {args.backend}, torch {torch.__version__}, T = 1..64, cold cache")
    print("| bucket supplied as | frames | first dynamic call (compile) s | median step ms |")
    print("|---|---|---|---|")
    for name, frames, compile_s, step_s in rows:
        print(f"| {name} | {frames} | {compile_s:.1f} | {step_s * 1e3:.2f} |")


if __name__ == "__main__":
    main()
