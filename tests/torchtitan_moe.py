"""torchtitan's own MoE layer trained with expert parallelism on gloo ranks (tests/test_torchtitan.py).

Runs inside the ranks that ``tests/_dist.py`` spawns (:data:`SCENARIOS`, run by
``_dist.run_scenarios``). The model is torchtitan's ``MoE``
(``TokenChoiceTopKRouter`` with softmax + route_norm, ``GroupedExperts`` over
``torch._grouped_mm``, a shared ``FeedForward`` expert), built with torchtitan's
config helpers. Three token dispatchers train it from the same initial
weights on the same global batches:

- ``ep1``: EP=1 (torchtitan's all-to-all dispatcher without an EP mesh falls
  back to its local reorder), all experts in one process, fed every rank's
  tokens at once: the reference. Each rank runs it itself.
- ``all_to_all``: EP=R, torchtitan's ``AllToAllTokenDispatcher``.
- ``ours``: EP=R, :class:`deepep_ops.torchtitan.DeepEPOpsTokenDispatcher`,
  installed through torchtitan's own override mechanism (``apply_overrides``
  with ``deepep_ops.torchtitan.overrides.token_dispatcher``) on the reference
  buffer over gloo.

Expert parallelism is applied as ``RoutedExperts.parallelize`` leaves it for the
dispatcher: each rank keeps its E/R experts' weights and the dispatcher gets
``wire_meshes(ep_mesh=...)``. The DTensor / ``local_map`` wrapping around
``RoutedExperts`` is left out (inside it dispatchers see plain local tensors,
as here); replicated parameters (router, shared expert) get their gradients
summed over ranks, as data parallelism does, since the loss is a sum over the
global batch. Compilation is torchtitan's ``apply_compile``: each block,
``fullgraph=True``, ``capture_scalar_outputs``; activation checkpointing is
torchtitan's ``SelectiveAC.apply``.

Every step: an uneven number of tokens per rank, loss = Σ y·g / √(T·D) for a
fixed random g, backward, SGD. Tolerance (bf16: our tokens, expert outputs
and the gradients that cross ranks are bf16, torchtitan's here are float32):
``max|got − ref| <= GRAD_RTOL · max|ref|`` per tensor and step.
"""

from __future__ import annotations

import re
import shlex
import time
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

D, F, E, K = 256, 32, 8, 2  # model dim (a multiple of 256: DeepEP combine), expert hidden, experts, top-k
CAPACITY = 32  # num_max_tokens_per_rank
LR = 0.02
SEED = 0
#: bf16 tolerance (as tests/test_training.py); measured worst: 1.05e-2 (an expert weight's gradient).
GRAD_RTOL = 2e-2
#: torchtitan's all-to-all vs its EP=1 (both float32 here): checks the harness itself.
HARNESS_RTOL = 1e-4
#: Tokens per rank at each step. torchtitan trains with a fixed seq_len, so a rank
#: keeps its count; the ranks differ. VARYING also changes it between steps.
STATIC_TOKENS: List[List[int]] = [[13, 6]] * 3
VARYING_TOKENS: List[List[int]] = [[13, 6], [5, 17], [11, 11]]
#: With a rank that has no token at some steps.
EMPTY_RANK_TOKENS: List[List[int]] = [[9, 0], [0, 7], [12, 5]]
#: expert_alignment of the aligned scenario (FP8 grouped GEMMs want 16 or 32).
ALIGNMENT = 8
EXPERT_WEIGHTS = ("w1_EFD", "w2_EDF", "w3_EFD")
REPLICATED_PREFIXES = ("router.", "shared_experts.")
OVERRIDE = "deepep_ops.torchtitan.overrides.token_dispatcher"
DOC = Path(__file__).resolve().parent.parent / "docs" / "torchtitan.md"

#: Per-process results of the scenarios (numbers for benchmarks/torchtitan_parity.py).
RESULTS: Dict[str, dict] = {}
_CACHE: Dict[tuple, object] = {}


