"""SCL, sparse connectivity learning (Tang et al. 2022, "Automatic Sparse Connectivity Learning
for Neural Networks"): each weight is re-parameterised as ``w * m`` with a binary mask
``m = step(s)`` (unit step of a trainable mask variable ``s``); the step has no gradient, so ``s``
gets a straight-through estimator's (STE) surrogate:

    dL/ds = dL/dm * ste'(s),     dL/dm = dL/d(w m) * w.

The paper's principle: the surrogate ``ste'`` must be positive, so that ``s`` moves against
``dL/dm`` on both sides of the step and settles where the mask is best (a minimum), instead of
being pushed back and forth across it. Identity (``ste' = 1``, the paper's choice), Leaky ReLU
and Softplus satisfy it. The mask gradients of different output features differ by orders of
magnitude, so each feature's (a row of ``[out, in]``, a filter of ``[out, in, kh, kw]``) is
normalised to unit RMS before the step. The objective adds ``penalty * sum(m)``, the number of
connections, whose STE gradient is ``penalty * ste'(s)``: sparsity is learned, with no per-layer
criterion.

In sparsekern the mask ``m`` is the layer's bool mask buffer, so the learned masks run on the
kernels like any other; ``s`` lives in the pruner (:attr:`SCLPruner.scores`), and so do the
values of pruned weights (``w`` of ``w * m`` is not lost when ``m = 0``: :attr:`latent`). The
gradient ``dL/d(w m)`` at pruned entries is the dense gradient, computed by one extra forward and
backward of the batch (the masked kernels zero it in the user's backward).

Exact target (``sparsity=...``; our addition, the paper's sparsity is whatever the penalty
gives): the mask is ``step(s - tau)``, ``tau`` the threshold that keeps exactly
``round((1 - s_t) N)`` mask variables (globally, ``scope="global"``, with a per-layer floor, or per
layer), ``s_t`` rising on Zhu and Gupta's cubic from 0 at ``begin_step`` to the target at
``end_step``; a shift of the step leaves the STE gradient unchanged. From ``end_step`` on the masks
are fixed (fine-tuning). Without a target (``sparsity=None``) the mask is ``step(s)`` and the
penalty sets the sparsity, as in the paper.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsekern.nn._dtensor import is_dtensor, local_like
from sparsekern.pruning._common import auto_min_density, check_fraction, dense_weight_grads
from sparsekern.pruning._latent import (
    full_weight,
    global_topk_masks,
    install_keeping_latent,
    new_latent,
)
from sparsekern.pruning.base import BasePruner, Closure
from sparsekern.pruning.importance import check_finite

__all__ = ["SCLPruner", "STES", "ste_grad"]

STES = ("identity", "leaky_relu", "softplus")
SCOPES = ("global", "layer")
LEAKY_SLOPE = 0.01


def ste_grad(s: torch.Tensor, ste: str) -> torch.Tensor:
    """The surrogate ``d step(s) / ds`` of an STE, positive everywhere for the three of
    :data:`STES`: identity 1; Leaky ReLU 1 for ``s > 0``, 0.01 below; Softplus
    ``sigmoid(s)``."""
    if ste == "identity":
        return torch.ones_like(s)
    if ste == "leaky_relu":
        return torch.where(s > 0, 1.0, LEAKY_SLOPE).to(s.dtype)
    if ste == "softplus":
        return torch.sigmoid(s)
    raise ValueError(f"ste_grad: expected ste in {STES}, got {ste!r}")


class SCLPruner(BasePruner):
    """SCL: masks ``step(s)`` learned through an STE, with a penalty on the connection count.

    Lifecycle::

        pruner = SCLPruner(model, opt, sparsity=0.9, total_steps=T)   # or sparsity=None, penalty
        for x, y in loader:
            closure = lambda: F.cross_entropy(model(x), y)
            loss = closure(); opt.zero_grad(); loss.backward(); opt.step()
            pruner.step(closure)        # s <- s - mask_lr * dL/ds; new masks step(s - tau)
        summary = pruner.finalize()

    Deviations, and why: the exact-target mode (module docstring) is ours; the dense gradient
    for ``dL/dm`` is computed after the optimizer step (one step later than a joint backward);
    ``s`` takes plain gradient steps of size ``mask_lr`` on the normalised gradient (the paper
    trains it with the network's optimizer); a revived weight restarts with zero optimizer state.
    The initial ``s`` (a choice: the text available here does not give it) is ``|w| / mean|w|``
    per layer: positive, so the net starts dense, and ordered by magnitude.

    Args:
        model, optimizer, base keywords (``layers``, ``regularization``, ``reg_strength``): see
            :class:`BasePruner`.
        sparsity: the target pruned fraction, or None (the paper: the penalty decides).
        penalty: lambda of ``lambda * sum(m)`` (required > 0 without a target).
        mask_lr: step size of ``s`` on the normalised gradient.
        ste: ``"identity"`` (paper), ``"leaky_relu"`` or ``"softplus"``.
        normalize: normalise each output feature's mask gradient to unit RMS (paper: yes).
        total_steps, begin_step, end_step: the target's ramp and the mask learning run over
            ``[begin_step, end_step]`` (defaults 0 and ``0.75 * total_steps``); without
            ``end_step`` and without a target, masks are learned at every step.
        scope: ``"global"`` (one threshold for all layers, default) or ``"layer"``.
        min_density: with ``scope="global"``, each layer's floor (None: ``min(0.01, (1 - s)
            / 2)``).

    Attributes:
        scores: ``{layer: s}`` (float32, the weight's shape): the mask variables.
        latent: ``{layer: tensor}``: the values of the pruned weights.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        sparsity: float | None = None,
        penalty: float = 0.0,
        mask_lr: float = 0.01,
        ste: str = "identity",
        normalize: bool = True,
        total_steps: int | None = None,
        begin_step: int = 0,
        end_step: int | None = None,
        scope: str = "global",
        min_density: float | None = None,
        **base,
    ) -> None:
        if ste not in STES:
            raise ValueError(f"SCLPruner: expected ste in {STES}, got {ste!r}")
        if scope not in SCOPES:
            raise ValueError(f"SCLPruner: expected scope in {SCOPES}, got {scope!r}")
        if not (penalty >= 0 and math.isfinite(penalty)):
            raise ValueError(f"SCLPruner: expected penalty >= 0, got {penalty}")
        if not (mask_lr > 0 and math.isfinite(mask_lr)):
            raise ValueError(f"SCLPruner: expected mask_lr > 0, got {mask_lr}")
        if sparsity is None and penalty == 0:
            raise ValueError(
                "SCLPruner: expected a target sparsity or penalty > 0 (without either nothing "
                "is ever pruned), got neither"
            )
        if end_step is None and total_steps is not None:
            end_step = int(0.75 * total_steps)
        if sparsity is not None and end_step is None:
            raise ValueError("SCLPruner: expected total_steps or end_step with a target sparsity")
        if end_step is not None and not (0 <= begin_step < end_step):
            raise ValueError(
                f"SCLPruner: expected 0 <= begin_step < end_step, got {begin_step}, {end_step}"
            )
        super().__init__(model, optimizer, sparsity=sparsity, **base)
        self.penalty, self.mask_lr = float(penalty), float(mask_lr)
        self.ste, self.normalize, self.scope = ste, bool(normalize), scope
        self.begin_step = int(begin_step)
        self.end_step = None if end_step is None else int(end_step)
        self.min_density = (
            None if min_density is None else check_fraction(min_density, "SCLPruner", "min_density")
        )
        with torch.no_grad():
            self.scores = {}
            for n, m in self.layers.items():
                w = m.weight.detach()
                # FSDP2: the whole weight's mean (one process's value), each rank its rows
                a = (w.full_tensor() if is_dtensor(w) else w).abs().float()
                mean = a.mean()
                s = a / mean if mean > 0 else torch.ones_like(a)
                self.scores[n] = local_like(s, w) if is_dtensor(w) else s
        self.latent = new_latent(self.layers)

    # ------------------------------------------------------------------ the target
    def sparsity_at(self, step: int) -> float | None:
        """The target after ``step`` steps: Zhu and Gupta's cubic from 0 to ``sparsity`` over
        ``[begin_step, end_step]`` (None without a target)."""
        if self.sparsity is None:
            return None
        f = (step - self.begin_step) / (self.end_step - self.begin_step)
        f = min(max(f, 0.0), 1.0)
        return self.sparsity * (1.0 - (1.0 - f) ** 3)

    @torch.no_grad()
    def compute_masks(self, sparsity, closure: Closure | None = None) -> dict:
        """``step(s - tau)``: exactly ``round((1 - sparsity) N)`` largest ``s`` kept (globally,
        with the floor, or per layer); ``sparsity=None``: ``step(s)``, ``s > 0`` kept."""
        if sparsity is None:
            return {n: (s > 0).to(self.layers[n].mask.device) for n, s in self.scores.items()}
        if self.scope == "layer":
            out = {}
            for n, s in self.scores.items():
                keep = round((1.0 - sparsity) * s.numel())
                out[n] = global_topk_masks({n: s}, keep / s.numel() if s.numel() else 0.0)[n]
            return out
        floor = auto_min_density(sparsity) if self.min_density is None else self.min_density
        return global_topk_masks(self.scores, 1.0 - sparsity, floor)

    def prune(self, sparsity=None, closure: Closure | None = None) -> dict:
        """Install the masks of the current mask variables at ``sparsity`` (default: the
        target; None without one: ``step(s)``)."""
        target = self.sparsity if sparsity is None else self._check_target(sparsity, "prune")
        install_keeping_latent(self, self.compute_masks(target), self.latent, force=True)
        return self.kept_fractions()

    # ------------------------------------------------------------------ learning the masks
    def mask_gradients(self, closure: Closure) -> dict[str, torch.Tensor]:
        """The STE gradient of the task loss w.r.t. each mask variable, before normalisation:
        ``dL/d(w m) * w * ste'(s)`` (``w`` the full weight, pruned entries at their latent
        value), float32 of each weight's shape."""
        grads = dense_weight_grads(self.layers, closure)
        out = {}
        with torch.no_grad():
            for n, g in grads.items():
                check_finite(g, n, "SCLPruner", "gradient")
                w = full_weight(self.layers[n], self.latent[n])
                check_finite(w, n, "SCLPruner")
                s = self.scores[n].to(g.device)
                out[n] = (g * w).float() * ste_grad(s, self.ste)
        return out

    def _normalised(self, name: str, g: torch.Tensor) -> torch.Tensor:
        if not self.normalize:
            return g
        rows = 1 if getattr(self.layers[name], "weight_layout", "out_in") == "in_out" else 0
        dims = [d for d in range(g.dim()) if d != rows]
        rms = g.pow(2).mean(dim=dims, keepdim=True).sqrt()
        return torch.where(rms > 0, g / rms.clamp_min(1e-30), torch.zeros_like(g))

    def step(self, closure: Closure | None = None) -> bool:
        """Count the step; while masks are learned, update ``s`` by the STE gradient of the
        closure's loss plus the penalty, and install the new masks.

        Returns:
            True if a mask changed.
        """
        self.steps += 1
        t = self.steps
        if t <= self.begin_step or (self.end_step is not None and t > self.end_step):
            return False
        if closure is None:
            raise ValueError(
                "SCLPruner.step: expected a closure returning the loss on the current batch "
                "(the mask variables' gradient needs it), got None"
            )
        grads = self.mask_gradients(closure)
        with torch.no_grad():
            for n, g in grads.items():
                s = self.scores[n]
                g = self._normalised(n, g.to(s.device))
                if self.penalty:
                    g = g + self.penalty * ste_grad(s, self.ste)
                s.sub_(g, alpha=self.mask_lr)
        target = self.sparsity_at(t)
        return install_keeping_latent(self, self.compute_masks(target), self.latent, event="scl")

    # ------------------------------------------------------------------ resume
    def _config(self) -> dict:
        return {
            "penalty": self.penalty,
            "mask_lr": self.mask_lr,
            "ste": self.ste,
            "normalize": self.normalize,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "scope": self.scope,
            "min_density": self.min_density,
        }

    def _extra_state(self) -> dict:
        return {
            "scores": {n: s.clone() for n, s in self.scores.items()},
            "latent": {n: t.clone() for n, t in self.latent.items()},
        }

    def _load_extra_state(self, state: dict) -> None:
        for n, s in state["scores"].items():
            self.scores[n].copy_(s)
        for n, t in state["latent"].items():
            self.latent[n].copy_(t)
