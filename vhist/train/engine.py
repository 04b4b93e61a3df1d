"""The training loop of ``vhist train``, in stages as timm's ``train.py``: set-up
(:func:`vhist.train.setup.setup_run`), :func:`train_one_epoch`, :func:`evaluate`, the
checkpoint state (:class:`RunState`) and the run summary (:func:`finish_run`).

A run folder holds:

* ``config.json``: the command, the resolved recipe, data, model, device and versions;
* ``metrics.jsonl`` and ``metrics.csv``: one row per epoch (train and validation loss
  and accuracy, learning rate, img/s, epoch time; with ``--ema`` also the EMA weights'
  validation loss and accuracy and the decay in use);
* ``curves.png``: loss and accuracy per epoch (matplotlib, Agg backend);
* ``last.pt`` (every epoch, on Ctrl-C, and with ``--stop-after-epochs``) and ``best.pt``
  (highest validation top-1 of the raw or, with ``--ema``, the EMA weights, whichever is
  higher; ``best["weights"]`` says which), both complete resumable checkpoints (with the
  EMA) written atomically;
* ``summary.json``: the test top-1/top-5 of the best-on-validation weights (evaluated
  once, at the end; ``best_weights``: raw or ema), wall time, img/s, skipped corrupt
  images and the final status.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vhist.train import checkpoint as ckpt
from vhist.train import distributed as D
from vhist.train.augment import auto_augment, mix_batch, random_erasing, soft_target_cross_entropy, step_generators
from vhist.train.eval_loop import evaluate
from vhist.train.guards import (EXIT_BUG, EXIT_DIVERGED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, RunEnded,
                                StopRequest, TrainingDiverged, expected_errors)
from vhist.train.graph import graph_train_step
from vhist.train.metrics import StepProgress, write_metrics
from vhist.train.setup import (Run, TrainConfig, create_run_dir, is_finished, load_resume, main_print,
                               resolve_device, resolve_recipe, setup_run)
from vhist.train.transforms import device_augment, normalize

__all__ = ["EXIT_DIVERGED", "EXIT_INTERRUPTED", "EXIT_OK", "RunState", "TrainConfig", "TrainingDiverged",
           "evaluate", "finish_run", "resolve_recipe", "train", "train_one_epoch"]


def _empty_partial() -> dict:
    return {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "time": 0.0}


def gathered(dist: D.DistInfo, obj):
    """Per-process state (RNG, partial-epoch sums): one entry per rank under DDP."""
    if not dist.enabled:
        return obj
    box = [None] * dist.world
    torch.distributed.all_gather_object(box, obj)
    return box


def _own(dist: D.DistInfo, obj):
    return obj[dist.rank] if isinstance(obj, list) else obj


# ----------------------------------------------------------------------------- checkpoint state


@dataclass
class RunState:
    """Where a run stands: what a checkpoint holds besides the model and optimizer."""

    epoch: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": None, "val_top1": -math.inf})
    partial: dict = field(default_factory=_empty_partial)
    corrupt: set = field(default_factory=set)
    prior_wall: float = 0.0
    start_wall: float = field(default_factory=time.time)

    @classmethod
    def start(cls, run: Run, start_wall: float) -> "RunState":
        """A fresh state, or the one of ``--resume`` with the model, optimizer, schedule,
        scaler and RNG restored."""
        state, saved = cls(start_wall=start_wall), run.resume_state
        if saved is None:
            return state
        run.model.load_state_dict(saved["model"])
        run.optimizer.load_state_dict(saved["optimizer"])
        run.schedule.load_state_dict(saved["schedule"])
        run.scaler.load_state_dict(saved["scaler"])
        if run.ema is not None:
            if saved.get("ema") is None:
                raise ValueError(f"{run.cfg.resume} was written without --ema; a resumed run keeps its recipe")
            run.ema.load_state_dict(saved["ema"])
        state.epoch, state.step = saved["epoch"], saved["step"]
        state.history, state.best = saved["history"], saved["best"]
        state.partial = _own(run.dist, saved["partial"])
        state.corrupt = set(saved["corrupt"])
        state.prior_wall = saved["wall_time_s"]
        ckpt.set_rng_state(_own(run.dist, saved["rng"]))
        return state

    def wall_time(self) -> float:
        return self.prior_wall + time.time() - self.start_wall

    def checkpoint(self, run: Run, rng) -> dict:
        """The complete resumable checkpoint (``rng`` already gathered over ranks)."""
        return {"format": ckpt.FORMAT, "train_config": dataclasses.asdict(run.cfg), "recipe": run.recipe.to_dict(),
                "num_classes": run.data.num_classes, "classes": run.data.classes,
                "image_size": run.recipe.image_size, "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(), "schedule": run.schedule.state_dict(),
                "scaler": run.scaler.state_dict(), "ema": run.ema.state_dict() if run.ema is not None else None,
                "rng": rng, "epoch": self.epoch, "step": self.step,
                "history": self.history, "best": self.best, "partial": gathered(run.dist, dict(self.partial)),
                "corrupt": sorted(self.corrupt), "wall_time_s": self.wall_time()}


def save(run: Run, name: str, state: dict) -> None:
    """Writes a checkpoint into the run folder (main process), atomically."""
    if run.dist.is_main:
        ckpt.save_atomic(state, run.run_dir / name)
    D.barrier()


def _evaluate_split(run: Run, split: str, desc: str, model: Optional[torch.nn.Module] = None) -> dict:
    """``model`` (default: the trained net) on the validation or test split."""
    loader = run.loaders.val if split == "val" else run.loaders.test
    return evaluate(run.net if model is None else model, loader, run.device, run.channels_last, run.amp_dtype,
                    run.loaders.cached_augment, desc, run.dist)


# ----------------------------------------------------------------------------- one epoch


class EpochProgress:
    """The running sums of one training epoch, the phase of the current step and the
    snapshot a Ctrl-C inside a step's forward/backward rolls back to."""

    def __init__(self, run: Run, state: RunState):
        p, device = state.partial, run.device
        self.loss_sum = torch.tensor(p["loss_sum"], dtype=torch.float64, device=device)
        self.correct = torch.tensor(p["correct"], dtype=torch.float64, device=device)
        self.count, self.time = p["count"], p["time"]
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.step = state.step
        self.t0 = time.time()
        self.phase, self.snapshot = "between", None
        self.last_lr = run.optimizer.param_groups[0]["lr"]

    def take_snapshot(self) -> None:
        self.snapshot = (ckpt.rng_state(), self.loss_sum.clone(), self.correct.clone(), self.count)

    def partial(self) -> dict:
        return {"loss_sum": self.loss_sum.item(), "correct": self.correct.item(), "count": self.count,
                "time": self.time + time.time() - self.t0}

    def img_per_s(self) -> float:
        return self.count / max(self.time + time.time() - self.t0, 1e-9)


