"""What the command lines (``python -m deepep_ops demo|train-demo|tiny-model``) share.

Option types that turn a bad value into a one-line usage error naming the
option, checks of an MoE layer's shape against DeepEP's limits (before any
rank starts), the package version, and a progress line for long compiles.
Importing this module imports neither torch nor anything else heavy, so
``--help`` and usage errors stay fast.
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

#: torch.compile backends the demos offer: the ones that run wherever torch does.
#: (torch._dynamo.list_backends() also lists tvm and openxla, which need their own
#: packages and would only fail at the first compile, after the eager phase.)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")

DIST_NAME = "deepep-ops"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's line breaks and show every option's default."""


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum`` (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite float > 0."""
    return _float(text, lambda v: v > 0, "a finite number > 0")


def nonnegative_float(text: str) -> float:
    """An argparse ``type``: a finite float >= 0."""
    return _float(text, lambda v: v >= 0, "a finite number >= 0")


def _float(text: str, ok: Callable[[float], bool], what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=version_line(),
                        help="print deepep-ops' version (and torch's) and exit")


def check_moe_shape(parser: argparse.ArgumentParser, *, world_size: int, hidden: int, experts: int,
                    topk: int) -> None:
    """Usage errors for a layer DeepEP cannot run (the limits of ``deepep_ops.layout``)."""
    from deepep_ops.layout import COMBINE_HIDDEN_ALIGNMENT, MAX_EXPERTS, MAX_LOCAL_EXPERTS, MAX_RANKS, MAX_TOPK

    R, E, K = world_size, experts, topk
    if R > MAX_RANKS:
        parser.error(f"--world-size must be in 1..{MAX_RANKS}, got {R}")
    if hidden % COMBINE_HIDDEN_ALIGNMENT:
        parser.error(f"--hidden must be a multiple of {COMBINE_HIDDEN_ALIGNMENT} (DeepEP combine), got {hidden}")
    if E % R:
        parser.error(f"--experts must be a multiple of --world-size {R}, got {E}")
    if E > MAX_EXPERTS or E // R > MAX_LOCAL_EXPERTS:
        parser.error(f"--experts must be <= {MAX_EXPERTS} and <= {MAX_LOCAL_EXPERTS} per rank, got {E} over {R} ranks")
    if K > min(E, MAX_TOPK):
        parser.error(f"--topk must be in 1..{min(E, MAX_TOPK)} (<= --experts {E} and <= {MAX_TOPK}), got {K}")


# ------------------------------------------------------------------ version


def version() -> str:
    """deepep-ops' version: the ``pyproject.toml`` beside the imported package (a source
    checkout: the code that runs), else the installed distribution's metadata."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        found = _pyproject_version(pyproject.read_text())
        if found:
            return found
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version(DIST_NAME)
    except PackageNotFoundError:
        return "unknown"


def _pyproject_version(text: str) -> Optional[str]:
    """``[project] version`` if the file is deepep-ops' own (a line parser: tomllib is 3.11+)."""
    section, name, ver = None, None, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[project]" and "=" in line:
            key, _, value = line.partition("=")
            value = value.strip().strip('"').strip("'")
            if key.strip() == "name":
                name = value
            elif key.strip() == "version":
                ver = value
    return ver if name == DIST_NAME else None


