"""Command line: ``python -m deepep_ops demo|train-demo|tiny-model [options]`` (also the ``deepep-ops`` script).

Options are parsed and checked before anything heavy is imported or started:
a bad value is a one-line usage error (exit 2) naming the option.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NamedTuple, Optional

from deepep_ops import _cli


class Command(NamedTuple):
    summary: str
    parser: Callable[[], argparse.ArgumentParser]
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None]
    run: str  # "module:function", imported only after the options passed their checks


COMMANDS = {
    "demo": Command(
        "compile a small expert-parallel MoE layer over the deepep_ops ops and report graph breaks,\n"
        "recompiles, bucket sizes, the error against a dense MoE and eager/compiled step times",
        _cli.demo_parser, _cli.check_demo, "deepep_ops.demo:run"),
    "train-demo": Command(
        "a few optimizer steps of an MoE layer on 2 CPU ranks, eager and compiled\n"
        "(forward + backward): losses and step times",
        _cli.train_demo_parser, _cli.check_train_demo, "deepep_ops.train_demo:run"),
    "tiny-model": Command(
        "write a tiny random-weight MoE model (Mixtral-style, 2 MB) that vLLM serves on a CPU",
        _cli.tiny_model_parser, _cli.check_tiny_model, "deepep_ops.tiny_model:write_main"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deepep_ops",
        description="deepep-ops command line.\n\ncommands:\n"
        + "\n".join(f"  {name:10s} " + c.summary.replace("\n", "\n             ") for name, c in COMMANDS.items())
        + "\n\n'python -m deepep_ops COMMAND --help' lists a command's options and their defaults.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _cli.add_version(parser)
    parser.add_argument("command", choices=tuple(COMMANDS), help="what to run")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the command's options")
    return parser


def parse_command(command: str, options: list) -> argparse.Namespace:
    """A command's options, checked (``SystemExit(2)`` with a usage line on a bad value)."""
    spec = COMMANDS[command]
    parser = spec.parser()
    args = parser.parse_args(options)
    spec.check(parser, args)
    return args


def run_command(command: str, options: list) -> int:
    """Parse and check ``options``, then run ``command``; its exit status."""
    args = parse_command(command, options)
    module, _, function = COMMANDS[command].run.partition(":")
    import importlib

    status = getattr(importlib.import_module(module), function)(args)
    return int(status or 0)


def main(argv: Optional[list] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:  # everything after the command is the command's own
        command, options = argv[0], argv[1:]
    else:
        ns = build_parser().parse_args(argv)  # --help, --version, or a usage error naming the commands
        command, options = ns.command, ns.options
    sys.exit(run_command(command, options))


if __name__ == "__main__":
    main()