def train_step(run: Run, ep: EpochProgress, images, labels, epoch: int) -> None:
    """Forward, backward and optimizer update of one batch; ``ep.phase`` tells a Ctrl-C
    whether the update has begun."""
    device = run.device
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    if run.loaders.cached_augment is not None:
        gen = np.random.default_rng((run.cfg.seed, epoch, ep.step, run.dist.rank))
        images = device_augment(images, *run.loaders.cached_augment, gen, train=True)
    x, targets = augment_batch(run, images, labels, epoch, ep.step)
    if run.cfg.cuda_graph:
        loss, logits = graph_train_step(run, ep, x, labels, eager_update)
    else:
        loss, logits = eager_update(run, ep, x, labels, targets)
    if run.ema is not None:
        run.ema.update(run.model)
    n = labels.numel()
    ep.loss_sum += loss.detach().double() * n
    ep.correct += (logits.detach().argmax(1) == labels).sum().double()
    ep.count += n
    ep.nonfinite |= ~torch.isfinite(loss.detach())


def eager_update(run: Run, ep: EpochProgress, x, labels, targets: Optional[torch.Tensor] = None) -> tuple:
    """Forward, backward and optimizer update of one normalized batch, eagerly.

    Args:
        targets: soft targets of mixup / cutmix, or None (the criterion takes the labels).

    Returns:
        ``(loss, logits)``.
    """
    recipe = run.recipe
    with torch.autocast(x.device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
        logits = run.net(x)
    if targets is None:
        loss = run.criterion(logits.float(), labels)
    else:
        loss = soft_target_cross_entropy(logits.float(), targets)
    if run.probe is not None:
        run.probe.check()
    run.scaler.scale(loss).backward()
    ep.phase = "update"
    if recipe.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), recipe.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return loss, logits