def version_line() -> str:
    """``deepep-ops X (torch Y)``, without importing torch."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        torch_version = dist_version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"{DIST_NAME} {version()} (torch {torch_version}, Python {sys.version.split()[0]})"


# ------------------------------------------------------------------ progress


class Progress:
    """``with Progress(say, "compiling ..."):`` prints the message, then the elapsed
    time every ``every`` seconds while the block runs, then how long it took.

    ``say`` prints one line (``None``: print nothing, e.g. on ranks other than 0).
    """

    def __init__(self, say: Optional[Callable[[str], None]], what: str, every: float = 10.0) -> None:
        self.say, self.what, self.every = say, what, every
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "Progress":
        self.t0 = time.perf_counter()
        if self.say is not None:
            self.say(f"{self.what}...")
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        return self

    def _tick(self) -> None:
        while not self._done.wait(self.every):
            # "still compiling ...: 20 s" (the message's last clause, without its parenthesis)
            doing = self.what.split(" (")[0].split("; ")[-1]
            self.say(f"  ... still {doing}: {time.perf_counter() - self.t0:.0f} s")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            if exc_type is None:
                self.say(f"  done in {time.perf_counter() - self.t0:.1f} s")


# ------------------------------------------------------------------ the commands' options

#: DeepEP's limits as the help texts quote them (the checks read deepep_ops.layout;
#: tests/test_cli.py checks these equal it). Not imported here: layout imports torch.
HELP_LIMITS = {"MAX_RANKS": 1024, "MAX_EXPERTS": 2048, "MAX_LOCAL_EXPERTS": 256, "MAX_TOPK": 32,
               "COMBINE_HIDDEN_ALIGNMENT": 256}

#: The demo's decode batch sizes (the group maximum T of each step).
DEMO_DECODE_BATCHES = (1, 2, 3, 8, 13, 32, 57, 64)


def _shape_options(parser: argparse.ArgumentParser, *, hidden: int, intermediate: int, experts: int, topk: int,
                   world_size: int) -> None:
    L = HELP_LIMITS
    parser.add_argument("--world-size", type=int_at_least(1), default=world_size, metavar="R",
                        help=f"ranks, one process each (1..{L['MAX_RANKS']}); --experts must be a multiple of it")
    parser.add_argument("--hidden", type=int_at_least(1), default=hidden, metavar="H",
                        help=f"hidden size, a multiple of {L['COMBINE_HIDDEN_ALIGNMENT']} (DeepEP combine moves "
                             "512-byte bf16 rows)")
    parser.add_argument("--intermediate", type=int_at_least(1), default=intermediate, metavar="I",
                        help="expert MLP width")
    parser.add_argument("--experts", type=int_at_least(1), default=experts, metavar="E",
                        help=f"experts over all ranks (<= {L['MAX_EXPERTS']}, <= {L['MAX_LOCAL_EXPERTS']} per rank)")
    parser.add_argument("--topk", type=int_at_least(1), default=topk, metavar="K",
                        help=f"experts per token (<= --experts and <= {L['MAX_TOPK']})")


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deepep_ops demo",
        description=(
            "Compile a small expert-parallel MoE layer over the deepep_ops ops and report graph breaks,\n"
            "recompiles, bucket sizes, the error against a dense single-process MoE, and eager vs\n"
            "compiled vs overlapped (shared expert during the dispatch) time per step.\n\n"
            "Spawns --world-size ranks: gloo on CPU with the reference buffer by default; NCCL with\n"
            "--device cuda, and DeepEP's buffer with --backend deepep (both need one GPU per rank).\n"
            "On 2 CPU cores the whole run takes 1-3 minutes, most of it compiling."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--backend", choices=("reference", "deepep"), default="reference",
                        help="reference: deepep_ops.ReferenceElasticBuffer (DeepEP v2's API in PyTorch; any "
                             "device); deepep: DeepEP's buffer, v2.1's ElasticBuffer or v2.5's EPBuffer (needs "
                             "CUDA GPUs and DeepEP v2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the reference backend runs (--backend deepep always runs on CUDA)")
    _shape_options(parser, hidden=256, intermediate=128, experts=8, topk=2, world_size=2)
    parser.add_argument("--capacity", type=int_at_least(1), default=256, metavar="M",
                        help="the buffer's num_max_tokens_per_rank: >= --prefill-tokens and >= "
                             f"{max(DEMO_DECODE_BATCHES)} (the largest decode batch)")
    parser.add_argument("--prefill-tokens", type=int_at_least(1), default=200, metavar="T",
                        help="tokens per rank in the prefill step")
    parser.add_argument("--compile-backend", choices=COMPILE_BACKENDS, default="inductor",
                        help="torch.compile backend (aot_eager starts faster; eager only traces)")
    parser.add_argument("--shared-intermediate", type=int_at_least(0), default=256, metavar="Is",
                        help="shared expert MLP width; the 'overlapped' column runs it while the tokens are in "
                             "flight (a second compiled layer); 0: no shared expert, no overlapped column")
    parser.add_argument("--reps", type=int_at_least(1), default=30, metavar="N",
                        help="timed repetitions per step and mode (after warm-up); the table shows medians")
    parser.add_argument("--threads", type=int_at_least(0), default=0, metavar="N",
                        help="torch threads per rank; 0: the cores divided among the ranks, at least 1")
    add_version(parser)
    return parser


def check_demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every bad value is a usage error naming the option and what it allows (before any rank starts)."""
    check_moe_shape(parser, world_size=args.world_size, hidden=args.hidden, experts=args.experts, topk=args.topk)
    need = max(args.prefill_tokens, max(DEMO_DECODE_BATCHES))
    if args.capacity < need:
        parser.error(
            f"--capacity must be >= {need} (--prefill-tokens {args.prefill_tokens} and the largest "
            f"decode batch {max(DEMO_DECODE_BATCHES)}), got {args.capacity}"
        )
    if args.backend == "deepep" or args.device == "cuda":
        check_gpus(parser, "--backend deepep" if args.backend == "deepep" else "--device cuda", args.world_size,
                   needs_deep_ep=args.backend == "deepep")


