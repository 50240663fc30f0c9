"""Train and evaluate loops over DataLoaders, with any pruner and any LR schedule.

One training step: ``loss = loss_fn(net(x), y) + pruner.regularization_loss()``, backward,
``optimizer.step()``, ``pruner.step(closure)`` (the closure re-runs the model on the same batch,
for the methods that need a fresh dense gradient, e.g. RigL). Multi-process runs pass the DDP
wrapper as ``net``; the closure runs the unwrapped model (this rank's batch only).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.training.distributed import all_sum
from sparsekern.training.lr import set_lr

__all__ = ["evaluate", "train_epoch"]


def train_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    pruner=None,
    *,
    lr: Callable[[int], float] | None = None,
    step0: int = 0,
    net: nn.Module | None = None,
    device: torch.device | str | None = None,
    amp: bool = False,
    loss_fn=F.cross_entropy,
    progress=None,
    step_sleep: float = 0.0,
) -> dict:
    """One pass over ``loader`` (batches ``(x [B, ...], y [B])``).

    Args:
        model: the model (train mode is set).
        loader: any iterable of ``(x, y)`` batches (a DataLoader; set its sampler's epoch first).
        optimizer: steps once per batch.
        pruner: a :class:`sparsekern.pruning.BasePruner` or None: its regularization loss is
            added, its ``step(closure)`` runs after every optimizer step.
        lr: ``step -> learning rate`` (``sparsekern.training.lr``), applied before step
            ``step0 + i`` of this epoch; None leaves the optimizer's LR alone.
        step0: the step number of the epoch's first batch in ``lr``'s clock.
        net: what runs the forward pass (a DDP wrapper of ``model``); default ``model``.
        device: where batches go (default: the model's device).
        amp: bf16 autocast (CUDA); fp32 otherwise.
        loss_fn: ``(logits, y) -> 0-d loss``.
        progress: a :class:`sparsekern.training.Progress` (one update per step) or None.
        step_sleep: seconds to sleep after every step (tests: lets a kill land mid-epoch).

    Returns:
        ``{"loss": mean task loss over all ranks' steps, "steps": steps of this rank,
        "mask_changes": steps at which the pruner changed a mask, "seconds": wall time}``.
    """
    net = model if net is None else net
    device = next(model.parameters()).device if device is None else torch.device(device)
    model.train()
    t0 = time.time()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, steps: no per-step sync
    changes, steps = 0, 0
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if lr is not None:
            set_lr(optimizer, lr(step0 + i))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        reg = pruner.regularization_loss() if pruner is not None else 0.0
        (loss + reg).backward()
        optimizer.step()
        if pruner is not None:

            def closure(x=x, y=y):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    return loss_fn(model(x), y)

            changes += bool(pruner.step(closure))
        total += torch.stack([loss.detach().double(), torch.ones((), device=device).double()])
        steps += 1
        if progress is not None:
            progress.update(1)
        if step_sleep:
            time.sleep(step_sleep)
    total = all_sum(total)
    return {
        "loss": float(total[0] / total[1].clamp(min=1)),
        "steps": steps,
        "mask_changes": changes,
        "seconds": time.time() - t0,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device | str | None = None,
    amp: bool = False,
    topk: tuple[int, ...] = (1,),
) -> dict:
    """Top-k error of ``model`` over ``loader``, in eval mode (no dropout), counts summed over
    all ranks (the same numbers on every rank); the model's mode is restored.

    Returns:
        ``{"top1_error": %, ("top5_error": %,) "top1_wrong": count, ..., "images": count}``
        (``topk=(1, 5)`` for ImageNet; k is capped at the number of classes).
    """
    was = model.training
    model.eval()
    device = next(model.parameters()).device if device is None else torch.device(device)
    counts = torch.zeros(len(topk) + 1, dtype=torch.float64, device=device)  # right@k..., images
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        k = min(max(topk), logits.shape[1])
        top = logits.float().topk(k, dim=1).indices  # [B, k]
        hit = top == y[:, None]
        right = [hit[:, : min(kk, k)].any(1).sum() for kk in topk]
        counts += torch.stack([*right, torch.tensor(len(y), device=device)]).double()
    counts = all_sum(counts)
    model.train(was)
    n = int(counts[-1])
    out = {}
    for j, kk in enumerate(topk):
        wrong = n - int(counts[j])
        out[f"top{kk}_error"] = 100.0 * wrong / max(n, 1)
        out[f"top{kk}_wrong"] = wrong
    out["images"] = n
    return out
