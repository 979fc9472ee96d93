"""Spawn harness for the vLLM tests: N gloo ranks (timeout 120 s), results or tracebacks back."""

from __future__ import annotations

import os
import queue
import socket
import sys
import traceback
from datetime import timedelta
from typing import Callable

GLOO_TIMEOUT = timedelta(seconds=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, paths, out_q):
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=GLOO_TIMEOUT
        )
        try:
            res = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        res = ("error", traceback.format_exc())
    out_q.put((rank, res))


def spawn(fn: Callable, world_size: int, *args, timeout: float = 300.0) -> list:
    """``fn(rank, world_size, *args)`` on each rank; per-rank results, or AssertionError with tracebacks."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [os.path.dirname(here), here]
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, paths, out_q), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results = {}
    try:
        while len(results) < world_size:
            try:
                rank, res = out_q.get(timeout=timeout)
            except queue.Empty:
                break
            results[rank] = res
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [f"--- rank {r} ---\n{results[r][1] if r in results else 'no result (timeout or crash)'}"
              for r in range(world_size) if results.get(r, ("error",))[0] != "ok"]
    if errors:
        raise AssertionError(f"{fn.__name__} failed:\n" + "\n".join(errors))
    return [results[r][1] for r in range(world_size)]