def augment_batch(run: Run, images: torch.Tensor, labels: torch.Tensor, epoch: int, step: int
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The recipe's batch augmentations (auto-augment, normalization, random erasing,
    mixup / cutmix), drawn from generators seeded by the step's position in the run.

    Returns:
        The network input and the soft targets (None without mixup / cutmix: the
        criterion takes the labels).
    """
    aug = run.augment
    if not aug.active:
        return normalize(images, channels_last=run.channels_last), None
    rng, gen = step_generators(run.cfg.seed, epoch, step, run.dist.rank, run.device)
    images = auto_augment(images, aug.auto_augment, rng)
    x = normalize(images, channels_last=run.channels_last)
    if aug.random_erasing > 0:
        x = random_erasing(x, aug.random_erasing, rng, gen)
    if not aug.mix.enabled:
        return x, None
    x, targets, _ = mix_batch(x, labels, run.data.num_classes, aug.mix, rng)
    return x, targets


def _check(run: Run, ep: EpochProgress, progress: StepProgress, epoch: int, stop: StopRequest) -> None:
    """Every ``--log-every`` steps: the NaN check (all ranks) and the progress (also when
    a plain progress line is due); at every step (every check under DDP): a pending Ctrl-C."""
    dist, device = run.dist, run.device
    check = ep.step % run.cfg.log_every == 0 or ep.step == run.loaders.steps_per_epoch
    if check:
        if D.any_flag(bool(ep.nonfinite.item()), device):
            raise TrainingDiverged(f"non-finite loss at epoch {epoch + 1}, step {ep.step}")
    if dist.is_main and progress.n and (check or progress.line_due()):
        progress.report(ep.step, run.loaders.steps_per_epoch, ep.loss_sum.item() / max(ep.count, 1),
                        100 * ep.correct.item() / max(ep.count, 1), ep.img_per_s())
    if stop.flag if not dist.enabled else (check and D.any_flag(stop.flag, device)):
        raise KeyboardInterrupt


def _interrupted(run: Run, state: RunState, ep: EpochProgress) -> RunEnded:
    """Saves a resumable checkpoint at the last step boundary, unless the interrupt came
    inside an optimizer update or after a non-finite loss."""
    if ep.phase == "update":
        return RunEnded("interrupted", EXIT_INTERRUPTED, "interrupted inside an optimizer update: no checkpoint "
                                                         "written; the last complete checkpoint is kept")
    if ep.snapshot is not None and ep.phase == "compute":
        rng, ep.loss_sum, ep.correct, ep.count = ep.snapshot
    else:
        rng = ckpt.rng_state()
    if bool(ep.nonfinite.item()):
        return RunEnded("diverged", EXIT_DIVERGED, "interrupted after a non-finite loss: no checkpoint written")
    state.partial, state.step = ep.partial(), ep.step
    save(run, "last.pt", state.checkpoint(run, gathered(run.dist, rng)))
    last = run.run_dir / "last.pt"
    return RunEnded("interrupted", EXIT_INTERRUPTED, f"interrupted at epoch {state.epoch + 1}, step {ep.step}: "
                                                     f"resumable checkpoint {last} (vhist train --resume {last})")


def train_one_epoch(run: Run, state: RunState, stop: StopRequest) -> EpochProgress:
    """Trains from ``state.step`` to the end of epoch ``state.epoch``.

    Returns:
        The epoch's sums and its last learning rate.

    Raises:
        RunEnded: on Ctrl-C (after saving a resumable checkpoint) or a non-finite loss.
    """
    run.net.train()
    run.loaders.sampler.set_epoch(state.epoch, state.step)
    ep = EpochProgress(run, state)
    bar = StepProgress(run.loaders.steps_per_epoch - state.step, f"epoch {state.epoch + 1}/{run.recipe.epochs}",
                       run.dist.is_main, run.cfg.log_every)
    try:
        for images, labels, bad in run.loaders.train:
            ep.take_snapshot()
            ep.phase = "compute"
            state.corrupt.update(bad)
            if images is not None:
                train_step(run, ep, images, labels, state.epoch)
            ep.last_lr = run.optimizer.param_groups[0]["lr"]
            run.schedule.step()
            ep.step += 1
            ep.phase = "between"
            bar.update()
            _check(run, ep, bar, state.epoch, stop)
    except KeyboardInterrupt:
        bar.close()
        raise _interrupted(run, state, ep) from None
    except TrainingDiverged as exc:
        bar.close()
        raise RunEnded("diverged", EXIT_DIVERGED, f"{exc}: stopped; the last good checkpoint is kept") from None
    bar.close()
    ep.time += time.time() - ep.t0
    return ep


def end_epoch(run: Run, state: RunState, ep: EpochProgress) -> None:
    """Validation, the metrics row, ``last.pt`` / ``best.pt`` and the epoch line."""
    loss_total, correct_total, count_total = D.all_sum([ep.loss_sum.item(), ep.correct.item(), ep.count],
                                                       run.device)
    has_val = bool(run.loaders.sizes["val"])
    val = _evaluate_split(run, "val", "validation") if has_val else \
        {"loss": None, "top1": None, "top5": None, "corrupt": []}
    state.corrupt.update(val["corrupt"])
    ema_val = _evaluate_split(run, "val", "validation (EMA)", run.ema.module) if has_val and run.ema else None
    row = {"epoch": state.epoch + 1, "lr": ep.last_lr,
           "train_loss": loss_total / max(count_total, 1), "train_top1": 100.0 * correct_total / max(count_total, 1),
           "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
           "epoch_time_s": ep.time, "train_img_per_s": count_total / max(ep.time, 1e-9)}
    if run.ema is not None:
        row.update(ema_val_loss=ema_val and ema_val["loss"], ema_val_top1=ema_val and ema_val["top1"],
                   ema_val_top5=ema_val and ema_val["top5"], ema_decay=run.ema.decay_at(max(run.ema.updates - 1, 0)))
    state.history.append(row)
    weights, score = select_weights(val, ema_val, run.ema is not None)
    is_best = score is None or score > state.best["val_top1"]
    if is_best:
        state.best = {"epoch": state.epoch + 1, "val_top1": score if score is not None else -math.inf,
                      "weights": weights}
    state.partial, state.step, state.epoch = _empty_partial(), 0, state.epoch + 1
    checkpoint = state.checkpoint(run, gathered(run.dist, ckpt.rng_state()))
    save(run, "last.pt", checkpoint)
    if is_best:
        save(run, "best.pt", checkpoint)
    if run.dist.is_main:
        write_metrics(run.run_dir, state.history)
    val_text = (f"val loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%"
                if row["val_loss"] is not None else "no validation set")
    if ema_val is not None:
        val_text += f" | EMA val top-1 {ema_val['top1']:.2f}% top-5 {ema_val['top5']:.2f}%"
    best_text = f" | best ({weights} weights)" if run.ema is not None else " | best"
    main_print(run.dist, f"epoch {state.epoch}/{run.recipe.epochs}: train loss {row['train_loss']:.4f} "
                         f"top-1 {row['train_top1']:.2f}% | {val_text} | lr {row['lr']:.3g} | "
                         f"{row['train_img_per_s']:.0f} img/s" + (best_text if is_best else ""))


def select_weights(val: dict, ema_val: Optional[dict], has_ema: bool) -> tuple[str, Optional[float]]:
    """Which weights an epoch offers for best-epoch selection: ``("raw" | "ema", val
    top-1)``, the better of the two on validation (raw on a tie); without a validation
    set (score None), the EMA weights when there are any, as the papers evaluate them."""
    if val["top1"] is None:
        return ("ema" if has_ema else "raw"), None
    if ema_val is not None and ema_val["top1"] > val["top1"]:
        return "ema", ema_val["top1"]
    return "raw", val["top1"]


# ----------------------------------------------------------------------------- the run


def fit(run: Run, state: RunState) -> RunEnded:
    """Epochs until the recipe's last, a Ctrl-C, a non-finite loss or ``--stop-after-epochs``."""
    cfg, epochs, done_here = run.cfg, run.recipe.epochs, 0
    with StopRequest() as stop:
        try:
            while state.epoch < epochs:
                end_epoch(run, state, train_one_epoch(run, state, stop))
                done_here += 1
                if cfg.stop_after_epochs and done_here >= cfg.stop_after_epochs and state.epoch < epochs:
                    raise RunEnded("stopped", EXIT_OK, f"stopped after {done_here} epoch(s) as asked; resume with "
                                                       f"vhist train --resume {run.run_dir / 'last.pt'}")
        except RunEnded as ended:
            return ended
    return RunEnded("completed", EXIT_OK)


