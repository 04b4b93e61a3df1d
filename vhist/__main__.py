"""The ``vhist`` command line (also ``python -m vhist``).

Expected failures (bad arguments, data, checkpoints, devices or backends) end with one
line on stderr, ``vhist <command>: error: ...``, and exit code 2; ``--debug`` or
``VHIST_DEBUG=1`` shows their traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from vhist.cli_args import EXIT_USAGE, add_debug_flag
# model_stats and default_image_size are also importable from here, where they were first.
from vhist.models.stats import block_launches, default_image_size, model_stats  # noqa: F401

DESCRIPTION = """\
vhist: the history of vision architectures, run on hand-written kernels.
Train and evaluate the zoo's models (or torchvision's / timm's, converted), list them,
convert a model, fetch data sets, report results, export and benchmark models, and show
the active backend."""
EPILOG = """\
Expected errors print one line and exit with code 2; --debug (or VHIST_DEBUG=1) shows
their traceback. Run 'vhist COMMAND --help' for a command's options."""


def _info(args) -> int:
    import torch
    import triton

    import vhist

    info = vhist.backend_info()
    print(json.dumps({"vhist": vhist.__version__, "torch": torch.__version__, "triton": triton.__version__,
                      **info}, indent=2))
    if "error" in info:
        print(f"vhist info: error: {info['error']}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _models(args) -> int:
    import vhist

    names = vhist.list_models(args.pattern)
    if not names:
        pattern = args.pattern
        raise ValueError(vhist.models.unknown_model_message(pattern) if not any(c in pattern for c in "*?[")
                         else f"no model matches {pattern!r}; `vhist models` lists them all")
    if args.image_size is not None and args.image_size < 16:
        raise ValueError(f"--image-size must be >= 16, got {args.image_size}")
    rows = [model_stats(name, args.image_size) for name in names]
    if args.verbose:
        for row in rows:
            row["block_launches"] = block_launches(row["model"])
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    header = f"{'model':<24}{'size':>6}{'params':>15}{'GMACs':>9}"
    print(header + (f"{'BN layers':>11}{'BN in prologue':>16}{'block launches':>16}" if args.verbose else ""))
    for r in rows:
        line = f"{r['model']:<24}{r['image_size']:>6}{r['params']:>15,}{r['gmacs']:>9.2f}"
        if args.verbose:
            launches = r["block_launches"]
            line += f"{r['bn_layers']:>11}{r['prologue_pairs']:>16}"
            line += f"{f'{launches[0]} + {launches[1]}' if launches else '-':>16}"
        print(line)
    if args.verbose:
        print("\nBN in prologue: the conv + BN pairs whose BatchNorm and activation run in the next conv's "
              "prologue when training on the triton backend (vhist.ops.conv_bn_deferred); the other BN layers run "
              "fused with their conv (conv + BN + act), or as their own op.\nblock launches: Triton launches of one "
              "transformer encoder block in training on the triton backend, forward + backward (recorded, not run).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``vhist`` parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="vhist", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="versions and the active backend",
                               description="Versions, the active vhist backend and what this machine can run.")
    info.set_defaults(run=_info)
    models = commands.add_parser("models", help="the model zoo: params and GMACs at the default input size",
                                 description="The model zoo: parameters and GMACs at each model's default "
                                             "input size (or --image-size).")
    models.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. 'resnet*'")
    models.add_argument("--image-size", type=int, default=None, help="input size instead of each model's default")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.add_argument("--verbose", action="store_true",
                        help="also the BatchNorm layers, how many run in the next conv's prologue, and the "
                             "Triton launches of one transformer block")
    models.set_defaults(run=_models)
    from vhist.train.cli import add_eval_parser, add_train_parser

    add_train_parser(commands)
    add_eval_parser(commands)
    from vhist.report import add_report_parser
    from vhist.train.download import add_data_parser

    add_data_parser(commands)
    add_report_parser(commands)
    from vhist.benchmark import add_benchmark_parser
    from vhist.export import add_export_parser

    add_export_parser(commands)
    add_benchmark_parser(commands)
    from vhist.convert.cli import add_convert_parser

    add_convert_parser(commands)
    for sub in commands.choices.values():
        add_debug_flag(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one ``vhist`` command; returns its exit code (2 for an expected error)."""
    from vhist.train.guards import expected_errors

    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("VHIST_DEBUG", "") not in ("", "0")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"vhist {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130
    except expected_errors() as exc:
        if debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"vhist {args.command}: error: {message}", file=sys.stderr, flush=True)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
