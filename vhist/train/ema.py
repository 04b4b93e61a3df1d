"""Exponential moving average of a model's weights (``--ema DECAY``).

Polyak & Juditsky 1992 averaging as the Inception papers use it ("evaluated using a
running average of the parameters computed over time", Inception-v3 §8, Inception-v4
§4): after every optimizer step, each floating-point parameter ``p`` updates its average

    ema ← d_t · ema + (1 − d_t) · p,   d_t = min(decay, (1 + t) / (10 + t)),

with ``t`` the number of updates done before this one. The warm-up of ``d_t`` is the
``num_updates`` rule of TensorFlow's ``tf.train.ExponentialMovingAverage``, which the
Inception papers' TF-slim training used: early averages are not dominated by the random
initialization. (timm's ``ModelEmaV3`` offers another warm-up,
``1 − (1 + t / gamma) ** −power``; vhist uses the TensorFlow one.)

Buffers (BatchNorm running mean and variance, ``num_batches_tracked``) are copied from
the model at every update, not averaged, as in timm: the running statistics already are
averages, of the current weights' activations.
"""
from __future__ import annotations

import copy

import torch


class ModelEma:
    """A frozen copy of ``model`` holding the moving average of its weights.

    Args:
        model: the module being trained (not its DDP wrapper).
        decay: the target decay, in [0, 1).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"--ema must be >= 0 and < 1, got {decay:g}")
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_at(self, t: int) -> float:
        """The decay used by update number ``t`` (0 for the first)."""
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One averaging step after an optimizer step of ``model``."""
        d = self.decay_at(self.updates)
        self.updates += 1
        params = dict(model.named_parameters())
        for name, avg in self.module.named_parameters():
            src = params[name].detach()
            if avg.is_floating_point():
                avg.mul_(d).add_(src, alpha=1.0 - d)
            else:
                avg.copy_(src)
        buffers = dict(model.named_buffers())
        for name, buf in self.module.named_buffers():
            buf.copy_(buffers[name])

    def state_dict(self) -> dict:
        """What a checkpoint holds: the averaged module's state, the decay and the count."""
        return {"module": self.module.state_dict(), "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
