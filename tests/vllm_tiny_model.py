"""The tiny vLLM test model (now in the package: :mod:`deepep_ops.tiny_model`) and a
launcher of engine processes for the engine tests.

``write_tiny_mixtral(path)`` writes the model; :class:`Engines` starts
``dp_size`` processes of ``python -m deepep_ops.tiny_model`` (one DP rank each,
vLLM's offline SPMD mode) and collects their JSON results.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from deepep_ops.tiny_model import (  # noqa: F401  (re-exported for the tests)
    HIDDEN,
    INTERMEDIATE,
    NUM_EXPERTS,
    NUM_LAYERS,
    PROMPTS,
    TOP_K,
    dp_env,
    main,
    prompts_for_rank,
    write_tiny_mixtral,
)

REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Engines fail as hung past this many times their ``timeout`` even while using CPU.
HARD_LIMIT_FACTOR = 5

#: What a rank's log says when the DP master port was taken between picking and binding it.
_PORT_TAKEN = ("Address already in use", "EADDRINUSE")


class Engines:
    """``dp_size`` engine processes (offline SPMD DP), each in its own process group.

    Without ``port``, the DP master port is a free one picked by binding port 0;
    another process may take it before vLLM binds it, so a run whose ranks fail
    with "address already in use" is started again once on a new port.
    """

    def __init__(self, model, out_prefix, *, dp_size: int, ep: bool, eager: bool, env_extra=None,
                 timeout: float = 240.0, port: Optional[int] = None, extra_args=()):
        self.out_prefix, self.dp_size, self.timeout = out_prefix, dp_size, timeout
        self._cmd_args = (model, ep, eager, env_extra, extra_args)
        self._port_retries = 0 if port is not None else 1
        self._launch(_free_port() if port is None else port)

    def _launch(self, port: int) -> None:
        import subprocess

        model, ep, eager, env_extra, extra_args = self._cmd_args
        dp_size, out_prefix = self.dp_size, self.out_prefix
        bind = "|".join(str(r % (os.cpu_count() or 1)) for r in range(dp_size))
        self.procs, self.logs = [], []
        self.t0 = time.monotonic()
        for r in range(dp_size):
            env = dict(os.environ)
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            env.update(dp_env(r, dp_size, port, bind) if dp_size > 1 else {"VLLM_CPU_OMP_THREADS_BIND": "0"})
            env.update(env_extra or {})
            # The ranks import this tree's deepep_ops (the plugin and the runner).
            env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
            log = open(f"{out_prefix}.rank{r}.log", "w")
            self.logs.append(log.name)
            cmd = [sys.executable, "-m", "deepep_ops.tiny_model", "--model", str(model), "--out", f"{out_prefix}.rank{r}.json",
                   *(["--eager"] if eager else []), *(["--ep"] if ep else []), *extra_args]
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))
            log.close()

    def kill(self) -> None:
        import signal

        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.wait()

    def wait(self):
        """``(results, wall_s, logs)``; raises on a hang (after killing every group) or a non-zero exit.

        A hang: no engine process (or anything it started) used CPU for the
        stall limit (``tests/_dist.py``, ``DEEPEP_OPS_TEST_STALL_S``), or the run
        took over ``HARD_LIMIT_FACTOR`` × ``timeout`` (a loop that spins without
        finishing). A busy machine makes engines slow, not failed.
        """
        from _dist import ProgressWatch, stopping

        watch = ProgressWatch(lambda: [p.pid for p in self.procs], hard_s=HARD_LIMIT_FACTOR * self.timeout)
        try:
            while any(p.poll() is None for p in self.procs):
                why = "stopped: the test session ended" if stopping() else watch.check()
                if why is not None:
                    self.kill()
                    raise TimeoutError(f"engines {why} (expected within {self.timeout}s on an idle machine); "
                                       f"logs: {self.logs}")
                time.sleep(1.0)
        finally:
            # Engine children (workers) of an exited rank must not outlive it.
            self.kill()
        wall = time.monotonic() - self.t0
        bad = [(r, p.returncode) for r, p in enumerate(self.procs) if p.returncode != 0]
        if bad and self._port_retries > 0 and any(
            marker in Path(log).read_text(errors="replace") for log in self.logs for marker in _PORT_TAKEN
        ):
            self._port_retries -= 1
            self._launch(_free_port())
            return self.wait()
        if bad:
            raise RuntimeError(f"engine ranks exited with {bad}; logs: {self.logs}")
        results = [json.loads(Path(f"{self.out_prefix}.rank{r}.json").read_text()) for r in range(self.dp_size)]
        return results, wall, self.logs


def launch(model, out_prefix, **kwargs):
    """Start :class:`Engines` and wait for them."""
    return Engines(model, out_prefix, **kwargs).wait()


if __name__ == "__main__":
    sys.exit(main())
