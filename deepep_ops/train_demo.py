"""``python -m deepep_ops train-demo``: a few optimizer steps of an expert-parallel
MoE layer, eager and compiled (forward + backward through dispatch and combine).

Spawns ``--world-size`` gloo ranks on CPU with the reference buffer. Each rank
trains its local experts (and the shared router, all-reduced) of a small MoE
layer: router → prepare (dispatch) → experts → finalize (combine) → loss →
``backward`` → SGD. The same steps run eagerly and under
``torch.compile(fullgraph=True, dynamic=True)`` from the same initial weights;
the two take turns step by step, and the script prints the losses of both,
their difference, and a table of step times with their median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import timedelta
from typing import Optional

import torch

from deepep_ops import _cli
from deepep_ops.moe import LocalExperts, make_moe_weights, route
from deepep_ops.prepare_finalize import DeepEPPrepareFinalize


class MoEBlock(torch.nn.Module):
    """prepare → local experts → finalize: ``(x [T, H] bf16, topk_weights [T, K] f32,
    topk_ids [T, K] int64) → [T, H] bf16``, differentiable in x, topk_weights and
    the experts' weights."""

    def __init__(self, prepare_finalize: DeepEPPrepareFinalize, experts: LocalExperts) -> None:
        super().__init__()
        self.pf = prepare_finalize
        self.experts = experts

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        p = self.pf.prepare(x, topk_weights, topk_ids)
        y = self.experts(p.expert_x, p.expert_x_scale, p.topk_ids, self.pf.rank_expert_offset)
        out = torch.empty_like(x)
        self.pf.finalize(out, y, p.topk_weights, p.topk_ids, p.handle)
        return out


class TrainableMoE(torch.nn.Module):
    """A trainable router (float32 [H, E]) in front of :class:`MoEBlock`."""

    def __init__(self, router: torch.Tensor, block: MoEBlock) -> None:
        super().__init__()
        self.router = torch.nn.Parameter(router.clone())
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = route(x, self.router, self.block.pf.num_topk)
        return self.block(x, topk_weights, topk_ids)


def _build(rank: int, group, args) -> TrainableMoE:
    import deepep_ops as D
    import torch.distributed as dist

    def global_max(n: int) -> int:
        t = torch.tensor([n])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return int(t)

    weights = make_moe_weights(args.experts, args.hidden, args.intermediate, seed=0)
    buf = D.EPOpsBuffer(
        D.ReferenceElasticBuffer(group, num_max_tokens_per_rank=args.capacity, hidden=args.hidden, num_topk=args.topk),
        num_tokens_source=global_max,
    )
    pf = DeepEPPrepareFinalize(buf, args.experts, args.topk, decode=args.mode == "decode", expert_alignment=1)
    el = args.experts // buf.num_ranks
    experts = LocalExperts(weights, rank * el, el)
    for p in experts.parameters():
        p.requires_grad_(True)
    return TrainableMoE(weights.router, MoEBlock(pf, experts))


