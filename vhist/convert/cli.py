"""``vhist convert NAME``: what :func:`vhist.convert` runs on vhist's kernels, per conv."""
from __future__ import annotations

import argparse
import json


def add_convert_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        "convert", help="convert a model and report, per conv, what runs on vhist's kernels",
        description="Builds the model (a zoo name, torchvision:NAME or timm:NAME when that package imports), "
                    "converts it with vhist.convert and prints, per conv, whether it runs on vhist's kernels "
                    "(fused with what, or why not) and the share of conv multiply-adds on vhist.")
    p.add_argument("model", help="zoo name, torchvision:NAME or timm:NAME")
    p.add_argument("--image-size", type=int, default=None, help="input size the multiply-adds are counted at")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run_convert)
    return p


def run_convert(args) -> int:
    from vhist.convert.external import build, check_model
    from vhist.convert.model import convert_with_report

    config = check_model(args.model)
    size = args.image_size or config.image_size
    if size < 16:
        raise ValueError(f"--image-size must be >= 16, got {size}")
    model = build(args.model, num_classes=args.num_classes, image_size=size)
    _, report = convert_with_report(model, inplace=True, input_size=size)
    if args.json:
        print(json.dumps({"model": args.model, "input_size": list(report.input_size), "share": report.share,
                          "convs": [vars(r) for r in report.convs], "untraced": report.untraced}, indent=1))
    else:
        print(report)
    return 0