# ------------------------------------------------------------------------------ model
def moe_config(dispatcher: str, expert_alignment: int = 1):
    """torchtitan ``MoE.Config``; ``dispatcher``: ``"all_to_all"`` (torchtitan's
    "standard" backend) or ``"ours"`` (the same, overridden)."""
    from torchtitan.config import OverrideConfig, apply_overrides
    from torchtitan.models.common.config_utils import (
        make_ffn_config,
        make_moe_config,
        make_routed_experts_config,
        make_router_config,
    )

    init = {"weight": partial(torch.nn.init.trunc_normal_, std=0.1)}
    expert_init = {name: partial(torch.nn.init.trunc_normal_, std=0.1) for name in EXPERT_WEIGHTS}
    cfg = make_moe_config(
        num_experts=E,
        router=make_router_config(dim=D, num_experts=E, gate_param_init=init, top_k=K, score_func="softmax",
                                  route_norm=True),
        routed_experts=make_routed_experts_config(dim=D, hidden_dim=F, num_experts=E, top_k=K,
                                                  param_init=expert_init, comm_backend="standard"),
        shared_experts=make_ffn_config(dim=D, hidden_dim=F, w1_param_init=init, w2w3_param_init=init),
    )
    if dispatcher == "ours":
        lines = apply_overrides(
            OverrideConfig(imports=[(OVERRIDE, {"num_max_tokens_per_rank": CAPACITY, "hidden_dim": D,
                                                "expert_alignment": expert_alignment})]), cfg
        )
        assert len(lines) == 1, lines
    else:
        assert dispatcher == "all_to_all", dispatcher
    return cfg


def initial_state() -> dict:
    """The initial weights every variant starts from (seeded; the same on every rank)."""
    moe = moe_config("all_to_all").build()
    torch.manual_seed(SEED)
    moe.init_states()
    return {k: v.detach().clone() for k, v in moe.state_dict().items()}


def build(dispatcher: str, state: dict, ep_mesh=None, expert_alignment: int = 1):
    """The MoE with ``state``; with ``ep_mesh``, this rank's E/R experts and the mesh wired."""
    moe = moe_config(dispatcher, expert_alignment).build()
    moe.load_state_dict(state)
    if ep_mesh is not None:
        rank, num_ranks = ep_mesh.get_local_rank(), ep_mesh.size()
        el = E // num_ranks
        experts = moe.routed_experts.inner_experts
        for name in EXPERT_WEIGHTS:
            full = getattr(experts, name).detach()
            setattr(experts, name, torch.nn.Parameter(full[rank * el:(rank + 1) * el].clone()))
        # What RoutedExperts.parallelize does for the dispatcher.
        moe.routed_experts.token_dispatcher.wire_meshes(ep_mesh=ep_mesh)
    return moe


class Block(torch.nn.Module):
    """A transformer block holding only the MoE (``layers.0.moe``: the path
    torchtitan's SelectiveAC matches ``moe.router.gate`` against)."""

    def __init__(self, moe) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x)


class Model(torch.nn.Module):
    """``layers`` → one :class:`Block`: what torchtitan's ``SelectiveAC.apply`` and ``apply_compile`` walk."""

    def __init__(self, moe) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleDict({"0": Block(moe)})
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers.values():
            x = block(x)
        return x


# ------------------------------------------------------------------------------ data and training
def global_batch(step: int, tokens: List[List[int]]) -> tuple:
    """Every rank's ``(x [1, T_r, D], g [1, T_r, D])`` at ``step`` (float32)."""
    gen = torch.Generator().manual_seed(1000 + step)
    xs, gs = [], []
    for t in tokens[step]:
        xs.append(torch.randn(1, t, D, generator=gen))
        gs.append(torch.randn(1, t, D, generator=gen))
    return xs, gs


def train(model: Model, rank: Optional[int], tokens: List[List[int]], group=None) -> List[dict]:
    """One SGD step per entry of ``tokens``; per step ``{"out", "x_grad", <param name>: grad}``.

    ``rank`` None: EP=1 on every rank's tokens at once (outputs and x grads are
    then split per rank into lists). Otherwise this rank's tokens, with the
    gradients of replicated parameters summed over ``group``.
    """
    opt = torch.optim.SGD(model.moe.parameters(), lr=LR)
    history = []
    for step in range(len(tokens)):
        xs, gs = global_batch(step, tokens)
        if rank is None:
            x, g = torch.cat(xs, dim=1), torch.cat(gs, dim=1)
        else:
            x, g = xs[rank], gs[rank]
        x = x.clone().requires_grad_()
        out = model(x)
        loss = (out.float() * g).sum() / (sum(tokens[step]) * D) ** 0.5
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = {}
        for name, p in model.moe.named_parameters():
            grad = p.grad
            if rank is not None and name.startswith(REPLICATED_PREFIXES):
                dist.all_reduce(grad, group=group)
            grads[name] = grad.detach().clone()
        opt.step()
        rec = {"out": out.detach().float().clone(), "x_grad": x.grad.detach().float().clone(), **grads}
        if rank is None:
            rec["out"] = list(rec["out"].split(tokens[step], dim=1))
            rec["x_grad"] = list(rec["x_grad"].split(tokens[step], dim=1))
        history.append(rec)
    return history


