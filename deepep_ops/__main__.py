"""Command line: ``python -m deepep_ops demo|train-demo [options]`` (also the ``deepep-ops`` script)."""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "demo": "compile a small expert-parallel MoE layer over the deepep_ops ops and report graph breaks,\n"
            "recompiles, bucket sizes, the error against a dense MoE and eager/compiled step times",
    "train-demo": "a few optimizer steps of an MoE layer on 2 CPU ranks, eager and compiled\n"
                  "(forward + backward): losses and step times",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deepep_ops",
        description="deepep-ops command line.\n\ncommands:\n"
        + "\n".join(f"  {name:10s} " + text.replace("\n", "\n             ") for name, text in COMMANDS.items())
        + "\n\n'python -m deepep_ops COMMAND --help' lists a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=tuple(COMMANDS), help="what to run")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the command's options")
    return parser


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in COMMANDS:  # everything after the command is the command's own
        command, options = argv[0], argv[1:]
    else:
        ns = parser.parse_args(argv)  # --help, or a usage error naming the allowed commands
        command, options = ns.command, ns.options
    if command == "demo":
        from deepep_ops.demo import main as demo_main

        demo_main(options)
    elif command == "train-demo":
        from deepep_ops.train_demo import main as train_demo_main

        sys.exit(train_demo_main(options))


if __name__ == "__main__":
    main()
