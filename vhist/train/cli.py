"""``vhist train`` and ``vhist eval`` argument parsing (argparse)."""
from __future__ import annotations

import argparse
import dataclasses
import json

from vhist.train.recipes import RECIPES, Recipe, describe_recipes
from vhist.train.augment import AUTO_AUGMENT_HELP
from vhist.train.transforms import AUGMENTATIONS

TRAIN_EPILOG = """\
recipes (every field can be overridden; the resolved recipe is printed at the start of
each run and saved in config.json):
{recipes}

data (--data):
  PATH to cifar-10-batches-py / cifar-100-python (or a folder containing one),
  PATH to an image-folder tree: ROOT/train/<class>/*.JPEG with ROOT/val/ (Imagenette:
  imagenette2, imagenette2-160, imagenette2-320) or ROOT/test/ as the test set,
  or synthetic[:classes=10,size=32,train=512,test=128]. Real data without a download:
  vhist data make digits --root DIR writes scikit-learn's digits as DIR/digits-32 (CIFAR-10 layout).
  The validation split (--val-fraction of train, seeded, per class) selects the best
  epoch; the test set is evaluated once, at the end.
  CIFAR data keeps its 32 px and uses pad-and-crop unless --image-size / --augment say
  otherwise.

examples:
  vhist train --model alexnet --data ~/data/imagenette2-320 --recipe seed-alexnet
  vhist train --model inception_v3 --data ~/data/cifar-10-batches-py --recipe paper-inception-v3
  torchrun --nproc_per_node=4 -m vhist train --model vgg16_bn --data ... --sync-bn
  vhist train --model resnet50 --pretrained resnet50.pth --data ~/data/imagenette2-320 --recipe finetune
  vhist train --resume runs/<run>/last.pt
  vhist eval --checkpoint runs/<run>/best.pt --data ~/data/imagenette2-320
"""

# The recipe fields that have a flag (--lr sets lr), with their help texts; the type is the field's.
RECIPE_HELP = """\
optimizer        sgd, adamw or rmsprop
lr               base learning rate
momentum         SGD / RMSProp momentum
weight_decay     weight decay
batch_size       batch size per process
epochs           number of epochs
image_size       training and evaluation resolution
schedule         step, cosine or constant
step_epochs      step schedule: epochs between decays
gamma            step schedule: decay factor
warmup_epochs    linear warm-up epochs
label_smoothing  label smoothing of the cross-entropy
grad_clip        clip the gradient norm to this (0: off)
augment          training augmentation: {augment}
amp              auto (bf16 on GPU, off on CPU), bf16, fp16 or off
init             weight initialization: paper, modern or torch (PyTorch's layer defaults)
lr_base_batch    if > 0: --lr is per this many images, scaled by the global batch
auto_augment     batch augmentation on the device: {auto_augment}
random_erasing   probability of random erasing per image (0: off)
mixup            mixup Beta alpha (0: off)
cutmix           cutmix Beta alpha (0: off)
mix_prob         probability that a batch is mixed (mixup or cutmix)
mix_switch_prob  with --mixup and --cutmix: probability of cutmix for a mixed batch
drop_path        stochastic depth of the last block, linear from 0 (resnet, inception_resnet, vit)
ema              decay of the weight EMA evaluated beside the raw weights (0: off)"""
_TYPES = {"str": str, "int": int, "float": float}
_FIELD_TYPES = {f.name: _TYPES[str(f.type)] for f in dataclasses.fields(Recipe) if str(f.type) in _TYPES}
# CLI flag → recipe field, for the overrides: {field: (type, help)}.
RECIPE_FLAGS = {name: (_FIELD_TYPES[name], text.strip())
                for name, text in (line.split(maxsplit=1) for line in
                                   RECIPE_HELP.format(augment=", ".join(AUGMENTATIONS),
                                                      auto_augment=AUTO_AUGMENT_HELP).splitlines())}


