"""Spawn helper for the compile tests: gloo ranks with a 120 s collective timeout.

Like ``tests/_dist.py`` (whose ranks use a 60 s timeout), but compile tests need
more slack: one rank may still be inside an Inductor compile while the other
already waits in the first all-to-all. ``spawn(fn, world_size, *args)`` starts
``world_size`` processes (spawn start method), each initialises gloo on a fresh
port with ``timeout=timedelta(seconds=120)``, runs ``fn(rank, world_size,
*args)`` and returns its (picklable) result. Any rank that raises, dies or
times out makes ``spawn`` raise :class:`SpawnError` with every rank's traceback,
so a child failure is a pytest failure.
"""

from __future__ import annotations

import os
import queue
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Callable, Dict, List

import torch.multiprocessing as mp

GLOO_TIMEOUT = timedelta(seconds=120)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SpawnError(AssertionError):
    pass


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, sys_path: List[str], env: dict, out_q) -> None:
    for p in reversed(sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the machine's cores
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=GLOO_TIMEOUT
        )
        try:
            result = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - everything goes back to pytest
        result = ("error", traceback.format_exc())
    out_q.put((rank, result))


def spawn(fn: Callable, world_size: int, *args, timeout: float = 900.0, env: Dict[str, str] | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; per-rank results.

    ``env`` is applied in each child before torch is imported there.
    """
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    port = free_port()
    here = os.path.dirname(os.path.abspath(__file__))
    sys_path = [os.path.dirname(here), here]
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, sys_path, dict(env or {}), out_q), daemon=True)
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
            for r, p in enumerate(procs):
                if r not in results and p.exitcode not in (None, 0):
                    time.sleep(0.5)  # a result may still be in the pipe
                    try:
                        while True:
                            rk, res = out_q.get_nowait()
                            results[rk] = res
                    except queue.Empty:
                        pass
                    results.setdefault(r, ("error", f"rank {r} died with exit code {p.exitcode}"))
            if time.monotonic() > deadline:
                for r in range(world_size):
                    results.setdefault(r, ("error", f"rank {r} timed out after {timeout}s"))
    finally:
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.kill()  # only the processes started above
                p.join()
    errors = [f"--- rank {r} ---\n{res[1]}" for r, res in sorted(results.items()) if res[0] != "ok"]
    if errors:
        raise SpawnError(f"{getattr(fn, '__name__', fn)} failed on {len(errors)}/{world_size} ranks:\n" + "\n".join(errors))
    return [results[r][1] for r in range(world_size)]
