"""SR-STE (Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From
Scratch"): train N:M-sparse from scratch. Every step the forward runs the N:M-masked weights
``W~ = M(W) * W`` (``M`` the N:M magnitude mask of the dense weights ``W``); the backward is the
straight-through estimator, so the dense weights move by the gradient of the sparse forward, plus a
decay on the weights the mask prunes ("sparse-refined"):

    W <- W - lr * (g(W~) + lambda * (1 - M) * W),   lambda = 2e-4 (the paper's default),

which keeps the pruned weights from crowding the mask's edge (the paper's fix for the "flip rate"
of plain STE). Then the mask is recomputed from ``|W|``: a pruned weight whose dense value grows
back above its group's N-th largest is revived.

In sparsekern pruned weights are exactly zero in the model (the mask invariant), so the dense
values of the pruned weights live in the pruner (``latent``, see :mod:`sparsekern.pruning._latent`)
and get the SR-STE update there; the kept weights get the user's optimizer step, whose gradient is
``g(W~)`` already (the masked kernels compute exactly that) and whose SR-STE term is zero.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.pruning._common import dense_weight_grads
from sparsekern.pruning._latent import full_weight, install_keeping_latent, new_latent, param_lr
from sparsekern.pruning._vocab import n_m_pair
from sparsekern.pruning.base import BasePruner, Closure
from sparsekern.pruning.importance import check_finite
from sparsekern.pruning.nm import nm_mask

__all__ = ["SRSTEPruner", "layer_nm_mask"]


def layer_nm_mask(module: nn.Module, weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M magnitude mask of ``weight`` (``module``'s weight or a stand-in of its shape), in
    groups along the input (reduction) dimension; HF ``Conv1D`` stores ``[in, out]``, so its
    transpose is grouped."""
    if getattr(module, "weight_layout", "out_in") == "in_out":
        return nm_mask(weight.t(), (n, m)).t().contiguous()
    return nm_mask(weight, (n, m))