def add_train_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        "train", help="train a model (recipes: " + ", ".join(RECIPES) + ")",
        description="Train a zoo model on Imagenette, CIFAR, any image-folder tree or synthetic data.",
        epilog=TRAIN_EPILOG.format(recipes=describe_recipes()), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model name (list them with: vhist models), or torchvision:NAME / timm:NAME "
                                   "(converted with vhist.convert; needs that package)")
    p.add_argument("--data", help="dataset spec (see below)")
    p.add_argument("--recipe", default="modern", choices=list(RECIPES), help="named recipe (default: modern)")
    p.add_argument("--pretrained", metavar="FILE",
                   help="start from a torchvision or timm weights file (a classifier of another class count is "
                        "re-initialized); see the README for where they are published")
    g = p.add_argument_group("recipe overrides")
    for name, (typ, text) in RECIPE_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=text)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="SGD Nesterov momentum")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0, help="seed for weights, split, data order, augmentation")
    r.add_argument("--val-fraction", type=float, default=0.1, help="share of train held out for validation")
    r.add_argument("--out-dir", default="runs", help="parent folder of run folders (default: runs)")
    r.add_argument("--run-name", help="run folder name (default: MODEL-RECIPE-TIMESTAMP)")
    r.add_argument("--resume", metavar="CHECKPOINT", help="continue a run bit-for-bit from its last.pt")
    r.add_argument("--eval", action="store_true",
                   help="with --resume of a finished run: evaluate its best.pt on the test split again")
    r.add_argument("--stop-after-epochs", type=int, help="end this invocation after N epochs (resumable)")
    r.add_argument("--log-every", type=int, default=10,
                   help="steps between NaN checks and, off a terminal, progress lines (also every 30 s)")
    d = p.add_argument_group("device and data loading")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    d.add_argument("--backend", choices=["triton", "cuda", "torch"], help="vhist op backend (default per device)")
    d.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last activations (default: on GPU)")
    d.add_argument("--sync-bn", action="store_true", help="synchronize BatchNorm statistics across processes")
    d.add_argument("--workers", type=int, help="data loader processes (default: 8 on GPU, 0 on CPU)")
    d.add_argument("--cache", action="store_true",
                   help="decode once into a uint8 cache at a fixed resolution; augment on the device")
    d.add_argument("--cache-dir", help="where the uint8 cache lives (default: DATA/.vhist-cache)")
    d.add_argument("--bench-loader", type=int, default=0, metavar="BATCHES",
                   help="only measure the data loader's img/s over BATCHES batches, then exit")
    d.add_argument("--cuda-graph", action="store_true",
                   help="capture the whole training step in a CUDA graph and replay it (CUDA only)")
    d.add_argument("--compile", action="store_true",
                   help="torch.compile(model, backend=\"vhist\"): vhist's rewrite on each captured graph, the rest "
                        "by Inductor")
    d.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (needed for bitwise resume on GPU)")
    p.set_defaults(run=run_train)
    return p


def add_eval_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser("eval", help="evaluate a checkpoint (top-1 / top-5)",
                            description="Evaluate a vhist training checkpoint on a dataset split.")
    p.add_argument("--checkpoint", required=True, help="a best.pt / last.pt of a run")
    p.add_argument("--data", help="dataset spec (default: the one the run trained on)")
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", choices=["triton", "cuda", "torch"])
    p.add_argument("--tta", choices=["flip", "10crop"],
                   help="test-time augmentation: softmax averaged over the image and its mirror (flip) or over "
                        "AlexNet's 4 corner + centre patches and their mirrors (10crop) of the image resized to "
                        "size/0.875; recorded as test_tta in the run's summary.json for its best.pt on the test split")
    p.set_defaults(run=run_eval)
    return p


# CLI flags outside the recipe: (lowest allowed value, attribute); None values are unset.
RUN_BOUNDS = {"--log-every": (1, "log_every"), "--workers": (0, "workers"),
              "--stop-after-epochs": (1, "stop_after_epochs"), "--bench-loader": (0, "bench_loader"),
              "--batch-size": (1, "batch_size")}


def check_run_flags(args) -> None:
    """Raises ValueError naming the flag for a run option out of range."""
    for name, (low, attr) in RUN_BOUNDS.items():
        value = getattr(args, attr, None)
        if value is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if hasattr(args, "val_fraction") and not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be >= 0 and < 1, got {args.val_fraction:g}")


def run_train(args) -> int:
    """``vhist train``; expected errors propagate to :func:`vhist.__main__.main`."""
    from vhist.train.engine import TrainConfig, train

    check_run_flags(args)
    if args.eval and not args.resume:
        raise ValueError("--eval goes with --resume CHECKPOINT of a finished run (use vhist eval for any checkpoint)")
    overrides = {k: getattr(args, k) for k in [*RECIPE_FLAGS, "nesterov"] if getattr(args, k) is not None}
    cfg = TrainConfig(model=args.model, data=args.data, recipe=args.recipe, overrides=overrides,
                      out_dir=args.out_dir, run_name=args.run_name, seed=args.seed, val_fraction=args.val_fraction,
                      workers=args.workers, device=args.device, backend=args.backend,
                      channels_last=args.channels_last, sync_bn=args.sync_bn, cache=args.cache,
                      cache_dir=args.cache_dir, resume=args.resume, stop_after_epochs=args.stop_after_epochs,
                      bench_loader=args.bench_loader, deterministic=args.deterministic, log_every=args.log_every,
                      eval_finished=args.eval, cuda_graph=args.cuda_graph, pretrained=args.pretrained,
                      compile=args.compile)
    return train(cfg)["exit_code"]


def run_eval(args) -> int:
    """``vhist eval``: prints the result as JSON."""
    import sys

    from vhist.train.evaluation import evaluate_checkpoint, record_tta

    check_run_flags(args)
    result = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.batch_size, args.workers,
                                 args.device, args.backend, args.tta)
    print(json.dumps(result, indent=2))
    recorded = record_tta(result)
    if recorded is not None:
        print(f"recorded as test_tta.{args.tta} in {recorded}", file=sys.stderr)
    return 0
