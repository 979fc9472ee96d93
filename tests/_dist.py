"""Multi-process gloo harness for the CPU tests.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` ranks (spawn
start method), each initialises a gloo process group, runs
``fn(rank, world_size, *args)``, always destroys the process group, and sends
back either the (picklable, plain-Python) result or the formatted traceback.
Any failing rank raises in the pytest process with every rank's traceback.

``run_scenarios`` runs several named scenarios in one spawn, so the seconds
spent starting processes are paid once per world size; a failure in one
scenario is reported for that scenario only (as long as the ranks stayed in
step, which a status all-gather after every scenario checks).

Rendezvous goes through a ``FileStore`` in a fresh temporary directory, not a
TCP port: picking a port by binding port 0 and closing it races with every
other process on the machine (a port taken in between made rank 0 fail with
"address already in use", or join a foreign store). Gloo's own connections
bind port 0 and keep it, so nothing here chooses a port.
"""

from __future__ import annotations

import os
import queue
import shutil
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Sequence

import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60


def _worker(
    rank: int,
    world_size: int,
    init_method: str,
    fn: Callable,
    args: tuple,
    sys_path: List[str],
    gloo_timeout_s: float,
    env: Dict[str, str],
    out_q,
) -> None:
    # Spawned children re-import this module by name; make the repo and tests importable.
    for p in reversed(sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    os.environ.update(env)  # before torch is imported here
    import warnings

    # As in the pytest process (pyproject's filterwarnings): a DeprecationWarning
    # raised from the project's code is an error in the ranks too.
    warnings.filterwarnings("error", category=DeprecationWarning, module=r"(deepep_ops|fake_impls)(\.|$)")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # ranks share 2 cores
    try:
        dist.init_process_group(
            "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=gloo_timeout_s),
        )
        try:
            result = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - everything goes back to pytest
        result = ("error", traceback.format_exc())
    out_q.put((rank, result))


class DistributedError(AssertionError):
    pass


def run_distributed(
    fn: Callable,
    world_size: int,
    *args,
    timeout: float = 240.0,
    gloo_timeout_s: float = COLLECTIVE_TIMEOUT_S,
    env: Optional[Dict[str, str]] = None,
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the per-rank results.

    Args:
        timeout: seconds for the whole run.
        gloo_timeout_s: the process group's collective timeout (compile tests need
            more: one rank may still be compiling while the other waits).
        env: environment variables set in each child before torch is imported.
    """
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="deepep_ops_store_")
    init_method = "file://" + os.path.join(store_dir, "store")
    here = os.path.dirname(os.path.abspath(__file__))
    sys_path = [os.path.dirname(here), here]
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, init_method, fn, args, sys_path, gloo_timeout_s, dict(env or {}), out_q),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: Dict[int, tuple] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            try:
                rank, res = out_q.get(timeout=1.0)
                results[rank] = res
                continue
            except queue.Empty:
                pass
            dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
            if dead:
                # give the queue a moment in case the result is still in flight
                time.sleep(0.5)
                while True:
                    try:
                        rank, res = out_q.get_nowait()
                        results[rank] = res
                    except queue.Empty:
                        break
                for r in dead:
                    if r not in results:
                        results[r] = ("error", f"rank {r} died with exit code {procs[r].exitcode} and no result")
            if time.monotonic() > deadline:
                for r in range(world_size):
                    results.setdefault(r, ("error", f"rank {r} timed out after {timeout}s"))
    finally:
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.kill()  # only processes we started
                p.join()
        shutil.rmtree(store_dir, ignore_errors=True)
    errors = [f"--- rank {r} ---\n{res[1]}" for r, res in sorted(results.items()) if res[0] != "ok"]
    if errors:
        raise DistributedError(f"{fn.__name__} failed on {len(errors)}/{world_size} ranks:\n" + "\n".join(errors))
    return [results[r][1] for r in range(world_size)]


def run_scenarios(rank: int, world_size: int, module_name: str, names: Sequence[str]) -> Dict[str, Optional[str]]:
    """Spawned entry point: run ``module.SCENARIOS[name](rank, world_size)`` for each name.

    Returns ``{name: None | traceback}``. After every scenario the ranks all-gather
    their status; if that fails (ranks out of step after an error) the remaining
    scenarios are reported as not run.
    """
    import importlib

    import torch.distributed as dist

    module = importlib.import_module(module_name)
    out: Dict[str, Optional[str]] = {}
    broken = None
    for name in names:
        if broken is not None:
            out[name] = f"not run: process group unusable after scenario {broken!r}"
            continue
        try:
            module.SCENARIOS[name](rank, world_size)
            out[name] = None
        except BaseException:  # noqa: BLE001
            out[name] = traceback.format_exc()
        try:
            statuses = [None] * world_size
            dist.all_gather_object(statuses, out[name] is None)
        except BaseException:  # noqa: BLE001
            out[name] = (out[name] or "") + "\nstatus all-gather failed:\n" + traceback.format_exc()
            broken = name
    return out


_SCENARIO_CACHE: Dict[tuple, list] = {}


def scenario_results(module_name: str, names: Sequence[str], world_size: int) -> list:
    """Run (once per module/world size, cached) all scenarios; per-rank dicts of name -> traceback|None."""
    key = (module_name, tuple(names), world_size)
    if key not in _SCENARIO_CACHE:
        try:
            _SCENARIO_CACHE[key] = run_distributed(run_scenarios, world_size, module_name, tuple(names))
        except DistributedError as e:  # the whole spawn failed: every scenario reports it
            _SCENARIO_CACHE[key] = [{n: str(e) for n in names}] * world_size
    return _SCENARIO_CACHE[key]


def assert_scenario_passed(module_name: str, names: Sequence[str], world_size: int, name: str) -> None:
    per_rank = scenario_results(module_name, names, world_size)
    failures = [f"--- rank {r} ---\n{res[name]}" for r, res in enumerate(per_rank) if res[name] is not None]
    if failures:
        raise AssertionError(f"scenario {name!r} (world size {world_size}) failed:\n" + "\n".join(failures))