def local_view(ref_step: dict, rank: int, num_ranks: int) -> dict:
    """The EP=1 record as rank ``rank`` of an EP run sees it (its tokens, its experts)."""
    el = E // num_ranks
    out = {}
    for name, value in ref_step.items():
        if name in ("out", "x_grad"):
            out[name] = value[rank]
        elif name.split(".")[-1] in EXPERT_WEIGHTS:
            out[name] = value[rank * el:(rank + 1) * el]
        else:
            out[name] = value
    return out


def errors(got: List[dict], ref: List[dict]) -> Dict[str, dict]:
    """``{tensor name: {"abs": max|got − ref|, "rel": that / max|ref|}}``, worst over steps."""
    table: Dict[str, dict] = {}
    for g_step, r_step in zip(got, ref):
        for name, r in r_step.items():
            diff = float((g_step[name].float() - r.float()).abs().max()) if r.numel() else 0.0
            scale = float(r.float().abs().max()) if r.numel() else 0.0
            cur = table.setdefault(name, {"abs": 0.0, "rel": 0.0})
            cur["abs"] = max(cur["abs"], diff)
            cur["rel"] = max(cur["rel"], diff / scale if scale > 0 else diff)
    return table


def assert_close(table: Dict[str, dict], rtol: float, what: str) -> None:
    bad = {name: v for name, v in table.items() if v["rel"] > rtol}
    assert not bad, f"{what}: relative error above {rtol} for {bad}"


def short_name(name: str) -> str:
    """``routed_experts.inner_experts.w1_EFD`` -> ``experts.w1_EFD`` (table labels)."""
    return {"out": "output", "x_grad": "input grad"}.get(name, name.replace("routed_experts.inner_experts.", "experts."))


# ------------------------------------------------------------------------------ counting backend calls
class CallCounter:
    """Counts the reference buffer's calls: fresh dispatches, cached dispatches
    (combine's backward), combines, combines with weights (dispatch's backward)."""

    KINDS = ("dispatch", "cached_dispatch", "combine", "combine_with_weights")

    def __init__(self, model: Model) -> None:
        native = model.moe.routed_experts.token_dispatcher.buffer.backend.buffer
        assert type(native).__name__ == "ReferenceElasticBuffer", type(native)
        self.counts = dict.fromkeys(self.KINDS, 0)
        dispatch, combine = native.dispatch, native.combine

        def counting_dispatch(*args, **kwargs):
            self.counts["cached_dispatch" if kwargs.get("handle") is not None else "dispatch"] += 1
            return dispatch(*args, **kwargs)

        def counting_combine(*args, **kwargs):
            self.counts["combine_with_weights" if kwargs.get("topk_weights") is not None else "combine"] += 1
            return combine(*args, **kwargs)

        # The dispatcher's buffer is shared by every dispatcher of this group and
        # sizes (shared_ep_buffer): wrap once, undo in restore().
        self.native = native
        native.dispatch, native.combine = counting_dispatch, counting_combine

    def restore(self) -> dict:
        del self.native.dispatch, self.native.combine
        return dict(self.counts)


