"""Learning-rate schedules as objects: ``schedule(step) -> lr``, a pure function of the step, so a
resumed run needs only the step count to continue exactly (no scheduler state to save)."""

from __future__ import annotations

import math

import torch

__all__ = ["Constant", "StepDecay", "WarmupCosine", "set_lr"]


class WarmupCosine:
    """Linear warm-up over ``warmup`` steps to ``lr``, then cosine decay to 0 at ``total``.

    Step ``i`` of the warm-up runs at ``lr (i + 1) / warmup``; then
    ``lr (1 + cos(pi (i - warmup) / (total - warmup))) / 2``.
    """

    def __init__(self, lr: float, total: int, warmup: int = 0) -> None:
        if not (lr > 0 and math.isfinite(lr)) or total < 1 or not 0 <= warmup <= total:
            raise ValueError(
                f"WarmupCosine: expected lr > 0, total >= 1, 0 <= warmup <= total, got lr={lr}, "
                f"total={total}, warmup={warmup}"
            )
        self.lr, self.total, self.warmup = float(lr), int(total), int(warmup)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * self.lr * (1 + math.cos(math.pi * t))

    def __repr__(self) -> str:
        return f"WarmupCosine(lr={self.lr}, total={self.total}, warmup={self.warmup})"


class StepDecay:
    """``lr x gamma ** (step // every)`` (Caffe's "step" policy; torchvision's ImageNet recipe:
    x0.1 every 30 epochs)."""

    def __init__(self, lr: float, every: int, gamma: float = 0.1) -> None:
        if not (lr > 0 and math.isfinite(lr)) or every < 1 or not 0 < gamma <= 1:
            raise ValueError(
                f"StepDecay: expected lr > 0, every >= 1, 0 < gamma <= 1, got lr={lr}, "
                f"every={every}, gamma={gamma}"
            )
        self.lr, self.every, self.gamma = float(lr), int(every), float(gamma)

    def __call__(self, step: int) -> float:
        return self.lr * self.gamma ** (step // self.every)

    def __repr__(self) -> str:
        return f"StepDecay(lr={self.lr}, every={self.every}, gamma={self.gamma})"


class Constant:
    """The same ``lr`` at every step."""

    def __init__(self, lr: float) -> None:
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"Constant: expected lr > 0, got {lr}")
        self.lr = float(lr)

    def __call__(self, step: int) -> float:
        return self.lr

    def __repr__(self) -> str:
        return f"Constant(lr={self.lr})"


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for g in optimizer.param_groups:
        g["lr"] = lr
