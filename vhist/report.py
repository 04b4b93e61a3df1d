"""``vhist report``: the results table and plots of a set of training runs.

Each run folder's ``summary.json`` (status, test and validation accuracy, img/s, TTA),
``config.json`` (recipe, data, device) and ``metrics.jsonl`` (per-epoch curves) give:

* ``results.md``: the Markdown table of the README (one row per completed run);
* ``accuracy.png``: test top-1 against the architecture's year and against GMACs
  (at the run's input size), marker area proportional to the parameters;
* ``curves.png``: the validation top-1 and training loss of all runs, overlaid;
* ``results.json``: the rows as data.

Only completed runs appear (a stopped, interrupted, diverged or failed run is listed as
skipped, with its status); a run on synthetic data is marked ``(synthetic)`` in the
table and drawn with a hollow marker and a dashed line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

# The year of each family's paper, keyed by model-name prefix (longest match first).
FAMILY_YEARS = {
    "alexnet": (2012, "Krizhevsky, Sutskever & Hinton, NeurIPS 2012"),
    "vgg": (2014, "Simonyan & Zisserman, arXiv:1409.1556"),
    "bn_inception": (2015, "Ioffe & Szegedy, arXiv:1502.03167"),
    "inception_v3": (2015, "Szegedy et al., arXiv:1512.00567"),
    "resnet": (2015, "He et al., arXiv:1512.03385"),
    "inception_v4": (2016, "Szegedy et al., arXiv:1602.07261"),
    "inception_resnet": (2016, "Szegedy et al., arXiv:1602.07261"),
    "mobilenet_v1": (2017, "Howard et al., arXiv:1704.04861"),
    "mobilenet_v2": (2018, "Sandler et al., arXiv:1801.04381"),
    "vit": (2020, "Dosovitskiy et al., arXiv:2010.11929"),
}
# Display names of the zoo's models (the papers' spelling).
LABELS = {
    "alexnet": "AlexNet", "alexnet_single_tower": "AlexNet (one tower)", "bn_inception": "BN-Inception",
    "inception_v3": "Inception-v3", "inception_v4": "Inception-v4", "inception_resnet_v1": "Inception-ResNet-v1",
    "inception_resnet_v2": "Inception-ResNet-v2", "mobilenet_v1": "MobileNet-v1", "mobilenet_v2": "MobileNet-v2",
    **{f"resnet{d}": f"ResNet-{d}" for d in (18, 34, 50, 101)},
    **{f"vgg{d}{s}": f"VGG-{d}{t}" for d in (11, 13, 16, 19) for s, t in (("", ""), ("_bn", " (BN)"))},
    "vgg11_lrn": "VGG-11 (LRN)",
    "vit_tiny_patch16": "ViT-Ti/16", "vit_small_patch16": "ViT-S/16", "vit_base_patch16": "ViT-B/16",
}
HEADER = ["architecture", "data", "recipe", "epochs", "hardware", "val top-1", "test top-1", "test top-5",
          "TTA test top-1", "img/s (backend)"]


def model_year(model: str) -> Optional[int]:
    """The year of the paper of ``model``'s family (None for a model outside the zoo)."""
    for prefix in sorted(FAMILY_YEARS, key=len, reverse=True):
        if model.startswith(prefix):
            return FAMILY_YEARS[prefix][0]
    return None


