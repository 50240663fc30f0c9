"""One forward pass that only measures: eval mode, no gradients, forward hooks that are removed
afterwards. The per-layer reports read output shapes and activations through it
(``report.layer_report``; scripts/_lib/flops.py's ``layer_positions``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["hooked_forward"]


@torch.no_grad()
def hooked_forward(model: nn.Module, hooks: Iterable[tuple[nn.Module, Callable]], x: torch.Tensor):
    """``model(x)`` once with each ``(module, fn)`` of ``hooks`` registered as a forward hook
    ``fn(module, inputs, output)``, in eval mode (dropout off; BatchNorm uses its running
    statistics and leaves them unchanged) and without gradients. The hooks are removed and the
    model's training mode is restored afterwards, also when the forward raises. ``x``: the
    model's input ``[B, ...]``. Returns the model's output."""
    handles = []
    was_training = model.training
    try:
        for m, fn in hooks:
            handles.append(m.register_forward_hook(fn))
        model.eval()
        return model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
