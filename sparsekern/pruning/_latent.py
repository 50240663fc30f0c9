"""What the mask-learning pruners (SCL, SR-STE, Gibbs) share: latent values of pruned weights, and
a global top-k over arbitrary scores with a per-layer floor.

Latent values. SCL, SR-STE and Gibbs move weights in and out of the mask many times; their papers
keep a pruned weight's value (SCL: ``w * step(s)`` leaves ``w`` untouched; SR-STE: the dense ``W``
keeps training; Gibbs: a dropped weight comes back as it was). The package's invariant says a
pruned weight is exactly zero in the model, so the value lives beside the model, in a ``latent``
tensor per layer (the weight's shape and dtype): :func:`install_keeping_latent` saves the value of
every weight a new mask prunes into it, installs the masks with ``BasePruner._apply`` (``set_mask``:
pruned weights, their gradient and optimizer state zeroed), and writes the saved value back into
every weight the new mask revives. A revived weight restarts with zero optimizer state (momentum,
Adam moments), as ``set_mask`` requires.
"""

from __future__ import annotations

import math

import torch

from sparsekern.pruning._common import topk_mask
from sparsekern.pruning.importance import floor_count

__all__ = [
    "full_weight",
    "global_topk_masks",
    "install_keeping_latent",
    "new_latent",
    "param_lr",
]


def param_lr(optimizer, param: torch.Tensor, who: str) -> float:
    """The learning rate of the optimizer's param group holding ``param`` (FSDP2: inside a
    pruner's gathered view ``param`` is the whole weight, the group holds its shard)."""
    shard = param.__dict__.get("_sk_shard", param)
    if optimizer is not None:
        for g in optimizer.param_groups:
            if any(p is param or p is shard for p in g["params"]):
                return float(g["lr"])
    raise ValueError(
        f"{who}: expected lr= or an optimizer holding every pruned weight (its learning rate "
        "moves the latent pruned weights), got neither"
    )


def new_latent(layers: dict) -> dict[str, torch.Tensor]:
    """``{layer: zeros of its weight's shape, dtype and device}``."""
    return {n: torch.zeros_like(m.weight.detach()) for n, m in layers.items()}


@torch.no_grad()
def full_weight(module, latent: torch.Tensor) -> torch.Tensor:
    """The weight, pruned entries filled from ``latent``: ``where(mask, weight, latent)``."""
    return torch.where(module.mask, module.weight.detach(), latent)


@torch.no_grad()
def install_keeping_latent(
    pruner, masks: dict, latent: dict, force: bool = False, **record
) -> bool:
    """Install ``masks`` through ``pruner._apply`` (checked first, ``set_mask``, history), saving
    the value of every weight they prune into ``latent`` first and writing ``latent`` back into
    every weight they revive. Masks equal to the installed ones are a no-op (no round, no history
    record) unless ``force``. Returns whether any mask changed."""
    for n, new in masks.items():  # the same checks _apply makes, before latent is touched
        m = pruner.layers[n]
        if not (isinstance(new, torch.Tensor) and new.dtype == torch.bool):
            raise TypeError(f"{type(pruner).__name__}: expected a bool mask for {n}")
        if new.shape != m.mask.shape:
            raise ValueError(
                f"{type(pruner).__name__}: expected a mask of shape {list(m.mask.shape)} for {n}, "
                f"got {list(new.shape)}"
            )
    if not force and all(
        torch.equal(new.to(pruner.layers[n].mask.device), pruner.layers[n].mask)
        for n, new in masks.items()
    ):
        return False
    old = {}
    for n, new in masks.items():
        m = pruner.layers[n]
        new = new.to(m.mask.device)
        going = m.mask & ~new
        latent[n][going] = m.weight.detach()[going]
        old[n] = m.mask.clone()
    changed = pruner._apply(masks, **record)
    for n in masks:
        m = pruner.layers[n]
        back = m.mask & ~old[n]
        m.weight[back] = latent[n][back]
    return changed


@torch.no_grad()
def global_topk_masks(
    scores: dict[str, torch.Tensor], density: float, min_density: float = 0.0
) -> dict[str, torch.Tensor]:
    """Keep exactly ``round(density * N)`` of the ``N`` entries of ``scores`` (``{layer: score}``,
    each a weight's shape), pruned entries competing like kept ones (these pruners revive): each
    layer first keeps its :func:`~sparsekern.pruning.importance.floor_count` best (at least one
    with ``min_density > 0``), the rest of the budget goes to the best remaining scores over all
    layers together.

    Raises:
        ValueError: the floors alone exceed the budget.
    """
    names = list(scores)
    total = sum(scores[n].numel() for n in names)
    budget = round(density * total)
    flat = []
    floors = 0
    for n in names:
        s = scores[n].detach().double().cpu()
        floor = floor_count(min_density, s.numel())
        if floor:
            floors += floor
            s = s.masked_fill(topk_mask(s, floor), math.inf)
        flat.append(s.flatten())
    if floors > budget:
        raise ValueError(
            f"global_topk_masks: expected the per-layer floors ({floors} weights at min_density="
            f"{min_density}) to fit the budget of {budget} kept weights, got more"
        )
    keep = topk_mask(torch.cat(flat), budget)
    out, i = {}, 0
    for n in names:
        k = scores[n].numel()
        out[n] = keep[i : i + k].view(scores[n].shape).to(scores[n].device)
        i += k
    return out
