"""Named training recipes, the learning-rate schedules and the optimizers they build.

Each recipe is a flat set of hyperparameters; every field can be overridden on the
command line (``--lr``, ``--epochs``, ...), and the resolved recipe is printed in full
at the start of each run and stored in the run folder.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from vhist.models.initialization import INITS


@dataclass
class Recipe:
    """Hyperparameters of one run. Epoch counts and batch sizes are per run and per process."""

    description: str = ""
    optimizer: str = "sgd"          # sgd | adamw | rmsprop
    lr: float = 0.1
    lr_base_batch: int = 0          # > 0: lr is per this many images, scaled by the global batch (Goyal et al. 2017)
    momentum: float = 0.9           # SGD momentum; RMSProp momentum
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_decay_norm_bias: bool = False  # exclude norm weights and biases from weight decay
    betas: tuple = (0.9, 0.999)     # AdamW
    rmsprop_alpha: float = 0.9      # RMSProp decay of the squared-gradient average
    rmsprop_eps: float = 1.0        # Inception-v3 §8: epsilon = 1.0
    batch_size: int = 128
    epochs: int = 90
    image_size: int = 224
    schedule: str = "step"          # step | cosine | constant
    step_epochs: int = 30           # step: multiply by gamma every step_epochs
    gamma: float = 0.1
    warmup_epochs: float = 0.0      # linear warm-up from 0 (cosine and step)
    min_lr: float = 0.0             # cosine floor
    label_smoothing: float = 0.0
    grad_clip: float = 0.0          # clip the global gradient norm (0: off)
    augment: str = "alexnet"        # alexnet | rrc | cifar | none (CIFAR data: cifar unless overridden)
    auto_augment: str = "none"      # none | trivial | rand-mM-nN, on the device (vhist.train.augment)
    random_erasing: float = 0.0     # probability of erasing one box per image (Zhong et al. 2020)
    mixup: float = 0.0              # mixup Beta alpha (Zhang et al. 2018); 0: off
    cutmix: float = 0.0             # cutmix Beta alpha (Yun et al. 2019); 0: off
    mix_prob: float = 1.0           # probability that a batch is mixed at all
    mix_switch_prob: float = 0.5    # with both alphas set: probability of cutmix rather than mixup
    drop_path: float = 0.0          # stochastic depth of the last block (ResNet, Inception-ResNet, ViT)
    ema: float = 0.0                # decay of the weight EMA (vhist.train.ema); 0: off
    amp: str = "auto"               # auto (bf16 on GPU, off on CPU) | bf16 | fp16 | off
    init: str = "modern"            # paper | modern | torch (vhist.models.initialization); every recipe names it
    source: str = ""                # where the numbers come from

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


# What the seed report's two runs share, the SGD of the AlexNet and VGG papers, and the
# RMSProp of the Inception papers.
_SEED = dict(optimizer="adamw", lr=1e-4, weight_decay=0.1, epochs=90, schedule="step", step_epochs=30, gamma=0.1,
             augment="alexnet", init="torch")
_PAPER_SGD = dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="step", gamma=0.1,
                  augment="alexnet", init="paper")
_RMSPROP = dict(optimizer="rmsprop", lr=0.045, momentum=0.0, rmsprop_alpha=0.9, rmsprop_eps=1.0, weight_decay=4e-5,
                batch_size=32, epochs=100, image_size=299, schedule="step", step_epochs=2, gamma=0.94,
                grad_clip=2.0, augment="rrc", ema=0.9999, init="paper")
# The Imagenette recipes of AlexNet and VGG (see their source fields): DeiT-style AdamW with
# the regularizers that keep a 9.5k-image training set from being memorized.
_IMAGENETTE = dict(optimizer="adamw", lr=5e-4, lr_base_batch=512, weight_decay=0.05, no_decay_norm_bias=True,
                   batch_size=128, epochs=200, schedule="cosine", warmup_epochs=1, label_smoothing=0.1, augment="rrc",
                   auto_augment="trivial", random_erasing=0.25, mixup=0.2, cutmix=1.0, ema=0.999, init="modern")
_IMAGENETTE_SOURCE = (
    "chosen from published practice, not tuned here: AdamW 5e-4 per 512 images (DeiT's rule; 1.25e-4 at batch 128, "
    "the order of the seed report's 1e-4 that trained this net stably) with weight decay 0.05 (Touvron et al. 2021); "
    "cosine and label smoothing 0.1 (He et al. 2019, 'Bag of Tricks', §5), with 1 warm-up epoch instead of its 5 "
    "(issue 26: at AdamW's 6.25e-5 for batch 64, 5 warm-up epochs keep a short run at chance for its first 2 "
    "epochs; the warm-up protects large-batch SGD at lr 0.1 x batch/256, Goyal et al. 2017); mixup alpha 0.2 "
    "and 200 epochs, since mixup needs longer training (He et al. 2019, §5.4; fastai's Imagenette chapter, "
    "Howard & Gugger 2020, ch. 7, trains Imagenette from scratch with mixup and label smoothing); cutmix alpha 1.0 "
    "(Yun et al. 2019, ImageNet and CIFAR); TrivialAugmentWide (Muller & Hutter 2021, CIFAR and ImageNet, no "
    "tuning); random erasing 0.25 (DeiT; Zhong et al. 2020 on CIFAR); EMA 0.999, an averaging horizon "
    "1/(1-d) = 1000 steps, about 13 epochs of Imagenette's 9,469 training images at batch 128; init modern "
    "(issue 26: under the paper's N(0, 0.01) AlexNet stays at chance)")

RECIPES: dict[str, Recipe] = {
    "seed-alexnet": Recipe(
        description="the seed report's AlexNet run on Imagenette (65.0% test)", batch_size=64, image_size=227,
        source="project seed report: AdamW lr 1e-4, wd 0.1, batch 64, 227 px, 90 epochs, lr x0.1 every 30; "
               "init: PyTorch's layer defaults, assumed (the report states none)", **_SEED),
    "seed-vgg": Recipe(
        description="the seed report's VGG-16 run on Imagenette (68.5% test)", batch_size=128, image_size=224,
        source="project seed report: AdamW lr 1e-4, wd 0.1, batch 128, 224 px, 90 epochs, lr x0.1 every 30; "
               "init: PyTorch's layer defaults, assumed (the report states none)", **_SEED),
    "paper-alexnet": Recipe(
        description="Krizhevsky et al. 2012: SGD momentum 0.9, weight decay 5e-4, lr 0.01 divided by 10 "
                    "three times, batch 128, ~90 epochs, PCA colour jitter",
        batch_size=128, epochs=90, image_size=227, step_epochs=30, **_PAPER_SGD,
        source="AlexNet paper §5 (lr divided by 10 on plateau; here every 30 epochs)"),
    "paper-vgg": Recipe(
        description="Simonyan & Zisserman 2015: SGD momentum 0.9, weight decay 5e-4, lr 0.01 divided by 10 "
                    "on plateau, batch 256, 74 epochs",
        batch_size=256, epochs=74, image_size=224, step_epochs=25, **_PAPER_SGD,
        source="VGG paper §3.1 (lr decreased 3 times; here every 25 epochs)"),
    "paper-resnet": Recipe(
        description="He et al. 2016: SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 every 30 epochs, "
                    "batch 256, random-resized crops",
        optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=256, epochs=90, image_size=224,
        schedule="step", step_epochs=30, gamma=0.1, augment="rrc", init="paper",
        source="ResNet paper §3.4"),
    "paper-inception-v3": Recipe(
        description="Szegedy et al. 2016: RMSProp (decay 0.9, eps 1.0), lr 0.045 x0.94 every 2 epochs, "
                    "gradient clipping 2.0, label smoothing 0.1, 299 px, evaluated on a weight EMA (0.9999)",
        label_smoothing=0.1, **_RMSPROP,
        source="Inception-v3 paper §8 (RMSProp, clipping, 'evaluated using a running average of the parameters') "
               "and §7 (label smoothing 0.1); weight decay 4e-5 from TF-slim's reference training; EMA decay 0.9999 "
               "is MOVING_AVERAGE_DECAY of the TensorFlow Inception reference training (tensorflow/models)"),
    "paper-inception-v4": Recipe(
        description="Szegedy et al. 2017: RMSProp (decay 0.9, eps 1.0), lr 0.045 x0.94 every 2 epochs, 299 px, "
                    "evaluated on a weight EMA (0.9999)",
        **_RMSPROP, source="Inception-v4 paper §4 (RMSProp; 'evaluations are done using a running average of the "
                           "parameters'); weight decay 4e-5, clipping 2.0 and EMA decay 0.9999 as for Inception-v3"),
    "modern": Recipe(
        description="SGD nesterov, cosine with 5 warm-up epochs, label smoothing 0.1, bf16 autocast, "
                    "no weight decay on norms and biases",
        optimizer="sgd", lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-5, no_decay_norm_bias=True,
        batch_size=128, epochs=100, image_size=224, schedule="cosine", warmup_epochs=5, label_smoothing=0.1,
        augment="rrc", amp="auto", init="modern",
        source="common practice (Goyal et al. 2017 warm-up; Loshchilov & Hutter 2017 cosine)"),
    "modern-adamw": Recipe(
        description="AdamW, cosine with 5 warm-up epochs, label smoothing 0.1, bf16 autocast, "
                    "no weight decay on norms and biases",
        optimizer="adamw", lr=1e-3, weight_decay=0.05, no_decay_norm_bias=True, batch_size=128, epochs=100,
        image_size=224, schedule="cosine", warmup_epochs=5, label_smoothing=0.1, augment="rrc", amp="auto",
        init="modern", source="common practice (Loshchilov & Hutter 2019 AdamW)"),
    "deit": Recipe(
        description="Touvron et al. 2021 (DeiT) for ViT: AdamW lr 5e-4 x batch/512, wd 0.05, cosine, 5 warm-up "
                    "epochs, RandAugment m9 n2, mixup 0.8 / cutmix 1.0, label smoothing 0.1, random erasing 0.25, "
                    "drop path 0.1, EMA 0.99996, 300 epochs",
        optimizer="adamw", lr=5e-4, lr_base_batch=512, weight_decay=0.05, no_decay_norm_bias=True, batch_size=128,
        epochs=300, image_size=224, schedule="cosine", warmup_epochs=5, min_lr=1e-5, label_smoothing=0.1,
        augment="rrc", auto_augment="rand-m9-n2", random_erasing=0.25, mixup=0.8, cutmix=1.0, mix_prob=1.0,
        mix_switch_prob=0.5, drop_path=0.1, ema=0.99996, amp="auto", init="modern",
        source="DeiT paper (Touvron et al. 2021, 'Training data-efficient image transformers', Table 9) and the "
               "defaults of facebookresearch/deit's main.py (min lr 1e-5, EMA decay 0.99996); not reproduced: "
               "repeated augmentation and RandAugment's magnitude noise (mstd 0.5)"),
    "finetune": Recipe(
        description="fine-tuning from pretrained weights (--pretrained FILE): SGD nesterov lr 0.01, cosine with "
                    "1 warm-up epoch, 10 epochs, label smoothing 0.1, random-resized crops at the data's resolution",
        optimizer="sgd", lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4, no_decay_norm_bias=True,
        batch_size=64, epochs=10, image_size=224, schedule="cosine", warmup_epochs=1, label_smoothing=0.1,
        augment="rrc", amp="auto", init="modern",
        source="common fine-tuning practice, not tuned here: SGD with Nesterov momentum and a cosine schedule, as "
               "Kornblith et al. 2019 ('Do Better ImageNet Models Transfer Better?') fine-tune; lr 0.01, a tenth "
               "of paper-resnet's from-scratch 0.1, since the weights start near a minimum; one warm-up epoch so "
               "the new classifier's first gradients do not disturb the pretrained layers; 10 epochs"),
    "imagenette-alexnet": Recipe(
        description="AlexNet on Imagenette, meant to beat the seed: AdamW 5e-4 x batch/512, 1 warm-up epoch, cosine, "
                    "label smoothing 0.1, mixup 0.2 / cutmix 1.0, TrivialAugmentWide, random erasing 0.25, EMA 0.999, "
                    "200 epochs",
        image_size=227, **_IMAGENETTE, source=_IMAGENETTE_SOURCE),
    "imagenette-vgg": Recipe(
        description="VGG on Imagenette, meant to beat the seed: AdamW 5e-4 x batch/512, 1 warm-up epoch, cosine, "
                    "label smoothing 0.1, mixup 0.2 / cutmix 1.0, TrivialAugmentWide, random erasing 0.25, EMA 0.999, "
                    "200 epochs",
        image_size=224, **_IMAGENETTE, source=_IMAGENETTE_SOURCE),
}


def get_recipe(name: str, **overrides) -> Recipe:
    """The recipe ``name`` with the non-None ``overrides`` applied."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    fields = {f.name for f in dataclasses.fields(Recipe)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown recipe fields {sorted(unknown)}")
    recipe = dataclasses.replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})
    allowed = {"optimizer": ("sgd", "adamw", "rmsprop"), "schedule": ("step", "cosine", "constant"),
               "augment": ("alexnet", "rrc", "cifar", "none"), "amp": ("auto", "bf16", "fp16", "off"),
               "init": INITS}
    for key, values in allowed.items():
        if getattr(recipe, key) not in values:
            raise ValueError(f"{flag(key)} must be one of {', '.join(values)}, got {getattr(recipe, key)!r}")
    for key, (low, strict, high) in BOUNDS.items():
        value = getattr(recipe, key)
        if value < low or (strict and value == low) or (high is not None and value >= high):
            bound = f"{'>' if strict else '>='} {low:g}" + (f" and < {high:g}" if high is not None else "")
            raise ValueError(f"{flag(key)} must be {bound}, got {value:g}")
    for key in PROBABILITIES:
        if not 0 <= getattr(recipe, key) <= 1:
            raise ValueError(f"{flag(key)} must be a probability in [0, 1], got {getattr(recipe, key):g}")
    from vhist.train.augment import parse_auto_augment

    parse_auto_augment(recipe.auto_augment)
    return recipe