def find_runs(paths: list[str]) -> list[Path]:
    """Run folders: each path that holds a ``summary.json``, else every folder below it
    that does (recursively), in sorted order.

    Raises:
        FileNotFoundError: a path that does not exist. ValueError: no run found at all.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist; give run folders (with a summary.json) or a folder of runs")
        if (p / "summary.json").is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(s.parent for s in p.rglob("summary.json"))
    runs = list(dict.fromkeys(r.resolve() for r in found))
    if not runs:
        raise ValueError(f"no run folder (a folder with a summary.json written by vhist train) under "
                         f"{', '.join(paths)}")
    return runs


def _read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def read_history(run_dir: Path) -> list[dict]:
    """The per-epoch rows of ``metrics.jsonl`` (or ``metrics.csv``); [] if neither exists."""
    if (run_dir / "metrics.jsonl").is_file():
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if (run_dir / "metrics.csv").is_file():
        import csv

        with open(run_dir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        return [{k: float(v) if v not in ("", "None") else None for k, v in row.items()} for row in rows]
    return []


def load_run(run_dir: Path) -> tuple[Optional[dict], Optional[str]]:
    """``(record, None)`` for a completed run, ``(None, reason)`` for one that is skipped.

    The record holds the summary, the config and the history, plus derived fields:
    ``label``, ``year``, ``synthetic``, ``dataset``, ``image_size``, ``params``."""
    try:
        summary = _read_json(run_dir / "summary.json")
        config = _read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        return None, f"unreadable ({exc})"
    if summary.get("status") != "completed" or summary.get("test_top1") is None:
        return None, f"status {summary.get('status')!r}, not a completed run"
    model = summary.get("model") or config.get("model", "?")
    data = config.get("data", {})
    kind = data.get("kind") or summary.get("data", "?")
    dataset = kind if kind != "folder" else Path(data.get("root", "folder")).name
    recipe = config.get("recipe", {})
    record = {"run_dir": str(run_dir), "summary": summary, "config": config, "history": read_history(run_dir),
              "model": model, "label": LABELS.get(model, model), "year": model_year(model),
              "synthetic": kind == "synthetic", "dataset": dataset, "image_size": recipe.get("image_size"),
              "params": config.get("parameters")}
    return record, None


def _pct(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def _recipe_text(record: dict) -> str:
    overrides = record["config"].get("train_config", {}).get("overrides") or {}
    name = record["summary"].get("recipe", "?")
    parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(overrides.items())]
    return name + (f" ({', '.join(parts)})" if parts else "")


def table_row(record: dict) -> list[str]:
    """One Markdown row (:data:`HEADER`'s columns) of a run record."""
    s = record["summary"]
    world = s.get("world_size") or 1
    tta = ", ".join(f"{mode} {_pct(t.get('top1'))}" for mode, t in sorted((s.get("test_tta") or {}).items()))
    rate = s.get("train_img_per_s")
    data = record["dataset"] + (f", {record['image_size']} px" if record["image_size"] else "")
    return [record["label"] + (" (synthetic)" if record["synthetic"] else ""), data, _recipe_text(record),
            str(s.get("epochs_done", "?")), s.get("device", "?") + (f" x{world}" if world > 1 else ""),
            _pct(s.get("best_val_top1")), _pct(s.get("test_top1")), _pct(s.get("test_top5")), tta or "–",
            ("–" if rate is None else f"{rate:,.0f}") + f" ({s.get('backend', '?')})"]


def markdown_table(records: list[dict]) -> str:
    """The README's results table: the header, then one row per record."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in records:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in table_row(r)) + " |")
    return "\n".join(lines) + "\n"


def add_gmacs(records: list[dict]) -> None:
    """Sets ``record["gmacs"]`` at the run's input size (:func:`vhist.__main__.model_stats`,
    with its 1000-class head, one count per model and size); None for a model that is not
    registered here."""
    import vhist
    from vhist.models.stats import model_stats

    cache: dict = {}
    for r in records:
        key = (r["model"], r["image_size"])
        if key not in cache:
            cache[key] = model_stats(*key)["gmacs"] if r["model"] in vhist.list_models() else None
        r["gmacs"] = cache[key]


def _marker_area(params, largest) -> float:
    return 40.0 + 900.0 * (params or 0) / max(largest or 1, 1)


def accuracy_figure(records: list[dict]):
    """Test top-1 against the paper's year and against GMACs (log axis); marker area ∝
    parameters; hollow markers for synthetic data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    largest = max((r["params"] or 0 for r in records), default=1)
    datasets = sorted({r["dataset"] for r in records})
    colours = {d: plt.cm.tab10(i % 10) for i, d in enumerate(datasets)}
    for ax, key, xlabel in ((axes[0], "year", "year of the architecture's paper"),
                            (axes[1], "gmacs", "GMACs per image at the run's input size (log scale)")):
        shown = [r for r in records if r.get(key) is not None]
        for r in shown:
            colour = colours[r["dataset"]]
            ax.scatter([r[key]], [r["summary"]["test_top1"]], s=_marker_area(r["params"], largest),
                       facecolors="none" if r["synthetic"] else [colour], edgecolors=[colour], linewidths=1.5,
                       marker="D" if r["synthetic"] else "o", alpha=0.8)
            ax.annotate(r["label"] + (" (synthetic)" if r["synthetic"] else ""), (r[key], r["summary"]["test_top1"]),
                        textcoords="offset points", xytext=(6, 6), fontsize=8)
        if key == "gmacs" and shown:
            ax.set_xscale("log")
        if not shown:
            ax.text(0.5, 0.5, f"no run with a known {key}", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel=xlabel, ylabel="test top-1 (%)")
        ax.margins(0.15)  # room for the largest markers and their labels
        ax.grid(alpha=0.3)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [axes[0].scatter([], [], marker="o", color=colours[d], label=d) for d in datasets]
    if any(r["synthetic"] for r in records):
        handles.append(axes[0].scatter([], [], marker="D", facecolors="none", edgecolors="grey",
                                       label="synthetic data (not a result)"))
    axes[0].legend(handles=handles, fontsize=8, loc="best", title="marker area ∝ parameters", title_fontsize=8)
    axes[0].set_title("accuracy against year")
    axes[1].set_title("accuracy against compute")
    fig.tight_layout()
    return fig