# ------------------------------------------------------------------------------ compile helpers
def compile_blocks(model: Model, backend: str):
    """torchtitan's ``apply_compile`` with a frame counter: each block, ``fullgraph=True``."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    # As torchtitan.distributed.compile.apply_compile sets them.
    torch._dynamo.config.capture_scalar_outputs = True
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    counter = CompileCounterWithBackend(backend)
    for block in model.layers.values():
        block.compile(backend=counter, fullgraph=True)
    return counter


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


# ------------------------------------------------------------------------------ shared setup per process
def _mesh(world_size: int):
    key = ("mesh", world_size)
    if key not in _CACHE:
        from torch.distributed.device_mesh import init_device_mesh
        from torchtitan.distributed.utils import set_spmd_backend

        # torchtitan's all-to-all dispatcher outside spmd_types takes the EP group from its mesh.
        set_spmd_backend("partial_dtensor")
        _CACHE[key] = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    return _CACHE[key]


def references(rank: int, world_size: int, tokens: List[List[int]]) -> dict:
    """Initial state, and the EP=1, all-to-all and eager-ours histories (cached per process)."""
    key = ("refs", rank, world_size, tuple(map(tuple, tokens)))
    if key not in _CACHE:
        mesh = _mesh(world_size)
        group = mesh.get_group()
        state = initial_state()
        ep1_model = Model(build("all_to_all", state))
        ep1 = [local_view(s, rank, world_size) for s in train(ep1_model, None, tokens)]
        weight_change = max(
            float((p.detach() - state[n]).abs().max() / state[n].abs().max())
            for n, p in ep1_model.moe.named_parameters()
        )
        a2a = train(Model(build("all_to_all", state, mesh)), rank, tokens, group)
        ours_model = Model(build("ours", state, mesh))
        counter = CallCounter(ours_model)
        ours = train(ours_model, rank, tokens, group)
        _CACHE[key] = dict(state=state, ep1=ep1, a2a=a2a, ours=ours, calls=counter.restore(),
                           weight_change=weight_change, dispatcher=ours_model.moe.routed_experts.token_dispatcher)
    return _CACHE[key]


def _per_step(counts: dict, steps: int) -> dict:
    assert all(v % steps == 0 for v in counts.values()), counts
    return {k: v // steps for k, v in counts.items()}


# ------------------------------------------------------------------------------ scenarios
def scenario_eager(rank: int, world_size: int) -> None:
    """Eager parity: ours vs torchtitan's all-to-all vs EP=1, three SGD steps."""
    from deepep_ops.torchtitan import DeepEPOpsTokenDispatcher

    refs = references(rank, world_size, STATIC_TOKENS)
    assert isinstance(refs["dispatcher"], DeepEPOpsTokenDispatcher), type(refs["dispatcher"])
    # The steps move the weights: later steps are not reruns of the first.
    assert refs["weight_change"] > 1e-2, refs["weight_change"]
    # Every local expert got tokens (its gradient is not all zero) on every step.
    for rec in refs["ep1"]:
        for name in EXPERT_WEIGHTS:
            g = rec[f"routed_experts.inner_experts.{name}"]
            assert bool((g.flatten(1).abs().amax(dim=1) > 0).all()), f"an expert of rank {rank} got no token"
    tables = {
        "ours vs EP=1": errors(refs["ours"], refs["ep1"]),
        "all_to_all vs EP=1": errors(refs["a2a"], refs["ep1"]),
        "ours vs all_to_all": errors(refs["ours"], refs["a2a"]),
    }
    RESULTS["eager"] = dict(tables=tables, calls=_per_step(refs["calls"], len(STATIC_TOKENS)),
                            weight_change=refs["weight_change"])
    assert_close(tables["all_to_all vs EP=1"], HARNESS_RTOL, "torchtitan all_to_all vs EP=1 (the harness)")
    assert_close(tables["ours vs EP=1"], GRAD_RTOL, "ours vs EP=1")
    assert_close(tables["ours vs all_to_all"], GRAD_RTOL, "ours vs torchtitan all_to_all")
    # One dispatch and one combine per step; backward: one of each the other way.
    assert RESULTS["eager"]["calls"] == dict.fromkeys(CallCounter.KINDS, 1), RESULTS["eager"]["calls"]


def scenario_eager_aligned_and_empty(rank: int, world_size: int) -> None:
    """expert_alignment=8 (zero padding rows, zero scores) and steps where a rank has no token."""
    refs = references(rank, world_size, EMPTY_RANK_TOKENS)
    mesh = _mesh(world_size)
    model = Model(build("ours", refs["state"], mesh, expert_alignment=ALIGNMENT))
    dispatcher = model.moe.routed_experts.token_dispatcher
    counts_seen = []
    dispatch = dispatcher.dispatch

    def recording_dispatch(*args):
        rows, counts, metadata = dispatch(*args)
        counts_seen.append((counts.tolist(), int(metadata.handle.num_unaligned_recv_tokens_per_expert.sum())))
        assert rows.shape[0] == int(counts.sum()), (rows.shape, counts)
        return rows, counts, metadata

    dispatcher.dispatch = recording_dispatch
    got = train(model, rank, EMPTY_RANK_TOKENS, mesh.get_group())
    del dispatcher.dispatch
    tables = {"aligned vs EP=1": errors(got, refs["ep1"]), "unaligned vs EP=1": errors(refs["ours"], refs["ep1"]),
              "all_to_all vs EP=1": errors(refs["a2a"], refs["ep1"])}
    RESULTS["aligned, empty rank"] = dict(tables=tables, counts=counts_seen)
    assert all(c % ALIGNMENT == 0 for step, _ in counts_seen for c in step), counts_seen
    # Padding rows were there (and got zero scores): more rows than (token, expert) pairs.
    assert sum(sum(step) - real for step, real in counts_seen) > 0, counts_seen
    assert sum(real for _, real in counts_seen) > 0, counts_seen
    assert_close(tables["all_to_all vs EP=1"], HARNESS_RTOL, "torchtitan all_to_all vs EP=1 (the harness)")
    assert_close(tables["unaligned vs EP=1"], GRAD_RTOL, "ours vs EP=1")
    assert_close(tables["aligned vs EP=1"], GRAD_RTOL, "ours (expert_alignment=8) vs EP=1")


