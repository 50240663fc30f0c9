"""N:M decay (Kao et al. 2022, "Training Recipe for N:M Structured Sparsity with Decaying Pruning
Mask"): reach N:M sparsity gradually instead of masking at once. Two recipes:

* ``recipe="mask"`` (pruning-mask decay): the weights outside the N:M mask are multiplied by a
  factor ``beta`` that decays from 1 to 0 over training, ``W_eff = W * (M + beta (1 - M))``, so the
  pruned weights fade out while every weight keeps its gradient; at ``beta = 0`` the N:M mask is
  installed and the pruned weights are exactly zero from then on.
* ``recipe="structure"`` (sparse-structure decay): the pattern steps through sparser N:M, N halved
  at each stage, e.g. 8:8 (dense) -> 4:8 -> 2:8, each stage's mask the N_k:M magnitude mask of the
  current weights (within the previous stage's mask).

The schedule (a choice where the paper's text available here gives none): the decay runs from
``begin_step`` to ``end_step`` (default 0 and 3/4 of ``total_steps``, RigL's ``T_end``), then the
N:M mask stays fixed for the rest of training (fine-tuning). Mask decay: ``beta`` falls linearly
in ``decay_steps`` equal steps (default 10): ``beta_k = 1 - k / K`` at step
``begin + k (end - begin) / K``, the N:M mask recomputed from the weights at each of them.
Structure decay: stage ``j`` of ``S`` starts at ``begin + j (end - begin) / S``.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.pruning._sharded import shard_state
from sparsekern.pruning._vocab import n_m_pair
from sparsekern.pruning.base import BasePruner, Closure
from sparsekern.pruning.importance import check_finite
from sparsekern.pruning.srste import layer_nm_mask

__all__ = ["NMDecayPruner", "RECIPES", "structure_sequence"]

RECIPES = ("mask", "structure")


def structure_sequence(n: int, m: int) -> list[int]:
    """The N of each stage of structure decay: M, M/2, M/4, ... while above ``n``, then ``n``
    (8:8 -> 4:8 -> 2:8 for 2:8; 8 -> 4 -> 3 for 3:8)."""
    seq = [m]
    while seq[-1] // 2 > n:
        seq.append(seq[-1] // 2)
    if seq[-1] != n:
        seq.append(n)
    return seq


class NMDecayPruner(BasePruner):
    """N:M sparsity reached by decay: pruning-mask decay or sparse-structure decay.

    Lifecycle (nothing to call before training: the net starts dense)::

        pruner = NMDecayPruner(model, opt, n_m=(2, 4), recipe="mask", total_steps=T)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
            pruner.step()                   # decays on the schedule; exact N:M from end_step
        summary = pruner.finalize()

    Mask decay trains the paper's latent dense ``W`` with ``W_eff = W * f``, ``f = M + beta (1 -
    M)`` each weight's factor, while the model's weight holds ``W_eff`` (the kernels run it as
    any weight). Two optimizer hooks, installed while a factor is below 1, make the optimizer
    step the latent ``W``: before ``optimizer.step()`` the decaying weights are divided by ``f``
    (the latent ``W``) and their gradient multiplied by it (autograd's ``dL/dW = f dL/dW_eff``);
    after it both are mapped back. The optimizer state (momentum, Adam moments) is thus the
    latent one, and a decay step only rescales the weights (``W_eff *= f' / f``). This is the
    latent form exactly, up to rounding (one division and one product by ``f`` per step), for
    every elementwise optimizer: SGD with (Nesterov) momentum, Adam, AdamW, and their
    ``weight_decay``, which acts on the latent ``W``, as in the paper's training. (Scaling the
    gradient by ``f ** 2`` in ``W_eff`` space with the momentum rescaled by ``f' / f`` at each
    decay step is the same for SGD; for Adam, invariant to the gradient's scale, it would change
    nothing: the latent form moves ``W_eff`` by ``f`` times Adam's step, which the hooks give.)
    :meth:`regularization_loss` penalises the latent ``W`` too (L2: ``s/2 sum (W_eff / f)^2``,
    latent gradient ``s W``), so the pruner's term and an optimizer's ``weight_decay`` agree.
    Needs: the optimizer passed to the pruner (a decay step without one is refused) and
    ``optimizer.step()`` without a closure (refused: the closure would run on the latent
    weights). A gradient clipped before the step is clipped in ``W_eff`` space (the latent
    gradient is ``f`` times it). At ``beta = 0`` (and at :meth:`prune`) the weights return to
    the latent ``W`` (a weight that decayed until then may be in the final mask), the N:M mask is
    installed (``set_mask``: pruned weights and their optimizer state exactly zero) and the hooks
    are removed: the kept weights' optimizer state is the latent one already.
    ``load_state_dict`` re-installs the hooks on the pruner's optimizer, :meth:`set_optimizer`
    moves them. Structure decay uses hard N_k:M masks (pruned weights exactly zero from their
    stage on) rather than letting the gradient reach pruned weights.

    Args:
        model, optimizer, base keywords (``layers``, ``regularization``, ``reg_strength``): see
            :class:`BasePruner`.
        n_m: ``(n, m)``, the final pattern (default 2:4).
        recipe: ``"mask"`` or ``"structure"``.
        total_steps: optimizer steps of the whole training; sets ``end_step``'s default.
        begin_step, end_step: the decay runs over these steps (defaults 0 and
            ``0.75 * total_steps``); from ``end_step`` on the N:M mask is fixed.
        decay_steps: mask decay: K, the number of equal decrements of ``beta`` (default 10).

    Attributes:
        beta: the current decay factor (mask recipe; 1 before the decay, 0 at the end).
        stage_n: the current N (structure recipe; M before the first stage).
        factor: ``{layer: tensor}``, each weight's current factor (mask recipe, during decay).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        n_m: tuple[int, int] = (2, 4),
        recipe: str = "mask",
        total_steps: int | None = None,
        begin_step: int = 0,
        end_step: int | None = None,
        decay_steps: int = 10,
        **base,
    ) -> None:
        n, m = n_m_pair(n_m, "NMDecayPruner")
        if recipe not in RECIPES:
            raise ValueError(f"NMDecayPruner: expected recipe in {RECIPES}, got {recipe!r}")
        if end_step is None:
            if total_steps is None or total_steps < 1:
                raise ValueError(
                    f"NMDecayPruner: expected total_steps >= 1 (or end_step), got {total_steps}"
                )
            end_step = int(0.75 * total_steps)
        if not (0 <= begin_step < end_step):
            raise ValueError(
                f"NMDecayPruner: expected 0 <= begin_step < end_step, got {begin_step}, {end_step}"
            )
        if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps < 1:
            raise ValueError(f"NMDecayPruner: expected decay_steps >= 1, got {decay_steps!r}")
        super().__init__(model, optimizer, sparsity=1.0 - n / m, **base)
        self.n, self.m, self.recipe = n, m, recipe
        self.begin_step, self.end_step = int(begin_step), int(end_step)
        self.decay_steps = decay_steps if recipe == "mask" else len(structure_sequence(n, m)) - 1
        self.beta = 1.0
        self.stage_n = m
        self.factor: dict[str, torch.Tensor] = {}
        self._hooks: list = []  # the optimizer's step pre / post hooks while a factor is < 1
        self._latent_now: list[str] = []  # layers holding the latent W inside optimizer.step

    # ------------------------------------------------------------------ the schedule
    def event_steps(self) -> list[int]:
        """The steps at which the factor (mask) or the pattern (structure) changes; the last is
        ``end_step``."""
        k, b, e = self.decay_steps, self.begin_step, self.end_step
        return [b + round(j * (e - b) / k) for j in range(1, k + 1)]

    def beta_at(self, step: int) -> float:
        """Mask decay's factor after ``step`` optimizer steps: ``1 - k / K``, ``k`` the decay
        events reached."""
        k = sum(1 for t in self.event_steps() if t <= step)
        return 1.0 - k / self.decay_steps

    def n_at(self, step: int) -> int:
        """Structure decay's N after ``step`` optimizer steps."""
        seq = structure_sequence(self.n, self.m)
        return seq[sum(1 for t in self.event_steps() if t <= step)]

    # ------------------------------------------------------------------ masks
    @torch.no_grad()
    def compute_masks(self, sparsity: float, closure: Closure | None = None) -> dict:
        """The final N:M mask of each layer's weights, at the weights' latent scale (``W_eff /
        factor`` during mask decay)."""
        return {name: self._nm(name, self.n) for name in self.layers}

    def _nm(self, name: str, n: int) -> torch.Tensor:
        mod = self.layers[name]
        w = mod.weight.detach()
        check_finite(w, name, "NMDecayPruner")
        f = self.factor.get(name)
        if f is not None:
            w = w / f
        # nm_mask ranks |score|: a weight pruned at an earlier stage scores 0, every kept one
        # 1 + |w| (float64: |w| >= 1e-12 stays distinct), so a stage keeps within the last mask
        score = torch.where(mod.mask, w.abs().double() + 1.0, 0.0)
        return layer_nm_mask(mod, score, n, self.m)

    def step(self, closure: Closure | None = None) -> bool:
        """Count the step; on a decay event, rescale (mask) or re-mask (structure).

        Returns:
            True if a mask changed (the end of mask decay, or a structure stage).

        Raises:
            RuntimeError: mask decay reaching a factor in (0, 1) without an optimizer.
        """
        t = self.steps + 1
        if (
            self.recipe == "mask"
            and self.optimizer is None
            and t in self.event_steps()
            and self.beta_at(t) > 0
        ):
            raise RuntimeError(
                "NMDecayPruner.step: expected the optimizer (mask decay steps the latent "
                "weights through its hooks: NMDecayPruner(model, optimizer, ...) or "
                "set_optimizer), got None"
            )
        self.steps = t
        if t not in self.event_steps():
            return False
        if self.recipe == "structure":
            self.stage_n = self.n_at(t)
            masks = {name: self._nm(name, self.stage_n) for name in self.layers}
            return self._apply(masks, event="structure", n=self.stage_n)
        beta = self.beta_at(t)
        if beta > 0:
            self._decay_to(beta)
            self._sync_hooks()
            self.history.append({"step": t, "event": "decay", "beta": beta})
            return False
        masks = self.compute_masks(self.sparsity)
        self.beta = 0.0
        self._drop_factors()
        return self._apply(masks, event="decay", beta=0.0)

    @torch.no_grad()
    def _decay_to(self, beta: float) -> None:
        """Recompute the N:M mask at the latent scale; weights inside get factor 1, outside
        ``beta``; the weights are rescaled from their old factor to the new one."""
        for name, mod in self.layers.items():
            keep = self._nm(name, self.n)
            old = self.factor.get(name)
            new = torch.where(keep, 1.0, beta).to(mod.weight.dtype)
            mod.weight.mul_(new if old is None else new / old)
            self.factor[name] = new
        shard_state(self.factor, self.layers)  # FSDP2: the hooks scale each rank's shards
        self.beta = beta

    def prune(self, sparsity=None, closure: Closure | None = None) -> dict:
        """Skip the decay: install the final N:M mask now (the factors are dropped)."""
        masks = self.compute_masks(self.sparsity)
        self.beta, self.stage_n = 0.0, self.n
        self._drop_factors()
        self._apply(masks, event="prune")
        return self.kept_fractions()

    @torch.no_grad()
    def _drop_factors(self) -> None:
        """The weights back to the latent ``W`` (factor 1: a weight that decayed at the last
        step can be in the final mask, whose weights are ``W``, not ``beta W``), no hooks."""
        for name, f in self.factor.items():
            self.layers[name].weight.div_(f)
        self.factor = {}
        self._sync_hooks()

    # ------------------------------------------------------------------ the latent W
    def set_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """:meth:`BasePruner.set_optimizer`; during mask decay the hooks move to ``optimizer``."""
        super().set_optimizer(optimizer)
        if "_hooks" in self.__dict__:  # BasePruner.__init__ calls this before they exist
            self._sync_hooks()

    def _sync_hooks(self) -> None:
        """The step hooks on :attr:`optimizer` while any factor is below 1, none otherwise."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.factor and self.optimizer is not None:
            self._hooks = [
                self.optimizer.register_step_pre_hook(self._to_latent),
                self.optimizer.register_step_post_hook(self._from_latent),
            ]

    @torch.no_grad()
    def _to_latent(self, optimizer, args, kwargs) -> None:
        """Before ``optimizer.step()``: weight ``W_eff -> W = W_eff / f``, gradient ``dL/dW_eff
        -> dL/dW = f dL/dW_eff``."""
        # args: (optimizer, closure?) as optimizer.step received them
        if any(a is not None for a in args[1:]) or kwargs.get("closure") is not None:
            raise ValueError(
                "NMDecayPruner: expected optimizer.step() without a closure during mask decay "
                "(it would run the model on the latent weights), got a closure"
            )
        self._latent_now = []
        for name, mod in self.layers.items():
            f, w = self.factor.get(name), mod._parameters["weight"]
            if f is None or w.grad is None:  # no gradient: the optimizer leaves it alone
                continue
            w.div_(f)
            w.grad.mul_(f)
            self._latent_now.append(name)

    @torch.no_grad()
    def _from_latent(self, optimizer, args, kwargs) -> None:
        """After ``optimizer.step()``: the latent ``W`` back to ``W_eff = W f`` (and the
        gradient back to ``dL/dW_eff``)."""
        for name in self._latent_now:
            f, w = self.factor[name], self.layers[name]._parameters["weight"]
            w.mul_(f)
            if w.grad is not None:
                w.grad.div_(f)
        self._latent_now = []

    def regularization_loss(self) -> torch.Tensor:
        """:meth:`BasePruner.regularization_loss` of the latent weights: during mask decay the
        penalty is over ``W = W_eff / f`` (L2 ``s/2 sum W^2``), as an optimizer's
        ``weight_decay`` is under the step hooks."""
        if not self.factor or self.regularization == "none" or self.reg_strength == 0:
            return super().regularization_loss()
        total = None
        for name, mod in self.layers.items():
            w = mod.weight
            if not w.requires_grad:
                continue
            f = self.factor.get(name)
            if f is not None:
                w = w / f
            term = w.abs().sum() if self.regularization == "l1" else w.pow(2).sum()
            total = term if total is None else total + term.to(total.device)
        if total is None:
            return next(iter(self.layers.values())).weight.new_zeros(())
        s = self.reg_strength
        return total * (s if self.regularization == "l1" else s / 2)

    # ------------------------------------------------------------------ resume
    def _config(self) -> dict:
        return {
            "n_m": [self.n, self.m],
            "recipe": self.recipe,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "decay_steps": self.decay_steps,
        }

    def _extra_state(self) -> dict:
        return {
            "beta": self.beta,
            "stage_n": self.stage_n,
            "factor": {n: f.clone() for n, f in self.factor.items()},
        }

    def _load_extra_state(self, state: dict) -> None:
        self.beta = float(state["beta"])
        self.stage_n = int(state["stage_n"])
        self.factor = {
            n: f.to(self.layers[n].weight.device).clone() for n, f in state["factor"].items()
        }
        shard_state(self.factor, self.layers)
        self._sync_hooks()
