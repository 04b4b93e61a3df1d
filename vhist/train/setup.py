"""The set-up stage of ``vhist train``: one :class:`Run` with everything a run needs
(model, loaders, optimizer, schedule, scaler, run folder, distributed info), built and
validated before the run folder is created."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from vhist.train import checkpoint as ckpt
from vhist.train import distributed as D
from vhist.train.augment import BatchAugment, MixSpec
from vhist.train.data import DataBundle, EpochBatches, SampleSet, build_cache, load_data, make_loader
from vhist.train.graph import check_cuda_graph
from vhist.train.guards import SyncBNProbe
from vhist.train.ema import ModelEma
from vhist.train.recipes import LRSchedule, Recipe, build_optimizer, effective_lr, get_recipe


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
    eval_finished: bool = False                    # --eval: re-evaluate a finished run on --resume
    cuda_graph: bool = False                       # --cuda-graph: replay the captured training step
    pretrained: Optional[str] = None               # --pretrained: torchvision/timm weights file to start from
    compile: bool = False                          # --compile: torch.compile(backend="vhist") the model


@dataclass
class Loaders:
    """The three splits' loaders, the training sampler and the split sizes."""

    train: Any
    sampler: EpochBatches
    val: Any
    test: Any
    sizes: dict                          # {"train": n, "val": n, "test": n}
    steps_per_epoch: int
    cached_augment: Optional[tuple]      # (augment, size) when augmenting on the device


@dataclass
class Run:
    """One training run, set up: what every later stage reads."""

    cfg: TrainConfig
    recipe: Recipe
    data: DataBundle
    device: torch.device
    dist: D.DistInfo
    amp_dtype: Optional[torch.dtype]
    channels_last: bool
    workers: int
    model: torch.nn.Module               # the module (its state_dict is what is saved)
    net: torch.nn.Module                 # what runs the forward: model, or its DDP wrapper
    loaders: Loaders
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler
    criterion: torch.nn.Module
    probe: Optional[SyncBNProbe]
    resume_state: Optional[dict]
    ema: Optional[ModelEma] = None        # --ema: the averaged weights
    augment: BatchAugment = BatchAugment()  # batch augmentations on the device
    run_dir: Optional[Path] = None
    config: dict = field(default_factory=dict)


def main_print(dist: D.DistInfo, *args) -> None:
    """``print`` on the main process only."""
    if dist.is_main:
        print(*args, flush=True)


def resolve_recipe(cfg: TrainConfig, data: DataBundle, saved: Optional[dict] = None) -> Recipe:
    """The named recipe with the overrides, adapted to the data where not overridden:
    CIFAR-style arrays keep their native resolution and use pad-and-crop. A resumed run
    passes its checkpoint's resolved recipe (``saved``) and keeps it, even where the named
    recipe has changed since (issue 26 changed the imagenette warm-up); a field the
    checkpoint predates (``init``) takes the named recipe's value."""
    recipe = get_recipe(cfg.recipe, **cfg.overrides)
    if saved is not None:
        fields = {f.name for f in dataclasses.fields(Recipe)}
        values = {k: v for k, v in saved.items() if k in fields}
        values["betas"] = tuple(values.get("betas", recipe.betas))
        return dataclasses.replace(recipe, **values)
    if data.kind in ("cifar10", "cifar100", "synthetic"):
        changes = {}
        if "image_size" not in cfg.overrides:
            changes["image_size"] = data.native_size
        if "augment" not in cfg.overrides and data.kind != "synthetic":
            changes["augment"] = "cifar"
        recipe = dataclasses.replace(recipe, **changes)
    return recipe


