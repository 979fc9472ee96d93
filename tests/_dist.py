"""Multi-process gloo harness for the CPU tests, and hang detection for subprocesses.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` ranks (spawn
start method), each initialises a gloo process group, runs
``fn(rank, world_size, *args)``, always destroys the process group, and sends
back either the (picklable, plain-Python) result or the formatted traceback.
Any failing rank raises in the pytest process with every rank's traceback.

``run_scenarios`` runs several named scenarios in one spawn, so the seconds
spent starting processes are paid once per world size; a failure in one
scenario is reported for that scenario only (as long as the ranks stayed in
step, which a status all-gather after every scenario checks).

Hangs, not slowness: no wall-clock limit here scales with the machine's load,
so none is used to decide a test failed. :class:`ProgressWatch` reads the CPU
time the watched processes (ranks, and everything they started) have used; a
run fails as hung only when none of them used CPU for ``stall_s`` seconds
(``DEEPEP_OPS_TEST_STALL_S``, default 120): on a machine with load 10 a
computing rank still gets a fifth of a core, while ranks blocked on each other
use none. Each rank's stacks are dumped (``faulthandler``) into the error. A
rank that waits in a collective for a peer that is still computing (one rank
compiling while the other already dispatched) is slowness, so the gloo
timeout is a generous bound (``COLLECTIVE_TIMEOUT_S``), not the hang detector;
tests that check a rank gives up before the collective timeout pass a short
one themselves. :func:`run_watched` is ``subprocess.run`` with the same rule.

Start-up: ranks are forked from a fork server that imported torch, deepep_ops
and the dense reference once per pytest process (:data:`PRELOAD`), so a group
of ranks starts in a fraction of a second instead of every rank importing torch
(~2 CPU-s) and deepep_ops (~2 CPU-s more) again. Each rank still is a new
process (fresh Dynamo and Inductor state, its own process group), with the
environment of the pytest process at the call and a fresh random seed, as a
spawned one would have. ``env=`` or ``fresh_interpreter=True`` spawns a new
interpreter instead (for environment variables that must be set before torch
is imported).

What a rank prints (Python and C++) is replayed into the output of the test
that ran it. :func:`start_early` queues an expensive spawn in a background
thread once collection is done (``tests/conftest.py`` calls each collected
module's ``start_early()``), so it runs on the second core while the pytest
process works through single-process tests; :func:`result_once` (and
:func:`scenario_results`) takes its result, or runs it then and there.

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
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Callable, Dict, Hashable, List, Optional, Sequence

import torch.multiprocessing as mp

#: The process groups' collective timeout: a bound on how long a rank waits for
#: a peer that is still computing (compiling, on a loaded machine), not a hang
#: detector (that is :class:`ProgressWatch`).
COLLECTIVE_TIMEOUT_S = 300


#: Imported once in the fork server that ranks are forked from.
PRELOAD = ("torch", "torch.distributed", "deepep_ops", "dense_reference")


def _context(fresh_interpreter: bool):
    if fresh_interpreter or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))  # read when the server starts (the first call)
    return ctx


def stop_fork_server() -> None:
    """Stop the fork server (pytest's exit, tests/conftest.py), so that the CPU time
    of the ranks forked from it is accounted to the pytest process (``time``)."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    stop = getattr(server, "_stop", None)  # private, Python >= 3.8: closes its pipe and waits for it
    if stop is not None:
        stop()


def stall_seconds() -> float:
    """Seconds without CPU progress after which a run counts as hung (``DEEPEP_OPS_TEST_STALL_S``, default 120)."""
    raw = os.environ.get("DEEPEP_OPS_TEST_STALL_S", "")
    try:
        value = float(raw) if raw else 120.0
    except ValueError:
        raise ValueError(f"DEEPEP_OPS_TEST_STALL_S must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"DEEPEP_OPS_TEST_STALL_S must be > 0, got {raw!r}")
    return value


# ---------------------------------------------------------------------------- progress
def _proc_table() -> Optional[Dict[int, tuple]]:
    """``{pid: (ppid, cpu seconds incl. reaped children)}`` from /proc; None without a readable /proc."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    table = {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state ppid ...
        # man proc(5): utime, stime, cutime, cstime are fields 14..17 (here 11..14, 0-based after comm).
        table[int(name)] = (int(fields[1]), sum(int(v) for v in fields[11:15]) / tick)
    return table


def tree_cpu_seconds(pids: Sequence[int]) -> Optional[float]:
    """User + system CPU seconds of ``pids`` and all their descendants (reaped children included)."""
    per_root = _tree_cpu_by_root(pids)
    return None if per_root is None else sum(per_root.values())


def _tree_cpu_by_root(pids: Sequence[int]) -> Optional[Dict[int, float]]:
    """``{pid: CPU seconds of pid's process tree}`` for the pids that still exist."""
    table = _proc_table()
    if table is None:
        return None
    children: Dict[int, List[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    for root in pids:
        if root not in table:
            continue
        total, todo, seen = 0.0, [root], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            total += table[pid][1]
            todo.extend(children.get(pid, ()))
        out[root] = total
    return out


def _own_cpu_seconds() -> float:
    """This process's CPU seconds, its children's (compilers) included where /proc tells."""
    value = tree_cpu_seconds([os.getpid()])
    return time.process_time() if value is None else value


class ProgressWatch:
    """Decides when a group of processes is hung: none of them used CPU for ``stall_s`` seconds.

    ``check()`` returns None while the processes make progress, else why they
    count as hung. Progress is the CPU time each process tree gained since the
    last check (a process that exits takes its total with it, which is not a
    loss of progress for the others). ``hard_s`` (optional) is a wall-clock cap
    on top, for a caller that wants one. Without /proc (not Linux) no progress
    can be read and only ``hard_s`` applies.
    """

    #: CPU seconds the group must use to count as progress (gloo's idle threads use ~0).
    MIN_PROGRESS_CPU_S = 0.2

    def __init__(self, pids: Callable[[], Sequence[int]], stall_s: Optional[float] = None,
                 hard_s: Optional[float] = None, *, clock: Callable[[], float] = time.monotonic,
                 cpu_by_root: Callable[[Sequence[int]], Optional[Dict[int, float]]] = None) -> None:
        self.pids, self.stall_s, self.hard_s = pids, stall_s or stall_seconds(), hard_s
        self.clock, self.cpu_by_root = clock, cpu_by_root or _tree_cpu_by_root  # (injectable for its test)
        self.t0 = self.t_progress = clock()
        self.last: Dict[int, float] = {}  # per root pid: its tree's CPU seconds at the last check
        self.cpu = 0.0  # CPU seconds gained over all checks
        self.cpu_mark = 0.0  # self.cpu when progress was last seen

    def check(self) -> Optional[str]:
        now = self.clock()
        per_root = self.cpu_by_root(self.pids())
        if per_root is not None:
            for root, cpu in per_root.items():
                self.cpu += max(cpu - self.last.get(root, 0.0), 0.0)
                self.last[root] = cpu
            if self.cpu - self.cpu_mark >= self.MIN_PROGRESS_CPU_S:
                self.cpu_mark, self.t_progress = self.cpu, now
            elif now - self.t_progress > self.stall_s:
                return (f"hung: no CPU progress for {now - self.t_progress:.0f} s (stall limit {self.stall_s:.0f} s, "
                        f"DEEPEP_OPS_TEST_STALL_S) after {now - self.t0:.0f} s and {self.cpu:.1f} CPU-s")
        if self.hard_s is not None and now - self.t0 > self.hard_s:
            return f"timed out after {self.hard_s:.0f} s (hard limit; {self.cpu:.1f} CPU-s used)"
        return None


# ---------------------------------------------------------------------------- ranks
def _worker(
    rank: int,
    world_size: int,
    init_method: str,
    fn: Callable,
    args: tuple,
    sys_path: List[str],
    gloo_timeout_s: float,
    env: Dict[str, str],
    parent_env: Optional[Dict[str, str]],
    stacks_path: str,
    output_path: str,
    out_q,
) -> None:
    import faulthandler
    import threading

    # Everything the rank prints (Python and C++) goes to a file the caller replays
    # into the test's output (a forked rank would otherwise write to whatever the
    # fork server's stdout was when it started).
    out_fd = os.open(output_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.close(out_fd)

    def _exit_when_orphaned(parent: int) -> None:  # pytest (and with it our parent) went away
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(3)

    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()

    if parent_env is not None:  # forked from the fork server: the caller's environment, not the server's
        os.environ.clear()
        os.environ.update(parent_env)

    # The harness sends SIGUSR1 before killing a hung rank: every thread's stack goes here.
    stacks = open(stacks_path, "w")
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
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
    torch.seed()  # as a fresh process would (a forked one inherits the server's state)
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
    timeout: Optional[float] = None,
    stall_s: Optional[float] = None,
    gloo_timeout_s: float = COLLECTIVE_TIMEOUT_S,
    env: Optional[Dict[str, str]] = None,
    fresh_interpreter: bool = False,
    outputs: Optional[List[str]] = None,
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the per-rank results.

    Args:
        timeout: optional wall-clock cap for the whole run (default none: a busy
            machine makes runs slow, not wrong; hangs are caught by ``stall_s``).
        stall_s: the run fails as hung when no rank used CPU for this long
            (default :func:`stall_seconds`); every live rank's stacks go into the error.
        gloo_timeout_s: the process group's collective timeout.
        env: environment variables set in each child before torch is imported
            (implies ``fresh_interpreter``).
        fresh_interpreter: spawn new interpreters instead of forking from the
            fork server (slower start: every rank imports torch).
        outputs: a list to receive each rank's output (stdout and stderr, in
            rank order) instead of it being written into the test's output.
    """
    fresh = fresh_interpreter or env is not None
    ctx = _context(fresh)
    parent_env = None if fresh else dict(os.environ)
    out_q = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="deepep_ops_store_")
    init_method = "file://" + os.path.join(store_dir, "store")
    stacks = [os.path.join(store_dir, f"rank{r}.stacks") for r in range(world_size)]
    output_paths = [os.path.join(store_dir, f"rank{r}.out") for r in range(world_size)]
    here = os.path.dirname(os.path.abspath(__file__))
    sys_path = [os.path.dirname(here), here]
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, init_method, fn, args, sys_path, gloo_timeout_s, dict(env or {}), parent_env, stacks[r],
                  output_paths[r], out_q),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    watch = ProgressWatch(lambda: [p.pid for p in procs if p.pid is not None], stall_s=stall_s, hard_s=timeout)
    results: Dict[int, tuple] = {}
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
            why = "stopped: the test session ended" if stopping() else watch.check()
            if why is not None:
                _dump_stacks([p for r, p in enumerate(procs) if r not in results])
                for r in range(world_size):
                    if r not in results:
                        results[r] = ("error", f"rank {r} {why}; its stacks:\n{_read_tail(stacks[r])}")
    finally:
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.kill()  # only processes we started
                p.join()
        for r, path in enumerate(output_paths):
            text = _read_tail(path, limit=200_000, missing="")
            if outputs is not None:
                outputs.append(text)
            elif text:
                emit(f"--- rank {r} of {fn.__name__}: output ---\n{text}")
        shutil.rmtree(store_dir, ignore_errors=True)
    errors = [f"--- rank {r} ---\n{res[1]}" for r, res in sorted(results.items()) if res[0] != "ok"]
    if errors:
        raise DistributedError(f"{fn.__name__} failed on {len(errors)}/{world_size} ranks:\n" + "\n".join(errors))
    return [results[r][1] for r in range(world_size)]


def _dump_stacks(procs) -> None:
    for p in procs:
        if p.is_alive():
            try:
                os.kill(p.pid, signal.SIGUSR1)
            except OSError:
                pass
    time.sleep(1.0)
    for p in procs:
        if p.is_alive():
            p.kill()


def _read_tail(path: str, limit: int = 6000, missing: str = "(none)") -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return missing
    return text[-limit:] or missing


# ---------------------------------------------------------------------------- early starts
#: Set when the session ends: running spawns stop, queued ones are dropped.
_STOPPING = threading.Event()
_LOCAL = threading.local()  # .output: a list collecting a background job's output
_JOBS: Dict[Hashable, Future] = {}
_DONE: Dict[Hashable, tuple] = {}
_EXECUTOR: Optional[ThreadPoolExecutor] = None


def stopping() -> bool:
    """True once the test session ends: long waits give up (background jobs included)."""
    return _STOPPING.is_set()


def emit(text: str) -> None:
    """Output of ranks: into the current test's stdout, or kept for the test that consumes a background job."""
    buffer = getattr(_LOCAL, "output", None)
    if buffer is not None:
        buffer.append(text)
    else:
        sys.stdout.write(text)


def _background(fn: Callable, args: tuple, kwargs: dict) -> tuple:
    _LOCAL.output = []
    try:
        return "ok", fn(*args, **kwargs), "".join(_LOCAL.output)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
        return "error", e, "".join(_LOCAL.output)
    finally:
        _LOCAL.output = None


def start_early(key: Hashable, fn: Callable, *args, **kwargs) -> None:
    """Queue ``fn(*args, **kwargs)`` to run in a background thread, for :func:`result_once` ``(key, ...)``.

    While the pytest process runs single-process tests on one core, a queued
    spawn of ranks uses the other (jobs run one at a time, in the order queued).
    ``tests/conftest.py`` calls each collected test module's ``start_early()``
    once collection is done (not with ``DEEPEP_OPS_TEST_EARLY=0``).
    """
    global _EXECUTOR
    if key in _JOBS or key in _DONE or _STOPPING.is_set():
        return
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepep_ops_tests_early")
    _JOBS[key] = _EXECUTOR.submit(_background, fn, args, kwargs)


def result_once(key: Hashable, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, computed once per ``key`` in this pytest process.

    Takes the result of a :func:`start_early` job of that key (waiting for it if
    it runs; running it here if it has not started), replaying its output into
    the current test; raises its exception, if any, again on every call.
    """
    if key not in _DONE:
        job = _JOBS.pop(key, None)
        if job is not None and not job.cancel():
            status, value, output = job.result()
            sys.stdout.write(output)
        else:
            try:
                status, value = "ok", fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001
                status, value = "error", e
        _DONE[key] = (status, value)
    status, value = _DONE[key]
    if status == "error":
        raise value
    return value


def stop_background() -> None:
    """End of session: drop queued jobs, stop running spawns, wait for the thread."""
    _STOPPING.set()
    for job in _JOBS.values():
        job.cancel()
    if _EXECUTOR is not None:
        _EXECUTOR.shutdown(wait=True)


# ---------------------------------------------------------------------------- subprocesses
def run_watched(cmd: Sequence[str], *, stall_s: Optional[float] = None, timeout: Optional[float] = None,
                **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, ...)`` that fails only on a hang.

    The command runs in its own session; when it and its descendants used no
    CPU for ``stall_s`` seconds (or ``timeout``, an optional wall-clock cap,
    passed), the whole session is killed and ``subprocess.TimeoutExpired``
    raised with the output so far.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, start_new_session=True, **popen_kwargs)
        watch = ProgressWatch(lambda: [proc.pid], stall_s=stall_s, hard_s=timeout)
        why = None
        try:
            while proc.poll() is None:
                why = watch.check()
                if why is not None:
                    break
                try:
                    proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if proc.poll() is None or why is not None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if why is not None:
        raise subprocess.TimeoutExpired(cmd, watch.stall_s, output=stdout, stderr=f"{stderr}\n[{why}]")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


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
        t0, c0 = time.monotonic(), _own_cpu_seconds()
        try:
            module.SCENARIOS[name](rank, world_size)
            out[name] = None
        except BaseException:  # noqa: BLE001
            out[name] = traceback.format_exc()
        # Where a spawn's time goes (shown with pytest -rP / -s).
        print(f"SCENARIO {module_name}.{name} rank {rank}/{world_size}: {time.monotonic() - t0:.1f} s, "
              f"{_own_cpu_seconds() - c0:.1f} CPU-s", flush=True)
        try:
            statuses = [None] * world_size
            dist.all_gather_object(statuses, out[name] is None)
        except BaseException:  # noqa: BLE001
            out[name] = (out[name] or "") + "\nstatus all-gather failed:\n" + traceback.format_exc()
            broken = name
    return out


def _all_scenarios(module_name: str, names: tuple, world_size: int) -> list:
    try:
        return run_distributed(run_scenarios, world_size, module_name, names)
    except DistributedError as e:  # the whole spawn failed: every scenario reports it
        return [{n: str(e) for n in names}] * world_size


def scenario_results(module_name: str, names: Sequence[str], world_size: int) -> list:
    """Run (once per module/world size, cached) all scenarios; per-rank dicts of name -> traceback|None."""
    key = ("scenarios", module_name, tuple(names), world_size)
    return result_once(key, _all_scenarios, module_name, tuple(names), world_size)


def start_scenarios_early(module_name: str, names: Sequence[str], world_size: int) -> None:
    """:func:`start_early` for :func:`scenario_results` of the same arguments."""
    key = ("scenarios", module_name, tuple(names), world_size)
    start_early(key, _all_scenarios, module_name, tuple(names), world_size)


def assert_scenario_passed(module_name: str, names: Sequence[str], world_size: int, name: str) -> None:
    per_rank = scenario_results(module_name, names, world_size)
    failures = [f"--- rank {r} ---\n{res[name]}" for r, res in enumerate(per_rank) if res[name] is not None]
    if failures:
        raise AssertionError(f"scenario {name!r} (world size {world_size}) failed:\n" + "\n".join(failures))