class SRSTEPruner(BasePruner):
    """SR-STE: N:M-sparse training from scratch, the mask recomputed every step from the dense
    weights, the pruned ones decayed by ``decay`` (lambda).

    Lifecycle::

        pruner = SRSTEPruner(model, opt, n_m=(2, 4))
        pruner.prune()                                  # the N:M mask of the initial weights
        for x, y in loader:
            closure = lambda: F.cross_entropy(model(x), y)
            loss = closure(); opt.zero_grad(); loss.backward(); opt.step()
            pruner.step(closure)                        # latent update + new N:M mask

    Deviations from the paper, and why:

    * the dense gradient of the pruned weights comes from one extra forward + backward of the
      same batch in :meth:`step` (the masked kernels zero it in the user's backward: that is what
      makes the kept-only training cheap), after the optimizer step, so it is evaluated at the
      updated kept weights (one step later than the paper's);
    * the pruned weights' latent values take a plain gradient step at the optimizer's learning
      rate (no momentum: ``set_mask`` keeps the optimizer state of pruned weights at zero), and a
      revived weight restarts with zero optimizer state.

    Large M (the paper stops at M = 16): a latent value moves by the gradient of the sparse
    forward but does not change the loss, so nothing but lambda stops its drift (equilibrium
    ``|g| / lambda``), and a group's kept weight faces the largest of its M - N latent ones.
    Measured on LeNet-300-100 (MNIST, lr 0.15, Nesterov 0.9, L2 5e-4, 2,000-3,000 steps): the
    largest latent ``|W|`` reaches 0.1 at 2:4, 0.44 at 1:10 and 2.0 at 1:50. At 1:50 every
    group's kept weight is tied with its largest latent one (median ratio 1.000; 0.65 at 2:4)
    and the pair swaps at every step (~4,300 of the 5,420 kept weights a step: the kept one
    decays faster, by L2 through momentum, than the latent one by lambda), so the kept weights
    follow the drift and the training loss rises from 0.45 (step 500) to 1.3 (step 3,000; test
    error 12% -> 28%). lambda = 2e-3 cuts the swaps 8x but not the drift (loss 1.0 at step
    3,000); momentum on the latent values, as in the paper's one SGD over the dense ``W``, makes
    the drift ~10x faster (57% test error at step 1,000 on 10k images, against 15%).

    Args:
        model, optimizer, base keywords (``layers``, ``regularization``, ``reg_strength``): see
            :class:`BasePruner`.
        n_m: ``(n, m)``: keep N of every M along the input dimension (default 2:4).
        decay: lambda, the decay of the pruned weights (paper: 2e-4).
        lr: the latent weights' learning rate (default: the optimizer's, read at every step so
            that an LR scheduler applies).

    Attributes:
        latent: ``{layer: tensor}``, the dense values of the pruned weights (0 where kept).
        flips: the number of mask entries the latest :meth:`step` changed (the paper's flip rate
            numerator).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        n_m: tuple[int, int] = (2, 4),
        decay: float = 2e-4,
        lr: float | None = None,
        **base,
    ) -> None:
        n, m = n_m_pair(n_m, "SRSTEPruner")
        super().__init__(model, optimizer, sparsity=1.0 - n / m, **base)
        if not (decay >= 0 and decay < float("inf")):
            raise ValueError(f"SRSTEPruner: expected decay >= 0, got {decay}")
        if lr is not None and not (lr > 0 and lr < float("inf")):
            raise ValueError(f"SRSTEPruner: expected lr > 0 or None, got {lr}")
        self.n, self.m = n, m
        self.decay, self.lr = float(decay), lr
        self.latent = new_latent(self.layers)
        self.flips = 0

    @torch.no_grad()
    def compute_masks(self, sparsity: float, closure: Closure | None = None) -> dict:
        """The N:M mask of the dense weights (kept weights and the latent pruned ones)."""
        if abs(sparsity - self.sparsity) > 1e-12:
            raise ValueError(
                f"SRSTEPruner.prune: expected the sparsity of {self.n}:{self.m}, "
                f"{self.sparsity:.4g}, got {sparsity}"
            )
        masks = {}
        for name, mod in self.layers.items():
            w = full_weight(mod, self.latent[name])
            check_finite(w, name, "SRSTEPruner")
            masks[name] = layer_nm_mask(mod, w, self.n, self.m)
        return masks

    def prune(self, sparsity=None, closure: Closure | None = None) -> dict:
        """Install the N:M mask of the dense weights (the latent values kept)."""
        target = self._default_target() if sparsity is None else sparsity
        install_keeping_latent(self, self.compute_masks(target, closure), self.latent, force=True)
        return self.kept_fractions()

    def step(self, closure: Closure | None = None) -> bool:
        """Count the step; update the pruned weights' dense values by ``-lr (g + lambda W)`` with
        the dense gradient of ``closure()``, then install the N:M mask of the dense weights.

        Raises:
            RuntimeError: before :meth:`prune` (SR-STE trains N:M-sparse from step 0).
            ValueError: without a closure.
        """
        if self.rounds == 0:
            raise RuntimeError(
                "SRSTEPruner.step: expected prune() before training (SR-STE trains N:M-sparse "
                "from step 0), got step() first"
            )
        if closure is None:
            raise ValueError(
                "SRSTEPruner.step: expected a closure returning the loss on the current batch "
                "(the pruned weights move by the dense gradient), got None"
            )
        grads = dense_weight_grads(self.layers, closure)
        with torch.no_grad():
            for name, g in grads.items():
                mod = self.layers[name]
                lr = (
                    self.lr
                    if self.lr is not None
                    else param_lr(self.optimizer, mod.weight, "SRSTEPruner")
                )
                pruned = ~mod.mask
                lat = self.latent[name]
                lat.sub_(torch.where(pruned, g + self.decay * lat, torch.zeros_like(lat)), alpha=lr)
        self.steps += 1
        before = {n: m.mask.clone() for n, m in self.layers.items()}
        masks = self.compute_masks(self.sparsity)
        changed = install_keeping_latent(self, masks, self.latent, event="srste")
        self.flips = sum(int((before[n] != m.mask).sum()) for n, m in self.layers.items())
        return changed

    def _config(self) -> dict:
        return {"n_m": [self.n, self.m], "decay": self.decay, "lr": self.lr}

    def _extra_state(self) -> dict:
        return {"latent": {n: t.clone() for n, t in self.latent.items()}, "flips": self.flips}

    def _load_extra_state(self, state: dict) -> None:
        for n, t in state["latent"].items():
            self.latent[n].copy_(t)
        self.flips = int(state["flips"])
