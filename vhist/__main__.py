"""The ``vhist`` command line (also ``python -m vhist``)."""
from __future__ import annotations

import argparse
import json
import sys


def _info(args) -> int:
    import torch
    import triton

    import vhist

    print(json.dumps({"vhist": vhist.__version__, "torch": torch.__version__, "triton": triton.__version__,
                      **vhist.backend_info()}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vhist", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions and the active backend")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
