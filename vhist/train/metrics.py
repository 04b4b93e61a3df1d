"""The per-epoch metrics files of a run folder, its ``curves.png``, and step progress."""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
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


def curves_figure(history: list[dict]):
    """The figure of ``curves.png``: loss on a log axis (a spike of 1e6 leaves the other
    epochs readable), top-1 accuracy on a linear one; train and validation on both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [_positive(r["train_loss"]) for r in history], "o-", label="train")
    ax_acc.plot(epochs, [r["train_top1"] for r in history], "o-", label="train")
    if any(r.get("val_loss") is not None for r in history):
        ax_loss.plot(epochs, [_positive(r["val_loss"]) for r in history], "s-", label="validation")
        ax_acc.plot(epochs, [r["val_top1"] for r in history], "s-", label="validation")
    ax_loss.set_yscale("log")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss (log scale)", title="loss")
    _clip_spikes(ax_loss, history)
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both" if ax is ax_loss else "major")
        ax.legend()
    fig.tight_layout()
    return fig


# A loss above this many times the median of the run's losses is drawn clipped, and marked.
SPIKE_FACTOR = 30.0


def _clip_spikes(ax, history: list[dict]) -> None:
    """Caps the loss axis at :data:`SPIKE_FACTOR` x the median loss when a spike exceeds
    that (so the other epochs keep most of the height) and marks each clipped point with
    a triangle at the top and its value."""
    points = [(r["epoch"], v) for r in history for v in (_positive(r["train_loss"]), _positive(r.get("val_loss")))
              if not math.isnan(v)]
    if not points:
        return
    values = sorted(v for _, v in points)
    cap = values[len(values) // 2] * SPIKE_FACTOR
    spikes = [(e, v) for e, v in points if v > cap]
    if not spikes:
        return
    ax.set_ylim(values[0] / 1.5, cap)
    last = max(e for e, _ in points)
    for epoch, value in spikes:
        ax.plot([epoch], [cap], "^", color="red", markersize=9, clip_on=False, zorder=5)
        right = epoch == last and last > 1  # keep the label inside the axes
        ax.annotate(f"{value:.3g}", (epoch, cap), textcoords="offset points", xytext=(-6 if right else 6, -12),
                    ha="right" if right else "left", color="red")
    ax.set_title(f"loss (clipped at {SPIKE_FACTOR:g}x the median: red marks)")


def _positive(value):
    """A loss for the log axis: None, NaN, Inf and non-positive values are gaps."""
    return value if value is not None and 0 < value < math.inf else math.nan


def plot_curves(history: list[dict], path: Path) -> None:
    """Writes :func:`curves_figure` to ``path`` atomically."""
    import matplotlib.pyplot as plt

    fig = curves_figure(history)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# Off a terminal, a progress line at least this often (seconds), besides every --log-every steps.
PROGRESS_SECONDS = 30.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class StepProgress:
    """Step progress of one epoch: a tqdm bar on a terminal; elsewhere (nohup, a job
    log) a plain line after the first step, every ``every`` steps and every
    :data:`PROGRESS_SECONDS`, whichever comes first: steps done, loss, top-1, img/s, ETA."""

    def __init__(self, total: int, desc: str, enabled: bool, every: int):
        self.tty = sys.stderr.isatty()
        self.bar = progress_bar(total, desc, enabled)
        self.plain = enabled and not self.tty
        self.total, self.desc, self.every, self.done = total, desc, every, 0
        self.t_start = self.t_last = time.time()

    @property
    def n(self) -> int:
        return self.done

    def update(self) -> None:
        self.done += 1
        self.bar.update(1)

    def line_due(self) -> bool:
        """Whether a plain line is due now (off a terminal only)."""
        return self.plain and (self.done == 1 or self.done % self.every == 0
                               or time.time() - self.t_last >= PROGRESS_SECONDS)

    def report(self, step: int, steps: int, loss: float, top1: float, img_per_s: float) -> None:
        """Shows the running loss, accuracy and speed: the bar's postfix, or a plain line."""
        if not self.plain:
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{top1:.1f}%", img_s=f"{img_per_s:.0f}")
            return
        now = time.time()
        eta = (now - self.t_start) / max(self.done, 1) * (self.total - self.done)
        self.t_last = now
        print(f"{self.desc} step {step}/{steps}: loss {loss:.4f} top-1 {top1:.1f}% | {img_per_s:.0f} img/s | "
              f"epoch ETA {_duration(eta)}", flush=True)

    def close(self) -> None:
        self.bar.close()


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on a terminal (stderr), silent elsewhere."""
    from tqdm import tqdm

    quiet = not enabled or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=quiet, leave=False, dynamic_ncols=True)