def curves_figure(records: list[dict]):
    """Validation top-1 and training loss (log axis) per epoch of every run, overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 5))
    for r in records:
        rows = r["history"]
        if not rows:
            continue
        name = f"{r['label']} · {r['dataset']} · {r['summary'].get('recipe', '?')}" + \
            (" (synthetic)" if r["synthetic"] else "")
        style = "--" if r["synthetic"] else "-"
        epochs = [row["epoch"] for row in rows]
        line, = ax_acc.plot(epochs, [row.get("val_top1") for row in rows], style, marker="o", markersize=6,
                            label=name)
        loss = [row["train_loss"] if row.get("train_loss") and 0 < row["train_loss"] < math.inf else math.nan
                for row in rows]
        ax_loss.plot(epochs, loss, style, marker="o", markersize=6, color=line.get_color(), label=name)
    ax_acc.set(xlabel="epoch", ylabel="validation top-1 (%)", title="validation accuracy")
    ax_loss.set(xlabel="epoch", ylabel="training loss (log scale)", title="training loss")
    ax_loss.set_yscale("log")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def report(paths: list[str], out_dir: str | os.PathLike = "report", exclude_synthetic: bool = False) -> dict:
    """Writes ``results.md``, ``results.json``, ``accuracy.png`` and ``curves.png`` of
    the completed runs found under ``paths`` (:func:`find_runs`) into ``out_dir``.

    Returns:
        ``{"table": markdown, "runs": [run dirs], "skipped": {run dir: reason}, "files": [...]}``.

    Raises:
        ValueError: no completed run among those found.
    """
    records, skipped = [], {}
    for run_dir in find_runs(paths):
        record, reason = load_run(run_dir)
        if record is not None and exclude_synthetic and record["synthetic"]:
            record, reason = None, "synthetic data (--exclude-synthetic)"
        if record is None:
            skipped[str(run_dir)] = reason
        else:
            records.append(record)
    if not records:
        raise ValueError("no completed run to report (" + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + ")")
    records.sort(key=lambda r: (r["synthetic"], r["year"] or 9999, r["model"], r["dataset"], r["run_dir"]))
    add_gmacs(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(records)
    (out / "results.md").write_text(table)
    rows = [{**dict(zip(HEADER, table_row(r))), "run_dir": r["run_dir"], "year": r["year"], "gmacs": r["gmacs"],
             "params": r["params"], "synthetic": r["synthetic"]} for r in records]
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    _save(accuracy_figure(records), out / "accuracy.png")
    _save(curves_figure(records), out / "curves.png")
    files = [str(out / n) for n in ("results.md", "results.json", "accuracy.png", "curves.png")]
    return {"table": table, "runs": [r["run_dir"] for r in records], "skipped": skipped, "files": files}


def _run_report(args) -> int:
    result = report(args.runs, args.out, args.exclude_synthetic)
    print(result["table"], end="")
    for run_dir, reason in result["skipped"].items():
        print(f"skipped {run_dir}: {reason}", file=sys.stderr)
    print(f"{len(result['runs'])} run(s); wrote {', '.join(result['files'])}", file=sys.stderr)
    return 0


def add_report_parser(commands) -> argparse.ArgumentParser:
    """``vhist report RUN_DIR... [--out DIR]``."""
    p = commands.add_parser("report", help="results table (Markdown) and plots of training runs",
                            description="The results table (Markdown, the README's format) and plots (accuracy "
                                        "against year and GMACs, training curves overlaid) of completed runs.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders searched for runs")
    p.add_argument("--out", default="report", help="output folder (default: report)")
    p.add_argument("--exclude-synthetic", action="store_true", help="leave out runs on synthetic data")
    p.set_defaults(run=_run_report)
    return p
