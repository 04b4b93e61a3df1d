"""The training loop of ``vhist train`` and the evaluation of ``vhist eval``.

A run folder holds:

* ``config.json``: the command, the resolved recipe, data, model, device and versions;
* ``metrics.jsonl`` and ``metrics.csv``: one row per epoch (train and validation loss
  and accuracy, learning rate, img/s, epoch time);
* ``curves.png``: loss and accuracy per epoch (matplotlib, Agg backend);
* ``last.pt`` (every epoch, on Ctrl-C, and with ``--stop-after-epochs``) and ``best.pt``
  (highest validation top-1), both complete resumable checkpoints written atomically;
* ``summary.json``: the test top-1/top-5 of the best-on-validation weights (evaluated
  once, at the end), wall time, img/s, skipped corrupt images and the final status.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from vhist.train import checkpoint as ckpt
from vhist.train import distributed as D
from vhist.train.data import DataBundle, EpochBatches, SampleSet, build_cache, load_data, make_loader
from vhist.train.recipes import LRSchedule, Recipe, build_optimizer, get_recipe
from vhist.train.transforms import device_augment, normalize

EXIT_OK, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 3, 130


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything ``vhist train`` takes besides the recipe's hyperparameters."""

    model: Optional[str] = None                    # required unless resuming
    data: Optional[str] = None                     # required unless resuming
    recipe: str = "modern"
    overrides: dict = field(default_factory=dict)  # recipe fields set on the command line
    out_dir: str = "runs"
    run_name: Optional[str] = None
    seed: int = 0
    val_fraction: float = 0.1
    workers: Optional[int] = None                  # None: 8 on GPU, 0 on CPU
    device: str = "auto"
    backend: Optional[str] = None
    channels_last: Optional[bool] = None           # None: on GPU only
    sync_bn: bool = False
    cache: bool = False
    cache_dir: Optional[str] = None
    resume: Optional[str] = None
    stop_after_epochs: Optional[int] = None
    bench_loader: int = 0
    deterministic: bool = False
    log_every: int = 10
    eval_batch_size: Optional[int] = None


def resolve_recipe(cfg: TrainConfig, data: DataBundle) -> Recipe:
    """The named recipe with the overrides, adapted to the data where not overridden:
    CIFAR-style arrays keep their native resolution and use pad-and-crop."""
    recipe = get_recipe(cfg.recipe, **cfg.overrides)
    if data.kind in ("cifar10", "cifar100", "synthetic"):
        changes = {}
        if "image_size" not in cfg.overrides:
            changes["image_size"] = data.native_size
        if "augment" not in cfg.overrides and data.kind != "synthetic":
            changes["augment"] = "cifar"
        recipe = dataclasses.replace(recipe, **changes)
    return recipe


# ----------------------------------------------------------------------------- helpers


def _main_print(dist: D.DistInfo, *args) -> None:
    if dist.is_main:
        print(*args, flush=True)