def parse_device(spec: str, flag: str = "--device") -> torch.device:
    """The device ``spec`` names (``auto``: CUDA when available), checked to exist here.

    Raises:
        ValueError: naming ``flag``, for a malformed spec or a device this machine lacks.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag} {spec}: vhist runs on cpu or cuda devices")
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"{flag} {spec}: CUDA is not available here ({why}); use {flag} cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{flag} {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_device(cfg: TrainConfig) -> tuple[torch.device, D.DistInfo]:
    """The device of this process and the process group (``torchrun``)."""
    device = parse_device(cfg.device)
    dist = D.init_from_env(device.type)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    return device, dist


def check_backend(device: torch.device, flag_value: Optional[str]) -> str:
    """The backend the run's ops will use on ``device`` (inside its ``use_backend``),
    checked to run there.

    Raises:
        BackendUnavailable: triton on CPU without the interpreter, cuda on a CPU device.
    """
    import vhist
    from vhist.backend import BackendUnavailable
    from vhist.ops._dispatch import triton_cpu_ready

    backend = vhist.resolve_backend(device)
    where = f"--backend {flag_value}" if flag_value else f"backend {backend}"
    if backend == "triton" and device.type == "cpu" and not triton_cpu_ready():
        raise BackendUnavailable(
            f"{where} on a CPU device needs Triton's interpreter: set TRITON_INTERPRET=1 before starting vhist "
            "(setting it after import has no effect), or use --backend torch or a CUDA device")
    if backend == "cuda" and device.type != "cuda":
        raise BackendUnavailable(f"{where} runs CUDA tensors only; use a CUDA --device or --backend torch")
    return backend


def load_resume(cfg: TrainConfig) -> Optional[dict]:
    """The checkpoint of ``--resume`` (validated), with the run's identity copied into
    ``cfg``: only device-side options may change, and ``--data`` may point at a moved
    copy. Without ``--resume``, checks that ``--model`` and ``--data`` are given and
    that the model exists."""
    import vhist

    if not cfg.resume:
        if not cfg.model or not cfg.data:
            missing = " and ".join(f for f, v in (("--model", cfg.model), ("--data", cfg.data)) if not v)
            raise ValueError(f"vhist train needs {missing} (or --resume CHECKPOINT)")
        from vhist.convert.external import check_model

        check_model(cfg.model)
        if cfg.pretrained and not Path(cfg.pretrained).is_file():
            raise FileNotFoundError(f"pretrained weights {cfg.pretrained} do not exist")
        return None
    if cfg.pretrained:
        raise ValueError("--pretrained starts a new run from a weights file; --resume continues a run from its "
                         "checkpoint: give one of them")
    state = ckpt.load(cfg.resume)
    saved = state["train_config"]
    for key in ("model", "recipe", "overrides", "seed", "val_fraction", "sync_bn", "cache", "run_name"):
        setattr(cfg, key, saved[key])
    cfg.data = cfg.data or saved["data"]
    return state


def is_finished(state: dict) -> bool:
    """Whether a checkpoint's run has trained all of its recipe's epochs."""
    return state["step"] == 0 and state["epoch"] >= state["recipe"]["epochs"]


def amp_dtype(recipe: Recipe, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of the recipe's ``amp`` on ``device`` (None: off)."""
    amp = recipe.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def _configure_determinism(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def build_model(cfg: TrainConfig, data: DataBundle, recipe: Recipe, device: torch.device, channels_last: bool,
                dist: D.DistInfo) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The seeded zoo model, initialized with the recipe's ``init``, on ``device`` and what
    runs its forward (DDP under torchrun)."""
    import vhist
    from vhist.convert.external import build, is_external
    from vhist.models import DropPath

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    extra = {"drop_path_rate": recipe.drop_path} if recipe.drop_path else {}
    no_drop_path = ValueError(f"--drop-path: model {cfg.model} has no stochastic depth (resnet*, inception_resnet_*, "
                              "vit_* have it)")
    try:
        # A torchvision / timm model keeps its library's initialization; a zoo model takes the recipe's.
        init = {} if is_external(cfg.model) else {"init": recipe.init}
        model = build(cfg.model, num_classes=data.num_classes, image_size=recipe.image_size, **init, **extra)
    except TypeError as exc:
        if "drop_path_rate" not in str(exc):
            raise
        raise no_drop_path from None
    if recipe.drop_path and not any(isinstance(m, DropPath) and m.drop_prob > 0 for m in model.modules()):
        raise no_drop_path  # an entrypoint that took the keyword and ignored it
    if cfg.pretrained:
        from vhist.models.pretrained import load_pretrained

        main_print(dist, load_pretrained(model, cfg.pretrained).message())
    if cfg.sync_bn:
        model = vhist.nn.convert_sync_batchnorm(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        from vhist.convert.dynamo import prime

        prime(device)
        # vhist.convert's rewrite on each captured graph, the rest by Inductor (vhist.convert.dynamo).
        net = torch.compile(net, backend="vhist")
    return model, net


def _cached_sources(cfg: TrainConfig, data: DataBundle, recipe: Recipe, dist: D.DistInfo) -> dict:
    """(source, indices) per split: the data's own, or uint8 caches built once by rank 0."""
    sources = {"train": (data.train, data.train_idx), "val": (data.train, data.val_idx),
               "test": (data.test, data.test_idx)}
    if not (cfg.cache and data.kind == "folder"):
        return sources
    cache_size = round(recipe.image_size / 0.875)
    cache_dir = Path(cfg.cache_dir or Path(data.root) / ".vhist-cache")
    for tag, (src, idx) in list(sources.items()):
        if dist.is_main:
            built = build_cache(src, idx, cache_size, cache_dir, f"{tag}-seed{cfg.seed}")
        D.barrier()
        if not dist.is_main:
            built = build_cache(src, idx, cache_size, cache_dir, f"{tag}-seed{cfg.seed}")
        sources[tag] = (built, np.arange(len(built)))
    return sources


def build_loaders(cfg: TrainConfig, data: DataBundle, recipe: Recipe, device: torch.device, workers: int,
                  dist: D.DistInfo) -> Loaders:
    """Seeded, rank-sharded loaders of the train, validation and test splits."""
    cached = cfg.cache
    sources = _cached_sources(cfg, data, recipe, dist)
    size, augment, pin = recipe.image_size, recipe.augment, device.type == "cuda"
    eval_bs = cfg.eval_batch_size or recipe.batch_size

    def eval_loader(tag: str):
        src, idx = sources[tag]
        return make_loader(SampleSet(src, idx, size, augment, False, cfg.seed, raw=cached),
                           EpochBatches(len(idx), eval_bs, cfg.seed, False, dist.rank, dist.world), workers, pin)

    train_src, train_idx = sources["train"]
    train_set = SampleSet(train_src, train_idx, size, augment, True, cfg.seed, raw=cached)
    sampler = EpochBatches(len(train_set), recipe.batch_size, cfg.seed, True, dist.rank, dist.world)
    val_loader, test_loader = eval_loader("val"), eval_loader("test")
    train_loader = make_loader(train_set, sampler, workers, pin)
    if len(sampler) == 0:
        raise ValueError(f"the training split has {len(train_set)} images per process, fewer than one batch "
                         f"(--batch-size {recipe.batch_size})")
    return Loaders(train_loader, sampler, val_loader, test_loader,
                   {tag: len(idx) for tag, (_, idx) in sources.items()}, len(sampler),
                   (augment, size) if cached else None)


def setup_run(cfg: TrainConfig, device: torch.device, dist: D.DistInfo, resume_state: Optional[dict]) -> Run:
    """Validates the backend and recipe, loads the data and builds the model, loaders and
    optimizer. The run folder is not created here."""
    if cfg.cuda_graph:
        if cfg.compile:
            raise ValueError("--compile and --cuda-graph: give one of them")
        check_cuda_graph(device, distributed=dist.enabled)
    check_backend(device, cfg.backend)
    data = load_data(cfg.data, cfg.val_fraction, cfg.seed)
    recipe = resolve_recipe(cfg, data, resume_state["recipe"] if resume_state is not None else None)
    amp = amp_dtype(recipe, device)
    if cfg.cuda_graph:
        check_cuda_graph(device, amp)
        if recipe.mixup > 0 or recipe.cutmix > 0:
            raise ValueError("--cuda-graph does not support --mixup/--cutmix yet (the captured step takes "
                             "hard labels); drop one of them")
    channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    workers = (8 if device.type == "cuda" else 0) if cfg.workers is None else cfg.workers
    _configure_determinism(cfg, device)
    model, net = build_model(cfg, data, recipe, device, channels_last, dist)
    loaders = build_loaders(cfg, data, recipe, device, workers, dist)
    optimizer = build_optimizer(model, recipe, dist.world)
    schedule = LRSchedule(optimizer, recipe, loaders.steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    ema = ModelEma(model, recipe.ema) if recipe.ema else None  # copied before the probe hooks the model
    probe = SyncBNProbe(model) if cfg.sync_bn else None
    augment = BatchAugment(recipe.auto_augment, recipe.random_erasing,
                           MixSpec(recipe.mixup, recipe.cutmix, recipe.mix_prob, recipe.mix_switch_prob,
                                   recipe.label_smoothing))
    return Run(cfg, recipe, data, device, dist, amp, channels_last, workers, model, net, loaders, optimizer,
               schedule, scaler, criterion, probe, resume_state, ema, augment)


def _versions() -> dict:
    import triton

    import vhist

    return {"vhist": vhist.__version__, "torch": torch.__version__, "triton": triton.__version__}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_config(run: Run) -> dict:
    """What ``config.json`` records: the command, resolved recipe, data, model, device, versions."""
    import vhist

    cfg, data = run.cfg, run.data
    return {
        "command": " ".join(sys.argv), "train_config": dataclasses.asdict(cfg), "recipe": run.recipe.to_dict(),
        "data": {"kind": data.kind, "root": data.root, "classes": data.classes, **run.loaders.sizes,
                 "notes": data.notes},
        "model": cfg.model, "parameters": sum(p.numel() for p in run.model.parameters()),
        "device": _device_name(run.device), "world_size": run.dist.world,
        "backend": vhist.resolve_backend(run.device),
        "amp": str(run.amp_dtype) if run.amp_dtype else "off", "channels_last": run.channels_last,
        "workers": run.workers, "cache": cfg.cache, "versions": _versions(),
    }


def create_run_dir(run: Run) -> Path:
    """Creates the run folder (the checkpoint's own folder when resuming) and writes
    ``config.json``; prints the run's header."""
    cfg, dist = run.cfg, run.dist
    if cfg.resume:
        run_dir = Path(cfg.resume).resolve().parent
    else:
        name = cfg.run_name or f"{cfg.model.replace(':', '-')}-{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
        if dist.enabled:
            box = [name]
            torch.distributed.broadcast_object_list(box, src=0)
            name = box[0]
        run_dir = Path(cfg.out_dir) / name
    run.run_dir, run.config = run_dir, run_config(run)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "config.json", "w") as f:
            json.dump(run.config, f, indent=2)
    D.barrier()
    _print_header(run)
    return run_dir


def _print_header(run: Run) -> None:
    cfg, data, dist, sizes = run.cfg, run.data, run.dist, run.loaders.sizes
    main_print(dist, f"run folder: {run.run_dir}")
    main_print(dist, f"recipe {cfg.recipe} (resolved):\n" + json.dumps(run.recipe.to_dict(), indent=2))
    where = f"synthetic images ({data.root.partition(':')[2] or 'defaults'})" if data.kind == "synthetic" \
        else f"{data.kind} at {data.root}"
    main_print(dist, f"data: {where}: {sizes['train']} train / {sizes['val']} validation / "
                     f"{sizes['test']} test images, {data.num_classes} classes" +
               "".join(f"\n  note: {n}" for n in data.notes))
    main_print(dist, f"model {cfg.model}: {run.config['parameters']:,} parameters on {run.config['device']} "
                     f"x{dist.world}, backend {run.config['backend']}, amp {run.config['amp']}, "
                     f"channels_last {run.channels_last}, sync_bn {cfg.sync_bn}")
    recipe = run.recipe
    if recipe.lr_base_batch:
        main_print(dist, f"learning rate {effective_lr(recipe, dist.world):g} = {recipe.lr:g} x {recipe.batch_size} "
                         f"x{dist.world} / {recipe.lr_base_batch} (--lr-base-batch)")
    if recipe.warmup_epochs >= recipe.epochs and dist.is_main:
        print(f"warning: the warm-up ({recipe.warmup_epochs:g} epochs) is not shorter than the run ({recipe.epochs} "
              f"epochs): the learning rate never reaches its base value {recipe.lr:g}; lower --warmup-epochs "
              "or raise --epochs", file=sys.stderr, flush=True)
