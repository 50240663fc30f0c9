"""Checks of what users hand the nn entry points (``sparsify``, ``to_inference``,
``save_inference``), each raising before anything changes, naming expected vs got."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["check_model", "pruned_nonzero"]


def check_model(model, who: str) -> None:
    """Raise unless ``model`` is an ``nn.Module`` whose parameters are all initialised: a lazy
    module (``nn.LazyLinear`` before its first forward) has no weight shape to mask or export."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: expected an nn.Module, got {type(model).__name__}")
    lazy = [
        name or type(model).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()
    ]
    if lazy:
        raise ValueError(
            f"{who}: expected initialised parameters, got uninitialised (lazy) modules {lazy}; "
            "run one forward pass first"
        )


def pruned_nonzero(modules) -> dict[str, int]:
    """``{name: count}`` of the ``(name, module)`` pairs whose pruned weights (mask False) are not
    exactly zero; raises ``TypeError`` for a mask buffer that is not ``torch.bool``."""
    bad: dict[str, int] = {}
    for name, m in modules:
        mask = m._buffers.get("mask")
        if mask is None:
            continue
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(
                f"layer {name!r}: expected its mask buffer as torch.bool, got {got} (install "
                "masks with sparsekern.set_mask)"
            )
        w = m.weight.detach()
        if mask.shape != w.shape:
            raise ValueError(
                f"layer {name!r}: expected a mask of the weight's shape {list(w.shape)}, got "
                f"{list(mask.shape)}"
            )
        n = int(torch.count_nonzero(torch.where(mask, torch.zeros((), dtype=w.dtype), w)))
        if n:
            bad[name] = n
    return bad