def _progress(total: int, desc: str, dist: D.DistInfo):
    from tqdm import tqdm

    quiet = not dist.is_main or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=quiet, leave=False, dynamic_ncols=True)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _amp_dtype(recipe: Recipe, device: torch.device):
    amp = recipe.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


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

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_acc.plot(epochs, [r["train_top1"] for r in history], "o-", label="train")
    if any(r.get("val_loss") is not None for r in history):
        ax_loss.plot(epochs, [r["val_loss"] for r in history], "s-", label="validation")
        ax_acc.plot(epochs, [r["val_top1"] for r in history], "s-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model, loader, device, channels_last: bool, amp_dtype, cached_augment: Optional[tuple] = None,
             desc: str = "eval", dist: D.DistInfo = D.DistInfo()) -> dict:
    """Loss, top-1 and top-5 (%) of ``model`` over ``loader``, summed over all processes."""
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    corrupt = []
    bar = _progress(len(loader), desc, dist)
    for images, labels, bad in loader:
        corrupt += bad
        bar.update(1)
        if images is None:
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if cached_augment is not None:
            kind, size = cached_augment
            images = device_augment(images, kind, size, np.random.default_rng(0), train=False)
        x = normalize(images, channels_last=channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top == labels[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += labels.numel()
    bar.close()
    loss_sum, correct1, correct5, count = D.all_sum([loss_sum, correct1, correct5, count], device)
    if count == 0:
        return {"loss": None, "top1": None, "top5": None, "count": 0, "corrupt": corrupt}
    return {"loss": loss_sum / count, "top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count,
            "count": int(count), "corrupt": corrupt}


class _SyncBNProbe:
    """Checks, on the first training step, that every :class:`vhist.nn.SyncBatchNorm` ran
    its own forward. A model that hands a BatchNorm's tensors to a fused op directly
    (rather than through :func:`vhist.nn.conv_bn_act`, which runs a SyncBatchNorm
    unfused) bypasses the exchange of statistics and would silently train with
    per-process statistics, so it stops instead."""

    def __init__(self, model: torch.nn.Module):
        from vhist.nn import SyncBatchNorm

        self.modules = [m for m in model.modules() if isinstance(m, SyncBatchNorm)]
        self.seen: set[int] = set()
        self.handles = [m.register_forward_pre_hook(lambda mod, _: self.seen.add(id(mod))) for m in self.modules]

    def check(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        missing = len(self.modules) - len(self.seen)
        if missing:
            raise ValueError(
                f"--sync-bn: {missing} of {len(self.modules)} BatchNorm layers did not run their own forward "
                "(their tensors went to a fused op directly, which cannot synchronize statistics); "
                "run them through the module or vhist.nn.conv_bn_act")


def _versions() -> dict:
    import triton

    import vhist

    return {"vhist": vhist.__version__, "torch": torch.__version__, "triton": triton.__version__}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- training


class _StopRequest:
    """First Ctrl-C: finish the current step, save, exit. Second: raise at once."""

    def __init__(self):
        self.flag = False
        self._previous = None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        print("\nCtrl-C: finishing this step, then saving a resumable checkpoint (press again to abort now)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) a training run; returns the summary dict (also written to
    ``summary.json``). The summary's ``exit_code`` is 0 (done or stopped by
    ``--stop-after-epochs``), 3 (diverged) or 130 (interrupted, resumable)."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    dist = D.init_from_env(device.type)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    from vhist.backend import use_backend

    context = use_backend(cfg.backend) if cfg.backend else contextlib.nullcontext()
    try:
        with context:
            return _train(cfg, device, dist)
    finally:
        D.cleanup()


def _train(cfg: TrainConfig, device: torch.device, dist: D.DistInfo) -> dict:
    import vhist

    start_wall = time.time()
    resume_state = ckpt.load(cfg.resume) if cfg.resume else None
    if resume_state is not None:
        # The run's identity comes from the checkpoint; only device-side options may change.
        # --data may point at a moved copy of the same dataset.
        saved = resume_state["train_config"]
        for key in ("model", "recipe", "overrides", "seed", "val_fraction", "sync_bn", "cache", "run_name"):
            setattr(cfg, key, saved[key])
        cfg.data = cfg.data or saved["data"]
    elif not cfg.model or not cfg.data:
        raise ValueError("vhist train needs --model and --data (or --resume CHECKPOINT)")
    data = load_data(cfg.data, cfg.val_fraction, cfg.seed)
    recipe = resolve_recipe(cfg, data)
    amp_dtype = _amp_dtype(recipe, device)
    channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    workers = (8 if device.type == "cuda" else 0) if cfg.workers is None else cfg.workers
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # ------------------------------------------------------------------ run folder
    if resume_state is not None:
        run_dir = Path(cfg.resume).resolve().parent
    else:
        name = cfg.run_name or f"{cfg.model}-{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
        if dist.enabled:
            box = [name]
            torch.distributed.broadcast_object_list(box, src=0)
            name = box[0]
        run_dir = Path(cfg.out_dir) / name
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    D.barrier()

    # ------------------------------------------------------------------ model
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = vhist.create_model(cfg.model, num_classes=data.num_classes, image_size=recipe.image_size)
    if cfg.sync_bn:
        model = vhist.nn.convert_sync_batchnorm(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # ------------------------------------------------------------------ data
    cached = cfg.cache
    train_src, train_idx, val_src, val_idx = data.train, data.train_idx, data.train, data.val_idx
    test_src, test_idx = data.test, data.test_idx
    if cached and data.kind == "folder":
        cache_size = round(recipe.image_size / 0.875)
        cache_dir = Path(cfg.cache_dir or Path(data.root) / ".vhist-cache")
        built = {}
        for tag, src, idx in (("train", train_src, train_idx), ("val", val_src, val_idx),
                              ("test", test_src, test_idx)):
            if dist.is_main:
                built[tag] = build_cache(src, idx, cache_size, cache_dir, f"{tag}-seed{cfg.seed}")
            D.barrier()
            if not dist.is_main:
                built[tag] = build_cache(src, idx, cache_size, cache_dir, f"{tag}-seed{cfg.seed}")
        (train_src, train_idx), (val_src, val_idx), (test_src, test_idx) = (
            (built[t], np.arange(len(built[t]))) for t in ("train", "val", "test"))
    size, augment = recipe.image_size, recipe.augment
    train_set = SampleSet(train_src, train_idx, size, augment, True, cfg.seed, raw=cached)
    train_sampler = EpochBatches(len(train_set), recipe.batch_size, cfg.seed, True, dist.rank, dist.world)
    eval_bs = cfg.eval_batch_size or recipe.batch_size
    val_loader = make_loader(SampleSet(val_src, val_idx, size, augment, False, cfg.seed, raw=cached),
                             EpochBatches(len(val_idx), eval_bs, cfg.seed, False, dist.rank, dist.world),
                             workers, device.type == "cuda")
    test_loader = make_loader(SampleSet(test_src, test_idx, size, augment, False, cfg.seed, raw=cached),
                              EpochBatches(len(test_idx), eval_bs, cfg.seed, False, dist.rank, dist.world),
                              workers, device.type == "cuda")
    train_loader = make_loader(train_set, train_sampler, workers, device.type == "cuda")
    steps_per_epoch = len(train_sampler)
    if steps_per_epoch == 0:
        raise ValueError(f"the training split has {len(train_set)} images per process, fewer than one batch")
    cached_augment = (augment, size) if cached else None

    if cfg.bench_loader:
        return _bench_loader(train_loader, train_sampler, cfg, device, cached_augment, dist)

    # ------------------------------------------------------------------ optimization
    optimizer = build_optimizer(model, recipe)
    schedule = LRSchedule(optimizer, recipe, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, start_step, history = 0, 0, []
    best = {"epoch": None, "val_top1": -math.inf}
    partial = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "time": 0.0}
    corrupt: set[str] = set()
    prior_wall = 0.0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        schedule.load_state_dict(resume_state["schedule"])
        scaler.load_state_dict(resume_state["scaler"])
        start_epoch, start_step = resume_state["epoch"], resume_state["step"]
        history, best = resume_state["history"], resume_state["best"]
        partial = resume_state["partial"]
        partial = partial[dist.rank] if isinstance(partial, list) else partial
        corrupt = set(resume_state["corrupt"])
        prior_wall = resume_state["wall_time_s"]
        ckpt.set_rng_state(resume_state["rng"][dist.rank] if isinstance(resume_state["rng"], list)
                           else resume_state["rng"])

    config = {
        "command": " ".join(sys.argv), "train_config": dataclasses.asdict(cfg), "recipe": recipe.to_dict(),
        "data": {"kind": data.kind, "root": data.root, "classes": data.classes, "train": len(train_idx),
                 "val": len(val_idx), "test": len(test_idx), "notes": data.notes},
        "model": cfg.model, "parameters": sum(p.numel() for p in model.parameters()),
        "device": _device_name(device), "world_size": dist.world, "backend": vhist.resolve_backend(device),
        "amp": str(amp_dtype) if amp_dtype else "off", "channels_last": channels_last,
        "workers": workers, "cache": cached, "versions": _versions(),
    }
    if dist.is_main:
        with open(run_dir / "config.json", "w") as f:
            json.dump(config, f, indent=2)
    _main_print(dist, f"run folder: {run_dir}")
    _main_print(dist, f"recipe {cfg.recipe} (resolved):\n" + json.dumps(recipe.to_dict(), indent=2))
    _main_print(dist, f"data: {data.kind} {data.root}: {len(train_idx)} train / {len(val_idx)} validation / "
                      f"{len(test_idx)} test images, {data.num_classes} classes" +
                ("".join(f"\n  note: {n}" for n in data.notes)))
    _main_print(dist, f"model {cfg.model}: {config['parameters']:,} parameters on {config['device']} "
                      f"x{dist.world}, backend {config['backend']}, amp {config['amp']}, "
                      f"channels_last {channels_last}, sync_bn {cfg.sync_bn}")
    if resume_state is not None:
        _main_print(dist, f"resuming from {cfg.resume}: epoch {start_epoch + 1}, step {start_step}")

    def state(epoch: int, step: int, rng) -> dict:
        return {"format": ckpt.FORMAT, "train_config": dataclasses.asdict(cfg), "recipe": recipe.to_dict(),
                "num_classes": data.num_classes, "classes": data.classes, "image_size": size,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                "epoch": epoch, "step": step, "history": history, "best": best, "partial": gathered(dict(partial)),
                "corrupt": sorted(corrupt), "wall_time_s": prior_wall + time.time() - start_wall}

    def gathered(obj):
        """Per-process state (RNG, partial-epoch sums): one entry per rank under DDP."""
        if not dist.enabled:
            return obj
        box = [None] * dist.world
        torch.distributed.all_gather_object(box, obj)
        return box

    def save(name: str, st: dict) -> None:
        if dist.is_main:
            ckpt.save_atomic(st, run_dir / name)
        D.barrier()

    criterion = torch.nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    status, exit_code, message = "completed", EXIT_OK, ""
    epochs_this_run = 0
    probe = _SyncBNProbe(model) if cfg.sync_bn else None
    with _StopRequest() as stop:
        epoch = start_epoch
        while epoch < recipe.epochs:
            net.train()
            train_sampler.set_epoch(epoch, start_step)
            bar = _progress(steps_per_epoch - start_step, f"epoch {epoch + 1}/{recipe.epochs}", dist)
            loss_sum = torch.tensor(partial["loss_sum"], dtype=torch.float64, device=device)
            correct = torch.tensor(partial["correct"], dtype=torch.float64, device=device)
            count, epoch_time = partial["count"], partial["time"]
            nonfinite = torch.zeros((), dtype=torch.bool, device=device)
            step = start_step
            t0 = time.time()
            phase, snapshot = "between", None
            last_lr = optimizer.param_groups[0]["lr"]
            try:
                for images, labels, bad in train_loader:
                    snapshot = (ckpt.rng_state(), loss_sum.clone(), correct.clone(), count)
                    phase = "compute"
                    corrupt.update(bad)
                    if images is not None:
                        images = images.to(device, non_blocking=True)
                        labels = labels.to(device, non_blocking=True)
                        if cached:
                            gen = np.random.default_rng((cfg.seed, epoch, step, dist.rank))
                            images = device_augment(images, augment, size, gen, train=True)
                        x = normalize(images, channels_last=channels_last)
                        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                            enabled=amp_dtype is not None):
                            logits = net(x)
                        loss = criterion(logits.float(), labels)
                        if probe is not None:
                            probe.check()
                            probe = None
                        scaler.scale(loss).backward()
                        phase = "update"
                        if recipe.grad_clip > 0:
                            scaler.unscale_(optimizer)
                            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                        n = labels.numel()
                        loss_sum += loss.detach().double() * n
                        correct += (logits.detach().argmax(1) == labels).sum().double()
                        count += n
                        nonfinite |= ~torch.isfinite(loss.detach())
                    last_lr = optimizer.param_groups[0]["lr"]
                    schedule.step()
                    step += 1
                    phase = "between"
                    bar.update(1)
                    check = step % cfg.log_every == 0 or step == steps_per_epoch
                    if check:
                        if D.any_flag(bool(nonfinite.item()), device):
                            raise TrainingDiverged(f"non-finite loss at epoch {epoch + 1}, step {step}")
                        if dist.is_main and bar.n:
                            bar.set_postfix(loss=f"{loss_sum.item() / max(count, 1):.4f}",
                                            acc=f"{100 * correct.item() / max(count, 1):.1f}%",
                                            img_s=f"{count / max(epoch_time + time.time() - t0, 1e-9):.0f}")
                    if (stop.flag if not dist.enabled else (check and D.any_flag(stop.flag, device))):
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                bar.close()
                if phase == "update":
                    status, exit_code = "interrupted", EXIT_INTERRUPTED
                    message = ("interrupted inside an optimizer update: no checkpoint written; "
                               "the last complete checkpoint is kept")
                    break
                if snapshot is not None and phase == "compute":
                    rng, loss_sum, correct, count = snapshot
                else:
                    rng = ckpt.rng_state()
                if bool(nonfinite.item()):
                    status, exit_code = "diverged", EXIT_DIVERGED
                    message = "interrupted after a non-finite loss: no checkpoint written"
                    break
                partial = {"loss_sum": loss_sum.item(), "correct": correct.item(), "count": count,
                           "time": epoch_time + time.time() - t0}
                save("last.pt", state(epoch, step, gathered(rng)))
                status, exit_code = "interrupted", EXIT_INTERRUPTED
                message = (f"interrupted at epoch {epoch + 1}, step {step}: resumable checkpoint "
                           f"{run_dir / 'last.pt'} (vhist train --resume {run_dir / 'last.pt'})")
                break
            except TrainingDiverged as exc:
                bar.close()
                status, exit_code = "diverged", EXIT_DIVERGED
                message = f"{exc}: stopped; the last good checkpoint is kept"
                break
            bar.close()
            epoch_time += time.time() - t0
            loss_total, correct_total, count_total = D.all_sum([loss_sum.item(), correct.item(), count], device)
            val = evaluate(net, val_loader, device, channels_last, amp_dtype, cached_augment, "validation", dist) \
                if len(val_idx) else {"loss": None, "top1": None, "top5": None, "corrupt": []}
            corrupt.update(val["corrupt"])
            row = {"epoch": epoch + 1, "lr": last_lr,
                   "train_loss": loss_total / max(count_total, 1),
                   "train_top1": 100.0 * correct_total / max(count_total, 1),
                   "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
                   "epoch_time_s": epoch_time, "train_img_per_s": count_total / max(epoch_time, 1e-9)}
            history.append(row)
            is_best = val["top1"] is None or val["top1"] > best["val_top1"]
            if is_best:
                best = {"epoch": epoch + 1, "val_top1": val["top1"] if val["top1"] is not None else -math.inf}
            partial = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "time": 0.0}
            start_step = 0
            epoch += 1
            epochs_this_run += 1
            st = state(epoch, 0, gathered(ckpt.rng_state()))
            save("last.pt", st)
            if is_best:
                save("best.pt", st)
            if dist.is_main:
                write_metrics(run_dir, history)
            val_text = (f"val loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%"
                        if row["val_loss"] is not None else "no validation set")
            _main_print(dist, f"epoch {epoch}/{recipe.epochs}: train loss {row['train_loss']:.4f} "
                              f"top-1 {row['train_top1']:.2f}% | {val_text} | lr {row['lr']:.3g} | "
                              f"{row['train_img_per_s']:.0f} img/s" + (" | best" if is_best else ""))
            if cfg.stop_after_epochs and epochs_this_run >= cfg.stop_after_epochs and epoch < recipe.epochs:
                status = "stopped"
                message = (f"stopped after {epochs_this_run} epoch(s) as asked; resume with "
                           f"vhist train --resume {run_dir / 'last.pt'}")
                break

    summary = {"status": status, "message": message, "exit_code": exit_code, "run_dir": str(run_dir),
               "model": cfg.model, "recipe": cfg.recipe, "data": data.kind, "device": config["device"],
               "world_size": dist.world, "backend": config["backend"], "epochs_done": len(history),
               "best_epoch": best["epoch"], "best_val_top1": best["val_top1"] if best["epoch"] else None,
               "test_top1": None, "test_top5": None, "test_loss": None, "test_images": len(test_idx),
               "wall_time_s": prior_wall + time.time() - start_wall,
               "train_img_per_s": float(np.mean([r["train_img_per_s"] for r in history])) if history else None,
               "corrupt_images": len(corrupt), "corrupt_paths": sorted(corrupt)[:100]}
    if status == "completed":
        best_state = ckpt.load(run_dir / "best.pt", map_location=device)
        model.load_state_dict(best_state["model"])
        test = evaluate(net, test_loader, device, channels_last, amp_dtype, cached_augment, "test", dist)
        corrupt.update(test["corrupt"])
        summary.update(test_top1=test["top1"], test_top5=test["top5"], test_loss=test["loss"],
                       corrupt_images=len(corrupt), corrupt_paths=sorted(corrupt)[:100])
        message = (f"test top-1 {test['top1']:.2f}%, top-5 {test['top5']:.2f}% (best validation epoch "
                   f"{best['epoch']}), {summary['wall_time_s']:.1f} s, {summary['train_img_per_s']:.0f} img/s")
        summary["message"] = message
    if dist.is_main:
        with open(run_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
    if corrupt:
        _main_print(dist, f"skipped {len(corrupt)} corrupt image(s) (listed in summary.json)")
    _main_print(dist, f"{status}: {message}")
    return summary


def _bench_loader(loader, sampler, cfg, device, cached_augment, dist) -> dict:
    """img/s of the data pipeline alone (decode, augment, collate, copy to the device,
    device augmentation when cached), no model."""
    sampler.set_epoch(0)
    n_images, batches = 0, 0
    t0 = None
    for images, _, _ in loader:
        if images is None:
            continue
        images = images.to(device, non_blocking=True)
        if cached_augment is not None:
            images = device_augment(images, *cached_augment, np.random.default_rng(batches), train=True)
        normalize(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        batches += 1
        if t0 is None:  # the first batch pays for worker start-up
            t0 = time.time()
            continue
        n_images += images.shape[0]
        if batches > cfg.bench_loader:
            break
    elapsed = time.time() - (t0 or time.time())
    rate = D.all_sum([n_images / max(elapsed, 1e-9)], device)[0]
    _main_print(dist, f"loader alone: {rate:.0f} img/s over {n_images} images x{dist.world} "
                      f"({'uint8 cache + device augmentation' if cached_augment else 'decode + CPU augmentation'})")
    return {"status": "bench-loader", "loader_img_per_s": rate, "images": n_images, "exit_code": EXIT_OK}


def evaluate_checkpoint(path: str, data_spec: Optional[str] = None, split: str = "test", batch_size: int = 128,
                        workers: Optional[int] = None, device: str = "auto", backend: Optional[str] = None) -> dict:
    """``vhist eval``: loss, top-1 and top-5 of a checkpoint's weights on a split.

    The validation split is re-carved with the checkpoint's seed and fraction, so it is
    the one the run selected on."""
    import vhist
    from vhist.backend import use_backend

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    state = ckpt.load(path, map_location=dev)
    tc = state["train_config"]
    data = load_data(data_spec or tc["data"], tc["val_fraction"], tc["seed"])
    if data.num_classes != state["num_classes"]:
        raise ValueError(f"{data.root} has {data.num_classes} classes; the checkpoint was trained on "
                         f"{state['num_classes']}")
    size, augment = state["image_size"], state["recipe"]["augment"]
    src, idx = {"train": (data.train, data.train_idx), "val": (data.train, data.val_idx),
                "test": (data.test, data.test_idx)}[split]
    context = use_backend(backend) if backend else contextlib.nullcontext()
    with context:
        model = vhist.create_model(tc["model"], num_classes=state["num_classes"], image_size=size)
        if tc.get("sync_bn"):
            model = vhist.nn.convert_sync_batchnorm(model)
        model.load_state_dict(state["model"])
        model.to(dev)
        channels_last = dev.type == "cuda"
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        w = (8 if dev.type == "cuda" else 0) if workers is None else workers
        loader = make_loader(SampleSet(src, idx, size, augment, False, tc["seed"]),
                             EpochBatches(len(idx), batch_size, tc["seed"], False), w, dev.type == "cuda")
        amp = torch.bfloat16 if dev.type == "cuda" else None
        result = evaluate(model, loader, dev, channels_last, amp, None, split)
    result["corrupt"] = len(result["corrupt"])
    return {"checkpoint": str(path), "split": split, "data": data.root, "model": tc["model"], **result}