def check_gpus(parser: argparse.ArgumentParser, what: str, world_size: int, *, needs_deep_ep: bool) -> None:
    """Usage errors that say what a GPU option needs and what to run instead."""
    import importlib.util

    import torch

    needs = "CUDA GPUs (one per rank)" + (" and DeepEP v2 (the deep_ep package, built from source)"
                                          if needs_deep_ep else "")
    instead = ("run on CPU with the default --backend reference" if needs_deep_ep
               else "run on CPU with the default --device cpu")
    if not torch.cuda.is_available():
        parser.error(f"{what} needs {needs}; torch {torch.__version__} sees no CUDA device "
                     f"(torch.cuda.is_available() is False): {instead}")
    if torch.cuda.device_count() < world_size:
        parser.error(f"{what} needs one GPU per rank: --world-size {world_size}, "
                     f"{torch.cuda.device_count()} GPUs visible")
    if needs_deep_ep and importlib.util.find_spec("deep_ep") is None:
        parser.error(f"{what} needs DeepEP v2 (the deep_ep package, built from source: "
                     f"https://github.com/deepseek-ai/DeepEP), which is not installed: {instead}")


def train_demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deepep_ops train-demo",
        description=(
            "A few optimizer steps of an expert-parallel MoE layer (router, experts) on --world-size\n"
            "gloo ranks on CPU with the reference buffer: forward, backward through dispatch and\n"
            "combine, SGD. The same steps run eagerly and under torch.compile(fullgraph=True,\n"
            "dynamic=True) from the same initial weights; it prints both losses, their difference and\n"
            "the step times, and exits 1 if the losses differ by more than --rtol.\n"
            "On 2 CPU cores it takes about a minute, most of it compiling the first step."
        ),
        formatter_class=HelpFormatter,
    )
    _shape_options(parser, hidden=256, intermediate=64, experts=4, topk=2, world_size=2)
    parser.add_argument("--mode", choices=("decode", "prefill"), default="decode",
                        help="decode: pow2-bucketed rows (CUDA-graph capturable); prefill: exact rows")
    parser.add_argument("--steps", type=int_at_least(1), default=6, metavar="N", help="optimizer steps of each, eager and compiled (they take turns)")
    parser.add_argument("--compile-backend", choices=COMPILE_BACKENDS, default="aot_eager",
                        help="torch.compile backend (aot_eager starts fastest; inductor generates C++ kernels)")
    parser.add_argument("--capacity", type=int_at_least(1), default=64, metavar="M",
                        help="the buffer's num_max_tokens_per_rank: >= --max-tokens")
    parser.add_argument("--max-tokens", type=int_at_least(1), default=48, metavar="T",
                        help="each rank draws T in 1..this per step")
    parser.add_argument("--lr", type=positive_float, default=0.5, help="SGD learning rate")
    parser.add_argument("--rtol", type=nonnegative_float, default=2e-2,
                        help="relative loss tolerance, eager vs compiled")
    add_version(parser)
    return parser


def check_train_demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    check_moe_shape(parser, world_size=args.world_size, hidden=args.hidden, experts=args.experts, topk=args.topk)
    if args.max_tokens > args.capacity:
        parser.error(f"--max-tokens must be <= --capacity {args.capacity}, got {args.max_tokens}")


def tiny_model_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deepep_ops tiny-model",
        description=(
            "Write a tiny random-weight Mixtral-style MoE model that vLLM serves on a CPU: hidden 256,\n"
            "4 experts, top-2, 2 layers, bf16, a 256-word local tokenizer (words w0 to w249); about\n"
            "2 MB, seconds, nothing downloaded. Needs the safetensors and tokenizers packages (vLLM\n"
            "installs both). Serve it with vLLM: docs/vllm_engine.md."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("dir", metavar="DIR",
                        help="where to write it: a new or empty directory, or one this command wrote before")
    parser.add_argument("--seed", type=int_at_least(0), default=0, metavar="N",
                        help="seed of the random weights (the same seed writes the same model)")
    add_version(parser)
    return parser


def check_tiny_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from deepep_ops.tiny_model import check_target, missing_packages

    why = check_target(args.dir)
    if why:
        parser.error(f"argument DIR: {why}")
    missing = missing_packages()
    if missing:
        parser.error(f"tiny-model needs the {' and '.join(missing)} package(s): pip install {' '.join(missing)} "
                     "(vLLM installs both)")