def scenario_torchtitan_parallelize(rank: int, world_size: int) -> None:
    """Ours through torchtitan's own EP wiring: ``set_moe_sharding_config`` and
    ``MoE.parallelize(ParallelDims(dp_shard=R, ep=R))`` under its default
    ``spmd_types`` backend and SPMD context (the local region around
    ``RoutedExperts``, experts sharded by torchtitan), eager and compiled
    (aot_eager, fullgraph): equal to the hand-wired run of :func:`scenario_eager`.

    torchtitan's all-to-all dispatcher cannot run this way on gloo (its uneven
    ``spmd.all_to_all`` goes through ``dist.all_to_all``, which gloo refuses for
    unequal chunks), hence the hand wiring of the three-way comparison.
    """
    from torchtitan.distributed.parallel_dims import ParallelDims
    from torchtitan.distributed.utils import get_spmd_backend, get_spmd_context, set_spmd_backend
    from torchtitan.models.common.moe_sharding import set_moe_sharding_config

    from deepep_ops.torchtitan import DeepEPOpsTokenDispatcher

    import spmd_types as spmd

    # GroupedExperts' layout, as torchtitan's qwen3 / deepseek_v3 sharding passes it.
    expert_layout = {"w1_EFD": spmd.S(1), "w2_EDF": spmd.S(2), "w3_EFD": spmd.S(1)}
    refs = references(rank, world_size, STATIC_TOKENS)
    previous = get_spmd_backend()
    set_spmd_backend("spmd_types")
    try:
        dims = ParallelDims(dp_replicate=1, dp_shard=world_size, cp=1, tp=1, pp=1, ep=world_size,
                            world_size=world_size, spmd_backend="spmd_types")
        dims.build_mesh()
        out = {}
        with get_spmd_context(parallel_dims=dims)():
            for backend in (None, "aot_eager"):
                cfg = moe_config("ours")
                set_moe_sharding_config(cfg, enable_ep=True, enable_sp=False,
                                        expert_param_layout=expert_layout)
                moe = cfg.build()
                moe.load_state_dict(refs["state"])
                moe.parallelize(dims)
                dispatcher = moe.routed_experts.token_dispatcher
                assert isinstance(dispatcher, DeepEPOpsTokenDispatcher) and dispatcher.buffer is not None, dispatcher
                el = E // world_size
                assert moe.routed_experts.inner_experts.w1_EFD.shape[0] == el, moe.routed_experts.inner_experts.w1_EFD.shape
                model = Model(moe)
                frames = compile_blocks(model, backend) if backend else None
                breaks0 = graph_breaks()
                got = train(model, rank, STATIC_TOKENS, dims.get_mesh("ep").get_group())
                out[backend or "eager"] = dict(
                    frames=None if frames is None else frames.frame_count, breaks=graph_breaks() - breaks0,
                    vs_ep1=errors(got, refs["ep1"]), vs_hand_wired=errors(got, refs["ours"]),
                )
    finally:
        set_spmd_backend(previous)
    RESULTS["torchtitan parallelize"] = out
    for name, res in out.items():
        assert res["breaks"] == 0, (name, res["breaks"])
        assert res["frames"] in (None, 1), (name, res["frames"])
        assert_close(res["vs_ep1"], GRAD_RTOL, f"parallelize, {name} vs EP=1")
        assert_close(res["vs_hand_wired"], 0.0, f"parallelize, {name} vs the hand-wired eager run")


