"""``--cpu-report``: wall and CPU seconds per test file, subprocesses and ranks included.

Loaded by tests/conftest.py. On a shared machine wall times move with the load;
CPU-seconds (user + system of the pytest process and everything it started)
move much less, so this is what to compare before and after a change to a test
file. A file's module-scoped work (a spawn shared by its tests) counts where it
runs: in that file's first test. With ``--cpu-report`` no spawn starts early
(tests/conftest.py), so each file's spawns count in that file; the session's
wall time is then longer than without it.
"""

from __future__ import annotations

import os
import resource
import time
from collections import defaultdict

import pytest


def _cpu_seconds() -> float:
    """CPU seconds of this process and all its descendants, live or reaped."""
    try:
        from _dist import tree_cpu_seconds

        value = tree_cpu_seconds([os.getpid()])
        if value is not None:
            return value
    except ImportError:
        pass
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class CpuReport:
    def __init__(self) -> None:
        self.files = defaultdict(lambda: [0.0, 0.0, 0])  # file -> [wall, cpu, tests]
        self.tests = {}  # nodeid -> (wall, cpu)
        self.t0, self.c0 = time.monotonic(), _cpu_seconds()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        t0, c0 = time.monotonic(), _cpu_seconds()
        yield
        row = self.files[item.location[0]]
        row[0] += time.monotonic() - t0
        row[1] += _cpu_seconds() - c0
        row[2] += 1
        self.tests[item.nodeid] = (time.monotonic() - t0, _cpu_seconds() - c0)

    def pytest_terminal_summary(self, terminalreporter):
        tr = terminalreporter
        wall, cpu = time.monotonic() - self.t0, _cpu_seconds() - self.c0
        tr.write_sep("=", "wall and CPU seconds per file (subprocesses and ranks included)")
        tr.write_line(f"{'file':48} {'tests':>5} {'wall s':>8} {'CPU s':>8}")
        for name, (w, c, n) in sorted(self.files.items(), key=lambda kv: -kv[1][1]):
            tr.write_line(f"{name:48} {n:5d} {w:8.1f} {c:8.1f}")
        in_tests = sum(r[1] for r in self.files.values())
        tr.write_line(f"{'all tests':48} {sum(r[2] for r in self.files.values()):5d} "
                      f"{sum(r[0] for r in self.files.values()):8.1f} {in_tests:8.1f}")
        tr.write_line(f"{'session (collection included)':48} {'':5} {wall:8.1f} {cpu:8.1f}   "
                      f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
        tr.write_line("most CPU-seconds by test (setup, call and teardown):")
        for nodeid, (w, c) in sorted(self.tests.items(), key=lambda kv: -kv[1][1])[:15]:
            tr.write_line(f"  {c:8.1f} CPU-s {w:8.1f} s  {nodeid}")


def pytest_addoption(parser):
    parser.addoption("--cpu-report", action="store_true", default=False,
                     help="print wall and CPU seconds per test file (subprocesses and ranks included)")


def pytest_configure(config):
    if config.getoption("cpu_report"):
        config.pluginmanager.register(CpuReport(), "deepep_ops_cpu_report")