def _batch(step: int, rank: int, args) -> tuple:
    """Tokens and a regression target; T differs per rank and per step."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    T = int(torch.randint(1, args.max_tokens + 1, (1,), generator=g))
    x = torch.randn(T, args.hidden, generator=g).bfloat16()
    target = 0.5 * x.float()  # a fixed, learnable map of the tokens
    return x, target


def _step(model: TrainableMoE, fn, opt: torch.optim.Optimizer, step: int, rank: int, args, group,
          progress=None) -> tuple:
    """One SGD step of ``fn`` on step ``step``'s batch: ``(mean loss over ranks, seconds)``;
    ``progress``: a context rank 0 reports under while the step runs (a compile)."""
    import contextlib

    import torch.distributed as dist

    x, target = _batch(step, rank, args)
    dist.barrier(group)
    t0 = time.perf_counter()
    with progress or contextlib.nullcontext():
        out = fn(x)
        loss = ((out.float() - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
    # The router is replicated: average its gradient (experts are rank-local).
    dist.all_reduce(model.router.grad, group=group)
    model.router.grad /= dist.get_world_size(group)
    opt.step()
    seconds = time.perf_counter() - t0
    t = torch.tensor([loss.item()], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return float(t) / dist.get_world_size(group), seconds


def _train(models: dict, rank: int, args, group, first_step: dict) -> dict:
    """``args.steps`` SGD steps of each ``name: (model, fn)``, taking turns step by
    step (the first to go alternates), so that the machine's drift and noise fall
    on every variant alike. ``first_step``: what rank 0 prints while a variant's
    step 0 runs (a compile). Returns ``name: (losses, seconds)``."""
    opts = {name: torch.optim.SGD(model.parameters(), lr=args.lr) for name, (model, _fn) in models.items()}
    out = {name: ([], []) for name in models}
    names = list(models)
    for step in range(args.steps):
        for name in (names if step % 2 == 0 else names[::-1]):
            model, fn = models[name]
            progress = (_cli.Progress(_say if rank == 0 else None, first_step[name])
                        if step == 0 and name in first_step else None)
            loss, seconds = _step(model, fn, opts[name], step, rank, args, group, progress)
            out[name][0].append(loss)
            out[name][1].append(seconds)
    return out


def _say(msg: str) -> None:
    print(f"[train-demo] {msg}", flush=True)


def _worker(rank: int, world: int, port: int, args, out_q) -> None:
    import torch.distributed as dist
    from deepep_ops._torch_compat import frame_counting_backend, graph_breaks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        group = dist.group.WORLD
        eager_model = _build(rank, group, args)
        model = _build(rank, group, args)
        cnt = frame_counting_backend(args.compile_backend)
        compiled = torch.compile(model, backend=cnt, fullgraph=True, dynamic=True)
        if rank == 0:
            _say(f"{args.steps} steps each, eager and compiled taking turns")
        runs = _train(
            {"eager": (eager_model, eager_model), "compiled": (model, compiled)}, rank, args, group,
            first_step={"compiled": f"compiling forward + backward with {args.compile_backend} "
                                    "(compiled step 0; may take a minute or more on a CPU)"})
        out_q.put((rank, dict(eager=runs["eager"], compiled=runs["compiled"],
                              frames=cnt.frame_count, breaks=graph_breaks())))
    except BaseException:  # noqa: BLE001
        import traceback

        out_q.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    """The options (defined in :mod:`deepep_ops._cli`), checked: a bad value is a usage error."""
    parser = _cli.train_demo_parser()
    args = parser.parse_args(argv)
    _cli.check_train_demo(parser, args)
    return args


def main(argv: Optional[list] = None) -> int:
    """``python -m deepep_ops train-demo [options]``: :func:`run` after checking the options."""
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the demo (options already checked); 0 when eager and compiled losses agree within ``--rtol``."""
    import socket

    import torch.multiprocessing as mp

    _say(f"spawning {args.world_size} gloo ranks")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.world_size, port, args, out_q)) for r in range(args.world_size)]
    for p in procs:
        p.start()
    results = dict(out_q.get(timeout=1200) for _ in procs)
    for p in procs:
        p.join()
    errors = {r: v for r, v in results.items() if isinstance(v, str)}
    if errors:
        # One traceback (the lowest failing rank's); the other ranks' last lines.
        first = min(errors)
        print(f"--- rank {first} ---\n{errors[first]}")
        for r, tb in sorted(errors.items()):
            if r != first:
                print(f"--- rank {r}: {tb.strip().splitlines()[-1]}")
        return 1
    r0 = results[0]
    (el, et), (cl, ct) = r0["eager"], r0["compiled"]
    print(f"train-demo: {args.world_size} gloo ranks, {args.mode}, E={args.experts} K={args.topk} H={args.hidden} "
          f"I={args.intermediate}, T random in [1, {args.max_tokens}] per rank and step, SGD lr={args.lr}")
    print(f"compiled ({args.compile_backend}, fullgraph=True, dynamic=True): "
          f"{r0['frames']} frames, {r0['breaks']} graph breaks (rank 0)\n")
    print(f"{'step':>4} | {'eager loss':>12} | {'compiled loss':>13} | {'rel diff':>9} | {'eager ms':>9} | {'compiled ms':>11}")
    print("-" * 74)
    worst = 0.0
    for i, (a, b, ta, tb) in enumerate(zip(el, cl, et, ct)):
        rel = abs(a - b) / max(abs(a), 1e-12)
        worst = max(worst, rel)
        print(f"{i:>4} | {a:>12.6f} | {b:>13.6f} | {rel:>9.2e} | {ta * 1e3:>9.1f} | {tb * 1e3:>11.1f}")
    steady = slice(1, None) if len(et) > 1 else slice(None)
    print("-" * 74)
    ratios = [b / a for a, b in zip(et[steady], ct[steady])]
    print(f"median step time after step 0: eager {statistics.median(et[steady]) * 1e3:.1f} ms, "
          f"compiled {statistics.median(ct[steady]) * 1e3:.1f} ms; compiled / eager, the median of the "
          f"steps' ratios: {statistics.median(ratios):.2f} (step 0 of compiled includes compilation; "
          "the phases take turns step by step)")
    # Batches differ per step, so a loss decrease is reported, not required.
    ok = worst <= args.rtol
    print(f"losses {'agree' if worst <= args.rtol else 'DIFFER'} (worst rel diff {worst:.2e}, rtol {args.rtol}); "
          f"loss {'decreased' if el[-1] < el[0] else 'did NOT decrease'}: {el[0]:.5f} -> {el[-1]:.5f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