def _compiled(rank: int, world_size: int, backend: str, tokens: List[List[int]], max_frames: int) -> dict:
    refs = references(rank, world_size, tokens)
    mesh = _mesh(world_size)
    model = Model(build("ours", refs["state"], mesh))
    counter = CallCounter(model)
    frames = compile_blocks(model, backend)
    breaks0 = graph_breaks()
    t0 = time.perf_counter()
    got = train(model, rank, tokens, mesh.get_group())
    res = dict(
        frames=frames.frame_count, breaks=graph_breaks() - breaks0, seconds=time.perf_counter() - t0,
        calls=_per_step(counter.restore(), len(tokens)),
        vs_ep1=errors(got, refs["ep1"]), vs_eager=errors(got, refs["ours"]),
    )
    RESULTS[f"{backend}, {'varying' if tokens is VARYING_TOKENS else 'static'} T"] = res
    assert res["breaks"] == 0, res["breaks"]
    assert 1 <= res["frames"] <= max_frames, res["frames"]
    assert res["calls"] == dict.fromkeys(CallCounter.KINDS, 1), res["calls"]
    assert_close(res["vs_ep1"], GRAD_RTOL, f"{backend} vs EP=1")
    return res


def scenario_aot_eager(rank: int, world_size: int) -> None:
    """aot_eager, fullgraph: one frame, no break, bitwise equal to eager."""
    res = _compiled(rank, world_size, "aot_eager", STATIC_TOKENS, max_frames=1)
    assert_close(res["vs_eager"], 0.0, "aot_eager vs eager")


def scenario_inductor(rank: int, world_size: int) -> None:
    """Inductor, fullgraph: one frame, no break, within bf16 tolerance of eager and EP=1."""
    res = _compiled(rank, world_size, "inductor", STATIC_TOKENS, max_frames=1)
    assert_close(res["vs_eager"], GRAD_RTOL, "inductor vs eager")


def scenario_aot_eager_varying_tokens(rank: int, world_size: int) -> None:
    """T changes between steps: Dynamo's automatic dynamic shapes recompile once, no break."""
    res = _compiled(rank, world_size, "aot_eager", VARYING_TOKENS, max_frames=2)
    assert_close(res["vs_eager"], 0.0, "aot_eager vs eager")


def _selective_ac(rank: int, world_size: int, compile_backend: Optional[str]) -> None:
    from torchtitan.distributed.activation_checkpoint import SelectiveAC

    from deepep_ops.torchtitan import DeepEPOpsSelectiveAC

    refs = references(rank, world_size, STATIC_TOKENS)
    mesh = _mesh(world_size)
    # aot_eager is bitwise equal to eager (scenario_aot_eager): one baseline for both.
    baseline = refs["ours"]
    out = {}
    for name, ac in (("torchtitan SelectiveAC", SelectiveAC), ("DeepEPOpsSelectiveAC", DeepEPOpsSelectiveAC)):
        model = Model(build("ours", refs["state"], mesh))
        counter = CallCounter(model)
        ac.Config().build().apply(model)
        frames = None
        if compile_backend is not None:
            frames = compile_blocks(model, compile_backend)
        breaks0 = graph_breaks()
        got = train(model, rank, STATIC_TOKENS, mesh.get_group())
        out[name] = dict(calls=_per_step(counter.restore(), len(STATIC_TOKENS)),
                         frames=None if frames is None else frames.frame_count,
                         breaks=graph_breaks() - breaks0, vs_no_ac=errors(got, baseline))
    RESULTS[f"selective AC, {compile_backend or 'eager'}"] = out
    for name, res in out.items():
        # Checkpointing changes no number.
        assert_close(res["vs_no_ac"], 0.0, f"{name} vs no AC")
        assert res["breaks"] == 0, (name, res["breaks"])
        assert res["frames"] in (None, 1), (name, res["frames"])
    ours, theirs = out["DeepEPOpsSelectiveAC"]["calls"], out["torchtitan SelectiveAC"]["calls"]
    # With our ops saved the backward communicates only its own way: no second dispatch.
    assert ours == dict.fromkeys(CallCounter.KINDS, 1), ours
    # Without them torchtitan's policy recomputes (re-communicates) the dispatch.
    assert theirs["dispatch"] == 2, theirs


def scenario_selective_ac_eager(rank: int, world_size: int) -> None:
    """torchtitan SelectiveAC, eager: its save list vs ours, backend calls per step."""
    _selective_ac(rank, world_size, None)


def scenario_selective_ac_aot_eager(rank: int, world_size: int) -> None:
    """The same, compiled (aot_eager, fullgraph): the partitioner applies the policy."""
    _selective_ac(rank, world_size, "aot_eager")


