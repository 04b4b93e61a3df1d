"""Every recipe x model on scikit-learn's digits at 32 px, on the CPU (run by hand).

    python bench/recipes.py --data ~/data/digits-32 --epochs 5 --models alexnet resnet18 mobilenet_v2

Writes ``OUT/recipes-<stamp>.json`` (default OUT: bench/recipes-digits; not
bench/results, which holds GPU measurements only) with one row per run (model, recipe,
init, epochs, validation top-1 per epoch, the epoch whose validation top-1 first leaves
chance, best validation top-1, test top-1, training img/s, wall time), and
``vhist report`` of the run folders (``--runs``, default runs/recipes-digits, which git
ignores: AlexNet's checkpoints are ~350 MB each) into ``OUT/report``.
"Leaves chance" means a validation top-1 of at least :data:`LEFT_CHANCE` (twice the 10%
of a uniform guess on the 10 balanced classes; the raw or the EMA weights). Each run is
``vhist train`` with ``--epochs`` and ``--batch-size`` overridden and nothing else; make
the data with ``vhist data make digits --root ~/data``.

On the CPU these are interpreter-free torch-backend runs: the img/s figures are CPU
figures, shared with whatever else the machine runs, and say nothing about a GPU.
What they can and cannot say about Imagenette: bench/NOTES.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

LEFT_CHANCE = 20.0
# The models that fit a CPU at 32 px (a step of batch 64 in seconds, not minutes).
CPU_MODELS = ("alexnet", "resnet18", "mobilenet_v2", "mobilenet_v1", "vgg11_bn", "vit_tiny_patch16")


def left_chance_epoch(rows: list[dict]) -> int | None:
    """The first epoch whose validation top-1 (raw or EMA weights) reaches LEFT_CHANCE."""
    for r in rows:
        if max(r["val_top1"], r.get("ema_val_top1", 0.0)) >= LEFT_CHANCE:
            return r["epoch"]
    return None


def run_row(run: Path) -> dict:
    """The results row of a finished run folder."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    recipe = config["recipe"]
    return {"run": run.name, "model": config["model"], "recipe": config["train_config"]["recipe"],
            "init": recipe.get("init", "(none recorded)"), "epochs": recipe["epochs"],
            "batch_size": recipe["batch_size"], "status": summary["status"],
            "left_chance_epoch": left_chance_epoch(rows),
            "val_top1": [round(max(r["val_top1"], r.get("ema_val_top1", 0.0)), 2) for r in rows],
            "best_val_top1": summary["best_val_top1"], "test_top1": summary["test_top1"],
            "train_img_per_s": summary["train_img_per_s"], "wall_s": summary["wall_time_s"],
            "device": config["device"], "command": config["command"]}


def run_one(model: str, recipe: str, data: str, epochs: int, batch_size: int, out_dir: Path) -> dict:
    """One ``vhist train`` run; its row of the results file."""
    from vhist.train.setup import TrainConfig
    from vhist.train.engine import train

    name = f"{model}-{recipe}-e{epochs}-b{batch_size}"
    cfg = TrainConfig(model=model, data=data, recipe=recipe, overrides={"epochs": epochs, "batch_size": batch_size},
                      out_dir=str(out_dir), run_name=name, backend="torch", device="cpu", workers=0,
                      log_every=1000)
    train(cfg)
    return run_row(out_dir / name)


def main(argv=None) -> int:
    from vhist.train.recipes import RECIPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the digits-32 folder of `vhist data make digits`")
    p.add_argument("--models", nargs="+", default=list(CPU_MODELS))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="bench/recipes-digits", help="results file and report folder")
    p.add_argument("--runs", default="runs/recipes-digits", help="the run folders")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: tabulate the finished run folders already in --runs (e.g. vhist train runs "
                        "made by hand with the same flags)")
    args = p.parse_args(argv)
    out, runs = Path(args.out), Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = out / f"recipes-{stamp}.json"
    results = []

    def record(row: dict) -> None:
        results.append(row)
        print(json.dumps(row), flush=True)
        path.write_text(json.dumps({"date": stamp, "data": os.path.abspath(args.data), "left_chance": LEFT_CHANCE,
                                    "runs": results}, indent=1))

    if args.collect:
        for run in sorted(p for p in runs.iterdir() if (p / "summary.json").is_file()):
            record(run_row(run))
    else:
        for model in args.models:
            for recipe in args.recipes:
                record(run_one(model, recipe, args.data, args.epochs, args.batch_size, runs))
    from vhist.__main__ import main as vhist_main

    vhist_main(["report", str(runs), "--out", str(out / "report")])
    print(f"results: {path}; report: {out / 'report'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
