"""Command line: ``python -m deepep_ops demo [options]`` (also the ``deepep-ops`` script)."""

from __future__ import annotations

import sys


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m deepep_ops demo [--help | options]\n\n"
              "  demo   compile a small expert-parallel MoE layer over the deepep ops and report\n"
              "         graph breaks, recompiles, bucket sizes, error and eager/compiled step times\n"
              "  train-demo   a few optimizer steps of an MoE layer, eager and compiled (forward + backward)")
        return
    if argv[0] == "train-demo":
        from deepep_ops.train_demo import main as train_demo_main

        sys.exit(train_demo_main(argv[1:]))
    if argv[0] != "demo":
        sys.exit(f"deepep-ops: unknown command {argv[0]!r}; try 'demo'")
    from deepep_ops.demo import main as demo_main

    demo_main(argv[1:])


if __name__ == "__main__":
    main()
