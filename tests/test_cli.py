"""``python -m deepep_ops demo``: every bad option value is a usage error (exit 2)
naming the option and what it allows, raised before any rank starts.

Most cases call the parser in-process (``deepep_ops.demo.main`` exits before
spawning); a few run the real command line in a subprocess.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from _dist import run_watched
from deepep_ops import demo
from deepep_ops.__main__ import main as cli_main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD = [
    (["--world-size", "0"], "argument --world-size: must be an integer >= 1, got 0"),
    (["--world-size", "two"], "argument --world-size: must be an integer >= 1, got 'two'"),
    (["--world-size", "3"], "--experts must be a multiple of --world-size 3, got 8"),
    (["--world-size", "2000"], "--world-size must be in 1..1024, got 2000"),
    (["--reps", "0"], "argument --reps: must be an integer >= 1, got 0"),
    (["--topk", "9"], "--topk must be in 1..8 (<= --experts 8 and <= 32), got 9"),
    (["--topk", "0"], "argument --topk: must be an integer >= 1, got 0"),
    (["--capacity", "100"], "--capacity must be >= 200 (--prefill-tokens 200 and the largest decode batch 64), got 100"),
    (["--capacity", "32", "--prefill-tokens", "16"], "--capacity must be >= 64"),
    (["--hidden", "100"], "--hidden must be a multiple of 256 (DeepEP combine), got 100"),
    (["--experts", "4096", "--world-size", "1"], "--experts must be <= 2048 and <= 256 per rank"),
    (["--prefill-tokens", "-3"], "argument --prefill-tokens: must be an integer >= 1, got -3"),
    (["--threads", "-1"], "argument --threads: must be an integer >= 0, got -1"),
    (["--compile-backend", "tvm"], "argument --compile-backend: invalid choice: 'tvm'"),
    (["--backend", "nccl"], "argument --backend: invalid choice: 'nccl'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_value_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m deepep_ops demo"), err
    assert message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("argv,what", [(["--backend", "deepep"], "--backend deepep"), (["--device", "cuda"], "--device cuda")])
def test_gpu_options_without_gpu_fail_in_one_line(argv, what, capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(argv)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"python -m deepep_ops demo: error: {what} needs CUDA GPUs, and "
                    "torch.cuda.is_available() is False; use --device cpu"), last


def test_help_is_plain_text_with_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and ".. " not in out  # no raw reST
    flat = " ".join(out.split())  # help lines wrap at the terminal width
    for default in ("(default: reference)", "(default: 2)", "(default: 256)", "(default: inductor)", "(default: 30)"):
        assert default in flat, out
    assert "\nSpawns --world-size ranks" in out  # the description keeps its line breaks


def test_top_level_usage_errors(capsys):
    for argv, message in (([], "the following arguments are required: command"),
                          (["frobnicate"], "argument command: invalid choice: 'frobnicate' (choose from 'demo', 'train-demo')")):
        with pytest.raises(SystemExit) as info:
            cli_main(argv)
        assert info.value.code == 2
        assert message in capsys.readouterr().err


def _run(*argv):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    # Fails on a hang (no CPU progress), not on a slow start on a busy machine.
    return run_watched([sys.executable, "-m", "deepep_ops", *argv], env=env, cwd=REPO_ROOT)


def test_command_line_usage_errors():
    """The real entry point, in a subprocess: exit 2, one error line naming the option, no traceback."""
    for argv, message in ((["demo", "--world-size", "0"], "--world-size: must be an integer >= 1, got 0"),
                          (["demo", "--reps", "0"], "--reps: must be an integer >= 1, got 0"),
                          (["demo", "--topk", "9"], "--topk must be in 1..8")):
        proc = _run(*argv)
        assert proc.returncode == 2, (argv, proc.returncode, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stdout == "", proc.stdout  # nothing started


def test_command_line_help():
    proc = _run("--help")
    assert proc.returncode == 0 and "python -m deepep_ops COMMAND --help" in proc.stdout, proc
    assert "train-demo" in proc.stdout, proc
