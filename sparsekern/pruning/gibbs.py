"""Gibbs pruning (Labach and Valaee 2020, "A Framework for Neural Network Pruning Using Gibbs
Distributions"): while training, masks are sampled from a Gibbs distribution

    p(m) = exp(-H(m, w) / T) / Z,      H(m, w) = -sum_i m_i (a_i - mu),

an energy that couples the masks ``m`` to the weights (``a_i``: unit ``i``'s squared magnitude,
a weight's ``w_i^2`` or a channel's ``||w_c||^2``, divided by the layer's mean so one temperature
suits every layer), with a chemical potential ``mu`` set so that the expected kept fraction is the
target density. The temperature ``T`` is annealed geometrically from ``t_start`` to ``t_end``: at
high T a mask is close to a random one at the target density (a stochastic regulariser, like
dropout); as T falls it concentrates on the energy-minimising mask, the largest magnitudes
(adaptive pruning). At ``end_step`` the T = 0 mask is installed (exactly the target's count per
layer) and frozen. Weights and masks adapt to each other because the weights train under the
sampled masks, and the masks follow the weights.

The energy has no coupling between units, so its Gibbs distribution factorises and each unit is
sampled exactly (heat bath): ``P(m_i = 1) = 1 / (1 + exp(dH_i / T))`` with
``dH_i = H(m_i = 1) - H(m_i = 0) = mu - a_i``. ``structure="channel"`` samples whole output
channels (a conv's filters, a Linear's rows), the paper's filter-wise pruning.

Defaults (our choice where the paper's text available here gives none): ``t_start = 1``,
``t_end = 1e-3``, resampled every step over ``[begin_step, end_step)`` (default the first 3/4 of
``total_steps``). A weight dropped by a sample keeps its value beside the model (``latent``, see
:mod:`sparsekern.pruning._latent`) and returns with it when a later sample keeps it; in the model
it is exactly zero meanwhile (the mask invariant) and its optimizer state restarts at zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsekern.pruning._common import check_fraction, topk_mask
from sparsekern.pruning._latent import full_weight, install_keeping_latent, new_latent
from sparsekern.pruning.base import BasePruner, Closure
from sparsekern.pruning.importance import check_finite

__all__ = ["GibbsPruner", "STRUCTURES", "chemical_potential", "keep_probabilities"]

STRUCTURES = ("unstructured", "channel")


def keep_probabilities(a: torch.Tensor, mu: float, temperature: float) -> torch.Tensor:
    """Heat-bath probability of keeping each unit: ``sigmoid((a - mu) / T)`` (float64)."""
    return torch.sigmoid((a.double() - mu) / temperature)


def chemical_potential(a: torch.Tensor, density: float, temperature: float) -> float:
    """The ``mu`` with ``mean(sigmoid((a - mu) / T)) = density`` (bisection in float64, to
    ``1e-9 T``: the probabilities then hold to about 1e-9)."""
    a = a.double().flatten()
    if density <= 0.0:
        return math.inf
    if density >= 1.0:
        return -math.inf
    lo = float(a.min()) - 60 * temperature
    hi = float(a.max()) + 60 * temperature
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if float(torch.sigmoid((a - mid) / temperature).mean()) > density:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * temperature:
            break
    return 0.5 * (lo + hi)


class GibbsPruner(BasePruner):
    """Gibbs pruning: masks sampled every step from a Gibbs distribution over a magnitude energy,
    the temperature annealed to zero; exact target sparsity from ``end_step`` on.

    Lifecycle::

        pruner = GibbsPruner(model, opt, sparsity=0.9, total_steps=T)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
            pruner.step()                   # a new sample at the current temperature
        summary = pruner.finalize()         # exactly 90% sparse

    Args:
        model, optimizer, base keywords (``layers``, ``regularization``, ``reg_strength``): see
            :class:`BasePruner`.
        sparsity: each layer's target pruned fraction (of its units).
        total_steps: optimizer steps of the whole training; sets ``end_step``'s default.
        begin_step, end_step: sampling runs over these steps (defaults 0 and
            ``0.75 * total_steps``); at ``end_step`` the T = 0 mask is installed and frozen.
        t_start, t_end: the annealed temperature's ends (geometric in between).
        structure: ``"unstructured"`` (weights) or ``"channel"`` (output channels).
        generator: ``torch.Generator`` (CPU) for the samples; its state is part of
            :meth:`state_dict`, so a resumed run draws the same masks. Default: a fresh one seeded
            from the global RNG.

    Attributes:
        temperature: the temperature of the latest sample. latent: dropped weights' values.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        sparsity: float,
        total_steps: int | None = None,
        begin_step: int = 0,
        end_step: int | None = None,
        t_start: float = 1.0,
        t_end: float = 1e-3,
        structure: str = "unstructured",
        generator: torch.Generator | None = None,
        **base,
    ) -> None:
        super().__init__(model, optimizer, sparsity=sparsity, **base)
        check_fraction(sparsity, "GibbsPruner")
        if structure not in STRUCTURES:
            raise ValueError(f"GibbsPruner: expected structure in {STRUCTURES}, got {structure!r}")
        if not (0 < t_end <= t_start < math.inf):
            raise ValueError(
                f"GibbsPruner: expected 0 < t_end <= t_start, got t_start={t_start}, t_end={t_end}"
            )
        if end_step is None:
            if total_steps is None or total_steps < 1:
                raise ValueError(
                    f"GibbsPruner: expected total_steps >= 1 (or end_step), got {total_steps}"
                )
            end_step = int(0.75 * total_steps)
        if not (0 <= begin_step < end_step):
            raise ValueError(
                f"GibbsPruner: expected 0 <= begin_step < end_step, got {begin_step}, {end_step}"
            )
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
        elif not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError(f"GibbsPruner: expected a CPU torch.Generator, got {generator!r}")
        self.generator = generator
        self.begin_step, self.end_step = int(begin_step), int(end_step)
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.structure = structure
        self.temperature = self.t_start
        self.frozen = False
        self.latent = new_latent(self.layers)

    def temperature_at(self, step: int) -> float:
        """``t_start (t_end / t_start) ** ((step - begin) / (end - begin))``, clamped to the
        ends."""
        f = (step - self.begin_step) / (self.end_step - self.begin_step)
        f = min(max(f, 0.0), 1.0)
        return self.t_start * (self.t_end / self.t_start) ** f

    # ------------------------------------------------------------------ the energy
    @torch.no_grad()
    def unit_energies(self, name: str) -> torch.Tensor:
        """``a``: each unit's squared magnitude over the layer's mean (float64; a weight's shape,
        or ``[out]`` for channels), from the full weights (dropped ones at their latent value)."""
        mod = self.layers[name]
        w = full_weight(mod, self.latent[name])
        check_finite(w, name, type(self).__name__)
        w2 = w.double() ** 2
        if self.structure == "channel":
            rows = 1 if getattr(mod, "weight_layout", "out_in") == "in_out" else 0
            w2 = w2.sum(dim=[d for d in range(w2.dim()) if d != rows])
        mean = w2.mean()
        return w2 / mean if mean > 0 else w2

    def keep_probabilities(self, name: str, temperature: float | None = None) -> torch.Tensor:
        """``P(unit kept)`` under the layer's Gibbs distribution at ``temperature`` (default: the
        current one)."""
        t = self.temperature if temperature is None else temperature
        a = self.unit_energies(name)
        return keep_probabilities(a, chemical_potential(a, 1.0 - self.sparsity, t), t)

    def _expand(self, name: str, unit_mask: torch.Tensor) -> torch.Tensor:
        mod = self.layers[name]
        if self.structure == "unstructured":
            return unit_mask.to(mod.mask.device)
        if getattr(mod, "weight_layout", "out_in") == "in_out":
            return unit_mask.view(1, -1).expand_as(mod.mask).to(mod.mask.device).contiguous()
        shape = [-1] + [1] * (mod.mask.dim() - 1)
        return unit_mask.view(shape).expand_as(mod.mask).to(mod.mask.device).contiguous()

    @torch.no_grad()
    def sample(self, temperature: float) -> dict[str, torch.Tensor]:
        """One exact sample of every layer's mask at ``temperature`` (uses :attr:`generator`)."""
        masks = {}
        for name in self.layers:
            p = self.keep_probabilities(name, temperature).cpu()
            u = torch.rand(p.shape, generator=self.generator, dtype=torch.float64)
            masks[name] = self._expand(name, u < p)
        return masks

    @torch.no_grad()
    def compute_masks(self, sparsity: float, closure: Closure | None = None) -> dict:
        """The T = 0 mask: each layer keeps exactly ``round((1 - sparsity) * units)`` units of
        largest energy ``a``."""
        masks = {}
        for name in self.layers:
            a = self.unit_energies(name)
            masks[name] = self._expand(name, topk_mask(a, round((1.0 - sparsity) * a.numel())))
        return masks

    def prune(self, sparsity=None, closure: Closure | None = None) -> dict:
        """Install the T = 0 mask now and freeze (sampling stops)."""
        target = self._default_target() if sparsity is None else sparsity
        install_keeping_latent(self, self.compute_masks(target), self.latent, force=True)
        self.frozen = True
        return self.kept_fractions()

    def step(self, closure: Closure | None = None) -> bool:
        """Count the step; before ``end_step``, install a new sample at the annealed
        temperature; at ``end_step``, the exact T = 0 mask, frozen.

        Returns:
            True if a mask changed.
        """
        self.steps += 1
        t = self.steps
        if self.frozen or t < self.begin_step:
            return False
        if t >= self.end_step:
            self.frozen = True
            self.temperature = 0.0
            return install_keeping_latent(
                self, self.compute_masks(self.sparsity), self.latent, force=True, event="freeze"
            )
        self.temperature = self.temperature_at(t)
        return install_keeping_latent(self, self.sample(self.temperature), self.latent)

    # ------------------------------------------------------------------ resume
    def _config(self) -> dict:
        return {
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "t_start": self.t_start,
            "t_end": self.t_end,
            "structure": self.structure,
        }

    def _extra_state(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "temperature": self.temperature,
            "frozen": self.frozen,
            "latent": {n: t.clone() for n, t in self.latent.items()},
        }

    def _load_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.temperature = float(state["temperature"])
        self.frozen = bool(state["frozen"])
        for n, t in state["latent"].items():
            self.latent[n].copy_(t)
