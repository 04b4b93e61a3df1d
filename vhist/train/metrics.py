"""The per-epoch metrics files of a run folder, its ``curves.png``, and step progress."""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """Rewrites ``metrics.jsonl`` / ``metrics.csv`` from the full history (so a resumed
    run never duplicates or loses a row) and redraws ``curves.png``."""
    with open(run_dir / "metrics.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    if history:
        with open(run_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
    plot_curves(history, run_dir / "curves.png")


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and top-1 accuracy per epoch, train and validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_acc.plot(epochs, [r["train_top1"] for r in history], "o-", label="train")
    if any(r.get("val_loss") is not None for r in history):
        ax_loss.plot(epochs, [r["val_loss"] for r in history], "s-", label="validation")
        ax_acc.plot(epochs, [r["val_top1"] for r in history], "s-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on a terminal (stderr), silent elsewhere."""
    from tqdm import tqdm

    quiet = not enabled or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=quiet, leave=False, dynamic_ncols=True)
