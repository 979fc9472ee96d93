"""deepep-ops as torchtitan's token dispatcher vs torchtitan's own EP: the numbers.

Runs tests/torchtitan_moe.py's scenarios on 2 gloo ranks (CPU, reference
buffer; needs torchtitan and a torch >= 2.14) and prints, for rank 0:

- the gradients table: ours (EP=2) vs torchtitan's all-to-all (EP=2) vs EP=1,
  worst over 3 SGD steps of max |a − b| and max |a − b| / max |b| per tensor;
- frames and graph breaks per compile backend (torchtitan's apply_compile:
  each block, fullgraph=True) and the error against eager and EP=1;
- reference-buffer calls per training step without activation checkpointing
  and under torchtitan's SelectiveAC with its save list and with ours.

    PYTHONPATH=.:tests python benchmarks/torchtitan_parity.py [--slow]

``--slow`` adds Inductor and token counts that change between steps (minutes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from _dist import run_distributed  # noqa: E402


def _table(rows: list, header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: " | ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows])


def _e(v: dict) -> str:
    return f"{v['abs']:.2e} / {v['rel']:.2e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow", action="store_true", help="add Inductor and varying token counts")
    args = parser.parse_args()
    import torchtitan_moe as tm

    names = ("eager", "aot_eager", "torchtitan_parallelize", "selective_ac_eager", "selective_ac_aot_eager")
    if args.slow:
        names += tm.SLOW_SCENARIOS
    t0 = time.perf_counter()
    res = run_distributed(tm.report, 2, names, timeout=3600, gloo_timeout_s=900)[0]
    wall = time.perf_counter() - t0

    eager = res["eager"]
    tables = eager["tables"]
    cols = ("ours vs EP=1", "all_to_all vs EP=1", "ours vs all_to_all")
    rows = [(tm.short_name(n),) + tuple(_e(tables[c][n]) for c in cols) for n in tables[cols[0]]]
    print(f"Gradients and outputs, eager, 2 ranks (T = {tm.STATIC_TOKENS[0]}), D={tm.D} E={tm.E} K={tm.K}, "
          f"{len(tm.STATIC_TOKENS)} SGD steps (weights moved by up to {eager['weight_change']:.1%}); "
          "max abs / max rel error\n")
    print(_table(rows, ("tensor",) + cols))

    compiled = [(k, v) for k, v in res.items() if k.startswith(("aot_eager", "inductor"))]
    rows = []
    for name, v in compiled:
        worst_ep1 = max(v["vs_ep1"].values(), key=lambda e: e["rel"])
        worst_eager = max(v["vs_eager"].values(), key=lambda e: e["rel"])
        rows.append((name, v["frames"], v["breaks"], f"{worst_ep1['rel']:.2e}", f"{worst_eager['rel']:.2e}"))
    for mode, v in res["torchtitan parallelize"].items():
        worst_ep1 = max(v["vs_ep1"].values(), key=lambda e: e["rel"])
        worst_hand = max(v["vs_hand_wired"].values(), key=lambda e: e["rel"])
        rows.append((f"MoE.parallelize, {mode}", "-" if v["frames"] is None else v["frames"], v["breaks"],
                     f"{worst_ep1['rel']:.2e}", f"{worst_hand['rel']:.2e} (vs hand-wired eager)"))
    print("\nCompiled (each block, fullgraph=True; worst relative error over all tensors and steps)\n")
    print(_table(rows, ("backend", "frames", "graph breaks", "vs EP=1", "vs eager")))

    rows = [("no AC, eager", *eager["calls"].values())]
    for k, v in res.items():
        if k.startswith("aot_eager") or k.startswith("inductor"):
            rows.append((f"no AC, {k}", *v["calls"].values()))
    for k, v in res.items():
        if k.startswith("selective AC"):
            mode = k.split(", ")[1]
            for policy, r in v.items():
                rows.append((f"{policy}, {mode}", *r["calls"].values()))
    print("\nReference-buffer calls per training step (one MoE layer)\n")
    print(_table(rows, ("", "dispatch", "cached dispatch (bwd)", "combine", "combine with weights (bwd)")))
    print(f"\n{len(names)} scenarios in {wall:.0f} s (2 ranks on this machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