# field: (lower bound, whether the bound is strict, exclusive upper bound or None)
BOUNDS = {"lr": (0, True, None), "momentum": (0, False, None), "weight_decay": (0, False, None),
          "batch_size": (1, False, None), "epochs": (1, False, None), "image_size": (8, False, None),
          "step_epochs": (1, False, None), "gamma": (0, True, None), "warmup_epochs": (0, False, None),
          "min_lr": (0, False, None), "label_smoothing": (0, False, 1), "grad_clip": (0, False, None),
          "lr_base_batch": (0, False, None), "mixup": (0, False, None), "cutmix": (0, False, None),
          "drop_path": (0, False, 1), "ema": (0, False, 1)}
PROBABILITIES = ("random_erasing", "mix_prob", "mix_switch_prob")


def flag(field_name: str) -> str:
    """The ``vhist train`` flag that sets a recipe field (``batch_size`` → ``--batch-size``)."""
    return "--" + field_name.replace("_", "-")


def describe_recipes() -> str:
    """One block per recipe, for ``--help``."""
    lines = []
    for name, r in RECIPES.items():
        lines.append(f"  {name}: {r.description}")
        lines.append(f"      {r.optimizer} lr={r.lr:g} wd={r.weight_decay:g} batch={r.batch_size} "
                     f"epochs={r.epochs} size={r.image_size} schedule={r.schedule} "
                     f"augment={r.augment} label_smoothing={r.label_smoothing:g} init={r.init}")
        extra = {k: getattr(r, k) for k in REGULARIZERS if getattr(r, k) != getattr(Recipe, k)}
        if extra:
            lines.append("      " + " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in extra.items()))
    return "\n".join(lines)


# The batch-level regularizers, listed in --help where a recipe sets them.
REGULARIZERS = ("lr_base_batch", "auto_augment", "random_erasing", "mixup", "cutmix", "mix_prob", "mix_switch_prob",
                "drop_path", "ema")


def effective_lr(recipe: Recipe, world: int = 1) -> float:
    """The base learning rate of a run: ``lr``, or ``lr × batch × world / lr_base_batch``
    (the linear scaling rule, Goyal et al. 2017) when ``lr_base_batch`` is set."""
    if recipe.lr_base_batch:
        return recipe.lr * recipe.batch_size * world / recipe.lr_base_batch
    return recipe.lr


class LRSchedule:
    """Learning-rate factor as a function of the optimizer step, updated every step.

    ``step``: ``gamma ** floor(epoch / step_epochs)``; ``cosine``:
    ``min + (1 - min) * (1 + cos(pi * t)) / 2`` over the post-warm-up steps; both start
    with a linear warm-up over ``warmup_epochs``. Its state is the step counter."""

    def __init__(self, optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int):
        self.optimizer, self.recipe, self.steps_per_epoch = optimizer, recipe, max(steps_per_epoch, 1)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def factor(self, step: int) -> float:
        r = self.recipe
        warmup = int(round(r.warmup_epochs * self.steps_per_epoch))
        if step < warmup:
            return (step + 1) / warmup
        if r.schedule == "constant":
            return 1.0
        if r.schedule == "step":
            return r.gamma ** (step // self.steps_per_epoch // max(r.step_epochs, 1))
        if r.schedule == "cosine":
            total = max(r.epochs * self.steps_per_epoch - warmup, 1)
            t = min((step - warmup) / total, 1.0)
            floor = r.min_lr / self.base_lrs[0] if self.base_lrs and self.base_lrs[0] else 0.0
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        raise ValueError(f"unknown schedule {r.schedule!r} (step, cosine, constant)")

    def _apply(self) -> None:
        f = self.factor(self.last_step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.last_step, self.base_lrs = state["last_step"], list(state["base_lrs"])
        self._apply()


def build_optimizer(model: torch.nn.Module, recipe: Recipe, world: int = 1) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``model``'s trainable parameters, at
    :func:`effective_lr` for ``world`` processes."""
    lr = effective_lr(recipe, world)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if recipe.no_decay_norm_bias:
        decay = [p for n, p in params if p.ndim > 1]
        no_decay = [p for n, p in params if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": recipe.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for _, p in params], "weight_decay": recipe.weight_decay}]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(recipe.betas))
    if recipe.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=recipe.rmsprop_alpha, eps=recipe.rmsprop_eps,
                                   momentum=recipe.momentum)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r} (sgd, adamw, rmsprop)")