def finish_run(run: Run, state: RunState, outcome: RunEnded) -> dict:
    """The run summary: on completion, the test accuracy of the best-on-validation
    weights (evaluated once); written to ``summary.json`` and printed."""
    history, best, corrupt = state.history, state.best, state.corrupt
    summary = {"status": outcome.status, "message": outcome.message, "exit_code": outcome.exit_code,
               "run_dir": str(run.run_dir), "model": run.cfg.model, "recipe": run.cfg.recipe, "data": run.data.kind,
               "device": run.config["device"], "world_size": run.dist.world, "backend": run.config["backend"],
               "epochs_done": len(history), "best_epoch": best["epoch"],
               "best_val_top1": best["val_top1"] if best["epoch"] and best["val_top1"] > -math.inf else None,
               "best_weights": best.get("weights", "raw") if best["epoch"] else None,
               "test_top1": None, "test_top5": None, "test_loss": None, "test_images": run.loaders.sizes["test"],
               "wall_time_s": state.wall_time(),
               "train_img_per_s": float(np.mean([r["train_img_per_s"] for r in history])) if history else None,
               "corrupt_images": len(corrupt), "corrupt_paths": sorted(corrupt)[:100]}
    if outcome.status == "completed":
        best_state = ckpt.load(run.run_dir / "best.pt", map_location=run.device)
        if summary["best_weights"] == "ema":
            run.ema.load_state_dict(best_state["ema"])
            test = _evaluate_split(run, "test", "test (EMA weights)", run.ema.module)
        else:
            run.model.load_state_dict(best_state["model"])
            test = _evaluate_split(run, "test", "test")
        corrupt.update(test["corrupt"])
        summary.update(test_top1=test["top1"], test_top5=test["top5"], test_loss=test["loss"],
                       corrupt_images=len(corrupt), corrupt_paths=sorted(corrupt)[:100])
        summary["message"] = (f"test top-1 {test['top1']:.2f}%, top-5 {test['top5']:.2f}% (best validation epoch "
                              f"{best['epoch']}, {summary['best_weights']} weights), {summary['wall_time_s']:.1f} s, "
                              f"{summary['train_img_per_s']:.0f} img/s")
    if run.dist.is_main:
        with open(run.run_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
    if corrupt:
        main_print(run.dist, f"skipped {len(corrupt)} corrupt image(s) (listed in summary.json)")
    if outcome.status != "failed":  # a failure's message is the CLI's error line
        main_print(run.dist, f"{summary['status']}: {summary['message']}")
    return summary


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) a training run; returns the summary dict (also written to
    ``summary.json``). The summary's ``exit_code`` is 0 (done, already complete, or
    stopped by ``--stop-after-epochs``), 3 (diverged) or 130 (interrupted, resumable).

    Arguments, checkpoint, device, backend and data are validated before the run folder
    is created; an error after that leaves the folder with a ``summary.json`` whose
    status is ``failed``."""
    from vhist.backend import use_backend

    start_wall = time.time()
    resume_state = load_resume(cfg)
    if resume_state is not None and is_finished(resume_state):
        return finished_run(cfg, resume_state)
    device, dist = resolve_device(cfg)
    context = use_backend(cfg.backend) if cfg.backend else contextlib.nullcontext()
    try:
        with context:
            summary = _train_on_device(cfg, device, dist, resume_state, start_wall)
        # Every rank has released its run (the model's DDP reducer holds the process
        # group) before any rank tears the group down: a reducer freed after its peer's
        # process exited waits on that peer forever.
        gc.collect()
        D.barrier()
        return summary
    finally:
        D.cleanup()


def _train_on_device(cfg: TrainConfig, device, dist, resume_state, start_wall: float) -> dict:
    """:func:`train` once the device is resolved; everything that holds the model lives
    in this frame."""
    run = setup_run(cfg, device, dist, resume_state)
    if cfg.bench_loader:
        return bench_loader(run)
    state = RunState.start(run, start_wall)
    create_run_dir(run)
    if run.resume_state is not None:
        main_print(dist, f"resuming from {cfg.resume}: epoch {state.epoch + 1}, step {state.step}")
    try:
        return finish_run(run, state, fit(run, state))
    except Exception as exc:
        code = EXIT_FAILED if isinstance(exc, expected_errors()) else EXIT_BUG
        finish_run(run, state, RunEnded("failed", code, f"{type(exc).__name__}: {exc}"))
        raise


def finished_run(cfg: TrainConfig, state: dict) -> dict:
    """``--resume`` of a run that has trained all its epochs: says so and, only with
    ``--eval``, evaluates its ``best.pt`` on the test split again."""
    run_dir = Path(cfg.resume).resolve().parent
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if os.environ.get("RANK", "0") != "0":  # under torchrun the process group is not started: rank 0 speaks
        return {**summary, "status": "complete", "exit_code": EXIT_OK}
    print(f"run {run_dir} is already complete ({state['epoch']}/{state['recipe']['epochs']} epochs"
          + (f"; {summary['message']}" if summary.get("message") else "") + "): nothing to train"
          + ("" if cfg.eval_finished else "; add --eval to evaluate its best.pt on the test split again"), flush=True)
    if cfg.eval_finished:
        from vhist.train.evaluation import evaluate_checkpoint

        best = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else Path(cfg.resume)
        result = evaluate_checkpoint(str(best), cfg.data, "test", workers=cfg.workers, device=cfg.device,
                                     backend=cfg.backend)
        print(json.dumps(result, indent=2), flush=True)
        summary["evaluation"] = result
    return {**summary, "status": "complete", "exit_code": EXIT_OK}


def bench_loader(run: Run) -> dict:
    """img/s of the data pipeline alone (decode, augment, collate, copy to the device,
    device augmentation when cached), no model."""
    device, cached_augment, limit = run.device, run.loaders.cached_augment, run.cfg.bench_loader
    run.loaders.sampler.set_epoch(0)
    n_images, batches, t0 = 0, 0, None
    for images, _, _ in run.loaders.train:
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
        if batches > limit:
            break
    elapsed = time.time() - (t0 or time.time())
    rate = D.all_sum([n_images / max(elapsed, 1e-9)], device)[0]
    main_print(run.dist, f"loader alone: {rate:.0f} img/s over {n_images} images x{run.dist.world} "
                         f"({'uint8 cache + device augmentation' if cached_augment else 'decode + CPU augmentation'})")
    return {"status": "bench-loader", "loader_img_per_s": rate, "images": n_images, "exit_code": EXIT_OK}