def documented_commands() -> List[List[str]]:
    """The arguments after ``-m torchtitan.train`` of every command in docs/torchtitan.md."""
    commands = []
    for _indent, block in re.findall(r"^( *)```bash\n(.*?)^\1```", DOC.read_text(), re.S | re.M):
        if "-m torchtitan.train" in block:
            words = shlex.split(block.replace("\\\n", " "))
            commands.append(words[words.index("torchtitan.train") + 1:])
    return commands


def scenario_command_line(rank: int, world_size: int) -> None:
    """docs/torchtitan.md's command line parses, and its overrides install ours (rank 0, no GPU)."""
    if rank != 0:
        return
    from torchtitan.config import ConfigManager, apply_overrides
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    from deepep_ops.torchtitan import DeepEPOpsSelectiveAC, DeepEPOpsTokenDispatcher

    commands = documented_commands()
    assert len(commands) == 2, commands
    checked = []
    for args in commands:
        config = ConfigManager().parse_args(args)
        model_config = config.model_spec.model
        # What Trainer.__init__ does before building the model.
        model_config.update_from_config(config=config)
        lines = apply_overrides(config.override, config)
        config._validate_cuda_graphs()
        dispatchers = list(model_config.traverse(LocalTokenDispatcher.Config))
        assert dispatchers and len(lines) == len(dispatchers) + 1, lines
        training = config.training
        for fqn, cfg, _, _ in dispatchers:
            assert type(cfg) is DeepEPOpsTokenDispatcher.Config, (fqn, type(cfg))
            assert cfg.num_max_tokens_per_rank == training.local_batch_size * training.seq_len, (fqn, cfg)
            assert cfg.hidden_dim == model_config.dim, (fqn, cfg)
        assert type(config.activation_checkpoint) is DeepEPOpsSelectiveAC.Config, type(config.activation_checkpoint)
        assert config.compile.enable and "model" in config.compile.components, config.compile
        assert config.parallelism.expert_parallel_degree > 1, config.parallelism
        assert config.training.disable_cuda_graphs, config.training
        # The model builds with our dispatcher in it (on the meta device: no memory, no GPU).
        with torch.device("meta"):
            model = model_config.build()
        built = [m.token_dispatcher for m in model.modules() if hasattr(m, "token_dispatcher")]
        assert len(built) == len(dispatchers), (len(built), len(dispatchers))
        assert all(type(d) is DeepEPOpsTokenDispatcher for d in built), built
        checked.append(dict(args=args, moe_layers=len(dispatchers)))
    RESULTS["command lines"] = checked



# ------------------------------------------------------------------------------ unit checks (rank 0 only)
def _rank0(check: Callable[[], None]) -> Callable[[int, int], None]:
    def scenario(rank: int, world_size: int) -> None:
        if rank == 0:
            check()

    scenario.__doc__ = check.__doc__
    return scenario


def check_override_keeps_deepep_sizes() -> None:
    """The DeepEP config's torchtitan-filled sizes carry over; kwargs win."""
    from torchtitan.models.common.token_dispatcher import DeepEPTokenDispatcher

    from deepep_ops.torchtitan import DeepEPOpsTokenDispatcher, overrides

    src = DeepEPTokenDispatcher.Config(num_experts=8, top_k=2, num_max_tokens_per_rank=1024, hidden_dim=512)
    cfg = overrides.token_dispatcher(src)
    assert type(cfg) is DeepEPOpsTokenDispatcher.Config
    assert (cfg.num_experts, cfg.top_k, cfg.num_max_tokens_per_rank, cfg.hidden_dim) == (8, 2, 1024, 512)
    assert (cfg.expert_alignment, cfg.backend) == (1, "auto")
    cfg = overrides.token_dispatcher(src, num_max_tokens_per_rank=64, backend="reference")
    assert (cfg.num_max_tokens_per_rank, cfg.hidden_dim, cfg.backend) == (64, 512, "reference")


def check_override_takes_pad_multiple_as_alignment() -> None:
    """TorchAO's pad_multiple becomes expert_alignment unless the kwarg says otherwise."""
    from torchtitan.models.common.token_dispatcher import TorchAOTokenDispatcher

    from deepep_ops.torchtitan import overrides

    src = TorchAOTokenDispatcher.Config(num_experts=8, top_k=2, pad_multiple=16)
    assert overrides.token_dispatcher(src, num_max_tokens_per_rank=64, hidden_dim=256).expert_alignment == 16
    cfg = overrides.token_dispatcher(src, num_max_tokens_per_rank=64, hidden_dim=256, expert_alignment=32)
    assert cfg.expert_alignment == 32


