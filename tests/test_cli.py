"""The command lines (``python -m deepep_ops demo|train-demo|tiny-model`` and the
tiny model's runner ``python -m deepep_ops.tiny_model``).

Every bad option value is a usage error: exit 2, one error line naming the
option and what it allows, no traceback, before any process starts or anything
heavy is imported. ``--help`` gives every option with its default and imports
nothing heavy; ``--version`` prints the package's version.

Most cases call the parsers in-process; a few run the real entry point in a
subprocess.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch

from _dist import run_watched
from deepep_ops import _cli, demo, tiny_model
from deepep_ops.__main__ import COMMANDS, main as cli_main, parse_command, run_command

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: (command, argv, what the error line must contain). The CLI bad-input table.
BAD = [
    ("demo", ["--world-size", "0"], "argument --world-size: must be an integer >= 1, got 0"),
    ("demo", ["--world-size", "two"], "argument --world-size: must be an integer >= 1, got 'two'"),
    ("demo", ["--world-size", "3"], "--experts must be a multiple of --world-size 3, got 8"),
    ("demo", ["--world-size", "2000"], "--world-size must be in 1..1024, got 2000"),
    ("demo", ["--reps", "0"], "argument --reps: must be an integer >= 1, got 0"),
    ("demo", ["--topk", "9"], "--topk must be in 1..8 (<= --experts 8 and <= 32), got 9"),
    ("demo", ["--topk", "99"], "--topk must be in 1..8 (<= --experts 8 and <= 32), got 99"),
    ("demo", ["--topk", "0"], "argument --topk: must be an integer >= 1, got 0"),
    ("demo", ["--capacity", "100"],
     "--capacity must be >= 200 (--prefill-tokens 200 and the largest decode batch 64), got 100"),
    ("demo", ["--capacity", "32", "--prefill-tokens", "16"], "--capacity must be >= 64"),
    ("demo", ["--hidden", "100"], "--hidden must be a multiple of 256 (DeepEP combine), got 100"),
    ("demo", ["--hidden", "0"], "argument --hidden: must be an integer >= 1, got 0"),
    ("demo", ["--intermediate", "-1"], "argument --intermediate: must be an integer >= 1, got -1"),
    ("demo", ["--experts", "4096", "--world-size", "1"], "--experts must be <= 2048 and <= 256 per rank"),
    ("demo", ["--prefill-tokens", "-3"], "argument --prefill-tokens: must be an integer >= 1, got -3"),
    ("demo", ["--threads", "-1"], "argument --threads: must be an integer >= 0, got -1"),
    ("demo", ["--compile-backend", "foo"], "argument --compile-backend: invalid choice: 'foo'"),
    ("demo", ["--compile-backend", "tvm"], "argument --compile-backend: invalid choice: 'tvm'"),
    ("demo", ["--backend", "nccl"], "argument --backend: invalid choice: 'nccl'"),
    ("demo", ["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ("demo", ["--bogus"], "unrecognized arguments: --bogus"),
    ("train-demo", ["--hidden", "100"], "--hidden must be a multiple of 256 (DeepEP combine), got 100"),
    ("train-demo", ["--topk", "99"], "--topk must be in 1..4 (<= --experts 4 and <= 32), got 99"),
    ("train-demo", ["--topk", "0"], "argument --topk: must be an integer >= 1, got 0"),
    ("train-demo", ["--compile-backend", "foo"], "argument --compile-backend: invalid choice: 'foo'"),
    ("train-demo", ["--world-size", "0"], "argument --world-size: must be an integer >= 1, got 0"),
    ("train-demo", ["--world-size", "3"], "--experts must be a multiple of --world-size 3, got 4"),
    ("train-demo", ["--experts", "0"], "argument --experts: must be an integer >= 1, got 0"),
    ("train-demo", ["--experts", "1024", "--world-size", "2"], "--experts must be <= 2048 and <= 256 per rank"),
    ("train-demo", ["--intermediate", "0"], "argument --intermediate: must be an integer >= 1, got 0"),
    ("train-demo", ["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    ("train-demo", ["--mode", "train"], "argument --mode: invalid choice: 'train'"),
    ("train-demo", ["--capacity", "0"], "argument --capacity: must be an integer >= 1, got 0"),
    ("train-demo", ["--max-tokens", "100"], "--max-tokens must be <= --capacity 64, got 100"),
    ("train-demo", ["--max-tokens", "0"], "argument --max-tokens: must be an integer >= 1, got 0"),
    ("train-demo", ["--lr", "0"], "argument --lr: must be a finite number > 0, got 0"),
    ("train-demo", ["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    ("train-demo", ["--lr", "fast"], "argument --lr: must be a finite number > 0, got 'fast'"),
    ("train-demo", ["--rtol", "-1"], "argument --rtol: must be a finite number >= 0, got -1"),
    ("train-demo", ["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    ("tiny-model", [], "the following arguments are required: DIR"),
    ("tiny-model", ["{file}"], "argument DIR: {file} exists and is not a directory"),
    ("tiny-model", ["{foreign}"], "argument DIR: {foreign} is a non-empty directory that holds no tiny model"),
    ("tiny-model", ["{new}", "--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
    ("tiny-model", ["{new}", "--seed", "x"], "argument --seed: must be an integer >= 0, got 'x'"),
]

#: The runner of one engine rank (``python -m deepep_ops.tiny_model``).
BAD_RUNNER = [
    ([], "the following arguments are required: --model, --out"),
    (["--model", "{new}", "--out", "{out}"], "--model: {new} holds no config.json"),
    (["--model", "{model}", "--out", "{new}/x/out.json"], "--out: directory {new}/x does not exist"),
    (["--model", "{model}", "--out", "{out}", "--max-tokens", "0"],
     "argument --max-tokens: must be an integer >= 1, got 0"),
    (["--model", "{model}", "--out", "{out}", "--max-num-batched-tokens", "-8"],
     "argument --max-num-batched-tokens: must be an integer >= 1, got -8"),
]


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text("{}")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return {name: str(tmp_path / name) for name in ("file", "foreign", "new", "model", "out")}


def _fill(items, paths):
    return [s.format(**paths) for s in items]


def _assert_usage_error(err: str, prog: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"usage: {prog}"), err
    assert "Traceback" not in err, err
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1], err  # one error line, last
    assert errors[0].startswith(f"{prog}: error: "), err
    assert message in errors[0], err


@pytest.mark.parametrize("command,argv,message", BAD, ids=[f"{c} {' '.join(a)}" for c, a, _ in BAD])
def test_bad_value_is_a_usage_error(command, argv, message, paths, capsys):
    argv, message = _fill(argv, paths), message.format(**paths)
    with pytest.raises(SystemExit) as info:
        parse_command(command, argv)  # parses and checks; never runs the command
    assert info.value.code == 2
    _assert_usage_error(capsys.readouterr().err, f"python -m deepep_ops {command}", message)
    assert not os.path.exists(paths["new"])


@pytest.mark.parametrize("argv,message", BAD_RUNNER, ids=[" ".join(a) for a, _ in BAD_RUNNER])
def test_runner_bad_value_is_a_usage_error(argv, message, paths, capsys):
    with pytest.raises(SystemExit) as info:
        tiny_model.parse_args(_fill(argv, paths))
    assert info.value.code == 2
    _assert_usage_error(capsys.readouterr().err, "python -m deepep_ops.tiny_model", message.format(**paths))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("argv,expected", [
    (["--backend", "deepep"],
     "--backend deepep needs CUDA GPUs (one per rank) and DeepEP v2 (the deep_ep package, built from source); "
     "torch {v} sees no CUDA device (torch.cuda.is_available() is False): "
     "run on CPU with the default --backend reference"),
    (["--device", "cuda"],
     "--device cuda needs CUDA GPUs (one per rank); torch {v} sees no CUDA device "
     "(torch.cuda.is_available() is False): run on CPU with the default --device cpu"),
])
def test_gpu_options_without_gpu_say_what_they_need(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(argv)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "python -m deepep_ops demo: error: " + expected.format(v=torch.__version__), last


def _parsers():
    yield from ((name, c.parser()) for name, c in COMMANDS.items())
    yield "runner", tiny_model.build_parser()


@pytest.mark.parametrize("name,parser", list(_parsers()), ids=lambda x: x if isinstance(x, str) else "")
def test_help_describes_every_option_with_its_default(name, parser):
    out = parser.format_help()
    assert "``" not in out and "\n.. " not in out  # no raw reST
    flat = " ".join(out.split())  # help lines wrap at the terminal width
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        assert action.help, f"{name}: {action.option_strings} has no help"
        if action.required or action.nargs == 0:  # required options and flags have no default to show
            continue
        assert f"(default: {action.default})" in flat, f"{name}: {action.option_strings} shows no default:\n{out}"


def test_help_limits_are_deepep_ops_layouts():
    from deepep_ops import layout

    assert _cli.HELP_LIMITS == {name: getattr(layout, name) for name in _cli.HELP_LIMITS}


def test_top_level_usage_errors(capsys):
    for argv, message in (([], "the following arguments are required: command"),
                          (["frobnicate"], "argument command: invalid choice: 'frobnicate' "
                                           "(choose from 'demo', 'train-demo', 'tiny-model')")):
        with pytest.raises(SystemExit) as info:
            cli_main(argv)
        assert info.value.code == 2
        assert message in capsys.readouterr().err


def test_version_from_the_source_tree():
    pyproject = open(os.path.join(REPO_ROOT, "pyproject.toml")).read()
    assert f'version = "{_cli.version()}"' in pyproject
    assert _cli._pyproject_version('[project]\nname = "other"\nversion = "9"\n') is None


def test_progress_prints_start_ticks_and_end():
    lines = []
    with _cli.Progress(lines.append, "compiled: 3 steps; compiling the thing (first step)", every=0.05):
        time.sleep(0.2)
    assert lines[0] == "compiled: 3 steps; compiling the thing (first step)..."
    assert any(line.startswith("  ... still compiling the thing: ") for line in lines[1:-1]), lines
    assert lines[-1].startswith("  done in "), lines
    with _cli.Progress(None, "silent"):  # other ranks print nothing
        pass


def test_tiny_model_writes_and_rewrites(tmp_path, capsys):
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    target = tmp_path / "tiny"
    assert run_command("tiny-model", [str(target)]) == 0
    first = (target / "model.safetensors").read_bytes()
    assert (target / "config.json").is_file() and (target / "tokenizer.json").is_file()
    assert run_command("tiny-model", [str(target)]) == 0  # a directory it wrote before
    assert (target / "model.safetensors").read_bytes() == first  # the same seed, the same bytes
    assert "wrote a tiny Mixtral-style MoE model to" in capsys.readouterr().out


def _run(*argv, module="deepep_ops"):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    # Fails on a hang (no CPU progress), not on a slow start on a busy machine.
    return run_watched([sys.executable, "-m", module, *argv], env=env, cwd=REPO_ROOT)


def test_command_line_usage_errors():
    """The real entry point, in a subprocess: exit 2, one error line naming the option, no traceback."""
    # (Every other bad value of the table above goes through the same parsers, in-process.)
    for argv, message in ((["train-demo", "--hidden", "100"], "--hidden must be a multiple of 256"),
                          (["demo", "--compile-backend", "foo"], "--compile-backend: invalid choice: 'foo'")):
        proc = _run(*argv)
        assert proc.returncode == 2, (argv, proc.returncode, proc.stderr)
        _assert_usage_error(proc.stderr, f"python -m deepep_ops {argv[0]}", message)
        assert proc.stdout == "", proc.stdout  # nothing started


def test_command_line_version():
    proc = _run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"deepep-ops {_cli.version()} (torch "), proc.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_version(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main([command, "--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"deepep-ops {_cli.version()} (torch ")


#: What --help must not import (beyond ``import deepep_ops`` itself).
HEAVY = ("torch.multiprocessing", "torch.distributed.run", "vllm", "safetensors", "tokenizers",
         "deepep_ops.demo", "deepep_ops.train_demo", "deepep_ops.moe", "deepep_ops.vllm")


def test_help_imports_nothing_heavy():
    """``--help`` of every command in a fresh process imports nothing beyond ``import deepep_ops`` that
    does the work (a help that imports vLLM or the demo is slow; timing it here would be a timed test).

    ``python -m deepep_ops`` itself first imports the package (``deepep_ops/__init__.py``: torch and
    the op registration), which this test does not count."""
    code = """
import io, json, sys, time, contextlib
import deepep_ops
before = set(sys.modules)
t0 = time.perf_counter()
from deepep_ops.__main__ import main
import deepep_ops.tiny_model as runner
for argv in ([], ["demo"], ["train-demo"], ["tiny-model"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv + ["--help"])
        except SystemExit:
            pass
with contextlib.redirect_stdout(io.StringIO()):
    try:
        runner.parse_args(["--help"])
    except SystemExit:
        pass
print(json.dumps({"seconds": time.perf_counter() - t0, "new": sorted(set(sys.modules) - before)}))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = run_watched([sys.executable, "-c", code], env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    heavy = [m for m in result["new"] if m.startswith(HEAVY)]
    assert not heavy, f"--help imported {heavy}"