def check_override_names_missing_sizes() -> None:
    """An all-to-all config has no sizes: the error names the kwargs to pass."""
    import pytest
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher

    from deepep_ops.torchtitan import overrides

    src = AllToAllTokenDispatcher.Config(num_experts=8, top_k=2)
    with pytest.raises(ValueError, match="num_max_tokens_per_rank or hidden_dim.*pass num_max_tokens_per_rank, hidden_dim"):
        overrides.token_dispatcher(src)
    with pytest.raises(ValueError, match="has no hidden_dim"):
        overrides.token_dispatcher(src, num_max_tokens_per_rank=64)


def check_config_rejects_bad_values() -> None:
    """Each bad Config value is a ValueError naming the field."""
    import pytest

    from deepep_ops.torchtitan import DeepEPOpsTokenDispatcher

    for field, value in (("num_max_tokens_per_rank", 0), ("hidden_dim", -256), ("expert_alignment", True),
                         ("backend", "nccl")):
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


def check_init_buffer_checks_before_communicating() -> None:
    """hidden_dim % 256, E % R and missing sizes fail before the process group is touched."""
    import pytest

    from deepep_ops.torchtitan import DeepEPOpsTokenDispatcher

    for kwargs, match in ((dict(hidden_dim=320), "hidden_dim must be a multiple of 256"),
                          (dict(num_experts=7), r"num_experts \(7\) must be a multiple of the EP size \(2\)"),
                          (dict(hidden_dim=None), "needs hidden_dim")):
        cfg = dict(num_experts=8, top_k=2, num_max_tokens_per_rank=64, hidden_dim=256)
        cfg.update(kwargs)
        dispatcher = DeepEPOpsTokenDispatcher.Config(**cfg).build()
        with pytest.raises(ValueError, match=match):
            dispatcher.wire_meshes(ep_mesh=_Mesh())


def check_without_ep_mesh_it_reorders_locally() -> None:
    """EP=1 (no mesh): no buffer, torchtitan's local reorder; combine weights and sums."""
    from deepep_ops.torchtitan import DeepEPOpsTokenDispatcher

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


def check_selective_ac_override_keeps_fields_and_saves_our_ops() -> None:
    """The SAC override keeps every field; its save list is torchtitan's plus our five ops."""
    from torchtitan.distributed.activation_checkpoint import SelectiveAC, _get_default_save_ops

    from deepep_ops.torchtitan import DeepEPOpsSelectiveAC, communication_ops, overrides, save_ops

    src = SelectiveAC.Config(force_recompute_mm_shapes_by_fqns=["x.y"], preserve_rng_state=False)
    cfg = overrides.selective_ac(src)
    assert type(cfg) is DeepEPOpsSelectiveAC.Config
    assert (cfg.force_recompute_mm_shapes_by_fqns, cfg.preserve_rng_state) == (["x.y"], False)
    ops = communication_ops()
    assert {op.name() for op in ops} == {
        f"deepep_ops::{n}" for n in ("dispatch", "dispatch_exact", "combine", "cached_dispatch", "token_bucket")}
    assert not ops & set(_get_default_save_ops())  # what the override is for
    assert save_ops() == set(_get_default_save_ops()) | ops
    assert cfg.build().get_save_ops() == save_ops()


SCENARIOS: Dict[str, Callable[[int, int], None]] = {
    **{name[len("check_"):]: _rank0(fn) for name, fn in sorted(globals().items()) if name.startswith("check_")},
    "eager": scenario_eager,
    "eager_aligned_and_empty": scenario_eager_aligned_and_empty,
    "aot_eager": scenario_aot_eager,
    "torchtitan_parallelize": scenario_torchtitan_parallelize,
    "selective_ac_eager": scenario_selective_ac_eager,
    "selective_ac_aot_eager": scenario_selective_ac_aot_eager,
    "command_line": scenario_command_line,
    # The exhaustive tier (pytest -m slow): minutes on 2 cores.
    "inductor": scenario_inductor,
    "aot_eager_varying_tokens": scenario_aot_eager_varying_tokens,
}
SLOW_SCENARIOS = ("inductor", "aot_eager_varying_tokens")


def report(rank: int, world_size: int, names: tuple) -> dict:
    """Run ``names`` and return :data:`RESULTS` (benchmarks/torchtitan_parity.py)."""
    for name in names:
        SCENARIOS[name](rank, world_size)
    return {k: v for k, v in RESULTS.items()}
