"""Omni-sparsity (Yang et al., ICASSP 2022, "Omni-sparsity DNN: fast sparsity optimization for
on-device streaming E2E ASR via supernet"): one weight-shared network trained so that it can be cut
to any of several sparsities, for the cost of training one model.

Each sparsity level has its own magnitude masks over the shared weights; a level is sampled at
every training step and the step trains that level's sub-network. ``at_sparsity(s)`` gives the
network at level ``s``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from sparsekern.nn._dtensor import is_dtensor, local_like
from sparsekern.nn.masks import note_mask_synced
from sparsekern.pruning.base import BasePruner

__all__ = ["OmniSparsity", "nested_magnitude_masks"]


@torch.no_grad()
def nested_magnitude_masks(
    layers: dict[str, nn.Module], levels: Iterable[float]
) -> dict[float, dict[str, torch.Tensor]]:
    """``{level: {layer: bool mask}}``: per layer, the ``round((1 - level) * numel)`` largest
    ``|w|``. One ranking per layer serves every level (ties broken by position), so the masks
    are nested: a weight kept at a higher sparsity is kept at every lower one.

    An FSDP2-sharded weight (DTensor) is ranked whole (all-gathered, as one process ranks it)
    and each mask sharded like it.

    Raises:
        ValueError: a NaN / inf weight, naming its layer.
    """
    levels = [float(s) for s in levels]
    out: dict[float, dict[str, torch.Tensor]] = {s: {} for s in levels}
    for n, m in layers.items():
        sw = m.weight.detach()
        w = sw.full_tensor() if is_dtensor(sw) else sw
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"OmniSparsity: expected finite weights, got NaN/inf in {n}")
        order = torch.sort(w.abs().flatten(), descending=True, stable=True).indices
        for s in levels:
            mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
            mask[order[: round((1.0 - s) * w.numel())]] = True
            out[s][n] = local_like(mask.view_as(w), sw) if is_dtensor(sw) else mask.view_as(w)
    return out


def _rank0_value(i: int) -> int:
    import torch.distributed as dist

    box = [i]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


class OmniSparsity(BasePruner):
    """One weight-shared network for many sparsities (Yang et al. 2022).

    Lifecycle::

        omni = OmniSparsity(model, opt, levels=(0.5, 0.75, 0.9, 0.95, 0.98))
        for x, y in loader:
            with omni.sample():                 # one level per step, its masks installed
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(); loss.backward(); opt.step()
            omni.step()                         # recomputes the levels' masks from |w|
        net90 = omni.at_sparsity(0.9)           # an independent copy at 90% sparsity
        with omni.use(0.95): evaluate(model)    # or in place, restored on exit

    Mechanism, as we read the paper: the network's weights are shared by every level; each level
    has its own per-layer magnitude masks (``round((1 - s) * numel)`` largest ``|w|`` of each
    layer, so every level's sparsity is exact per layer); a level is sampled uniformly at each
    training step and only that sub-network is trained on the step. The masks come from one
    ranking of the shared weights, so they are **nested** (the 98% net is inside the 95% net,
    ...): a sub-network at a higher sparsity is contained in every one at a lower sparsity, as in
    the paper's supernet, where smaller models are sub-networks of larger ones.

    Inside a level (``sample()`` / ``use(s)``), the weights outside its mask are zero (the mask
    invariant) and the optimizer step does not move them: on exit they get back their values
    exactly, so a step at 98% leaves the 98% of the weights outside its mask unchanged.
    Their gradient is zero, but their optimizer state is not zeroed (the weights live on in the
    other levels): between ``opt.step()`` and leaving the context, momentum may have moved them
    (``check_masks`` would say so); leaving restores them, and their momentum decays on the steps
    they sit out.

    Deviations: the paper trains an ASR Emformer with its own schedule of levels and reports WER;
    this class is the mechanism, model-agnostic. The masks are recomputed every ``update_every``
    steps (default 1: always the current magnitudes; the paper does not fix a period that we
    could find). ``sampling="uniform"`` over the given levels is the only sampler.

    Args:
        model, optimizer: as in :class:`BasePruner`.
        levels: the sparsities, each in [0, 1) (default the issue's 0.5/0.75/0.9/0.95/0.98).
        update_every: steps between mask updates (>= 1).
        generator: ``torch.Generator`` for the level sampling (None: the global RNG).
        layers, regularization, reg_strength: see :class:`BasePruner`; ``sparsity`` and
            ``schedule`` are refused (the targets are ``levels``).

    Attributes:
        masks: ``{level: {layer: bool mask}}`` now.
        level: the level installed now (None outside ``sample()`` / ``use()``).
        counts: ``{level: steps sampled}``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        levels: Iterable[float] = (0.5, 0.75, 0.9, 0.95, 0.98),
        update_every: int = 1,
        generator: torch.Generator | None = None,
        **base,
    ) -> None:
        for k in ("sparsity", "schedule"):
            if base.get(k) is not None:
                raise ValueError(
                    f"OmniSparsity: expected no {k} (its targets are levels), got {base[k]!r}"
                )
        levels = [float(s) for s in levels]
        if not levels or any(not 0.0 <= s < 1.0 for s in levels) or len(set(levels)) != len(levels):
            raise ValueError(f"OmniSparsity: expected distinct levels in [0, 1), got {levels}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"OmniSparsity: expected update_every >= 1, got {update_every!r}")
        super().__init__(model, optimizer, **base)
        self.levels = sorted(levels)
        self.update_every = update_every
        self.generator = generator
        self.level: float | None = None
        self.counts = {s: 0 for s in self.levels}
        self.masks = nested_magnitude_masks(self.layers, self.levels)

    def _level(self, s) -> float:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or float(s) not in self.levels:
            raise ValueError(f"OmniSparsity: expected a level in {self.levels}, got {s!r}")
        return float(s)

    @contextlib.contextmanager
    def use(self, s: float) -> Iterator[nn.Module]:
        """Context manager: the model at level ``s`` (its masks installed). On exit, masks come
        back and every weight outside level ``s``'s mask gets its value from before, exactly;
        the weights inside keep what the step gave them. Yields the model."""
        s = self._level(s)
        if self.level is not None:
            raise RuntimeError(f"OmniSparsity: level {self.level} is already installed")
        saved = {n: (m.weight.detach().clone(), m.mask.clone()) for n, m in self.layers.items()}
        self.level = s
        try:
            with torch.no_grad():
                for n, m in self.layers.items():
                    m.mask.copy_(self.masks[s][n])  # the next forward zeroes the rest
            yield self.model
        finally:
            self.level = None
            with torch.no_grad():
                for n, m in self.layers.items():
                    w, mask = saved[n]
                    m.weight.copy_(torch.where(self.masks[s][n], m.weight, w))
                    m.mask.copy_(mask)
                    note_mask_synced(m)

    @contextlib.contextmanager
    def sample(self) -> Iterator[float]:
        """:meth:`use` at a level drawn uniformly from ``levels`` (the paper's per-step
        sampling); yields the level."""
        i = int(torch.randint(len(self.levels), (1,), generator=self.generator))
        if any(is_dtensor(m.weight) for m in self.layers.values()):
            i = _rank0_value(i)  # FSDP2: every rank trains one level (rank 0's draw)
        s = self.levels[i]
        self.counts[s] += 1
        with self.use(s):
            yield s

    def step(self, closure=None) -> bool:
        """Call after each step (outside ``sample()``): counts it and, every ``update_every``
        steps, recomputes every level's masks from the shared weights. True when a mask
        changed."""
        if self.level is not None:
            raise RuntimeError("OmniSparsity.step: call it after leaving sample() / use()")
        self.steps += 1
        if self.steps % self.update_every:
            return False
        new = nested_magnitude_masks(self.layers, self.levels)
        changed = any(
            not torch.equal(new[s][n], self.masks[s][n]) for s in self.levels for n in self.layers
        )
        self.masks = new
        return changed

    def compute_masks(self, sparsity, closure=None) -> dict[str, torch.Tensor]:
        """Level ``sparsity``'s masks from the current weights (``prune(s)`` installs them
        permanently: the end of the supernet, one level kept)."""
        return nested_magnitude_masks(self.layers, [sparsity])[float(sparsity)]

    def at_sparsity(self, s: float) -> nn.Module:
        """An independent copy of the model at level ``s`` (its masks installed, the other
        weights zero); the shared model is untouched.

        Raises:
            NotImplementedError: an FSDP2-sharded model (copy a whole model instead, e.g.
                ``sparsekern.training.distributed.full_state_dict`` into a fresh one, and
                ``use(s)`` it there).
        """
        if any(is_dtensor(m.weight) for m in self.layers.values()):
            raise NotImplementedError(
                "OmniSparsity.at_sparsity: expected an unsharded model, got FSDP2-sharded "
                "weights: a deep copy of a sharded model is not an independent model; load "
                "full_state_dict(model) into a fresh one and use at_sparsity there"
            )
        with self.use(s):
            net = copy.deepcopy(self.model)
        names = set(self.layers)
        with torch.no_grad():
            for n, m in net.named_modules():
                if n in names:
                    m.weight.masked_fill_(~m.mask, 0)
                    note_mask_synced(m)
        return net

    def level_sparsity(self, s: float) -> float:
        """Pruned fraction of all the layers' weights at level ``s``."""
        s = self._level(s)
        kept = sum(int(m.count_nonzero()) for m in self.masks[s].values())
        return 1.0 - kept / sum(m.numel() for m in self.masks[s].values())

    def _config(self) -> dict:
        return {"levels": list(self.levels), "update_every": self.update_every}

    def _extra_state(self) -> dict:
        return {
            "counts": {str(s): c for s, c in self.counts.items()},
            "masks": {str(s): {n: m.clone() for n, m in d.items()} for s, d in self.masks.items()},
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """As :meth:`BasePruner.load_state_dict`, with every level's masks; nothing changes when
        it refuses."""
        self._check_extra(state)
        super().load_state_dict(state, strict)

    def _check_extra(self, state: dict) -> None:
        masks = state.get("masks")
        want = {str(s) for s in self.levels}
        if not isinstance(masks, dict) or set(masks) != want:
            raise ValueError(f"OmniSparsity.load_state_dict: expected masks for levels {want}")
        for d in masks.values():
            for n, m in self.layers.items():
                got = d.get(n)
                if not isinstance(got, torch.Tensor) or got.shape != m.weight.shape:
                    raise ValueError(
                        f"OmniSparsity.load_state_dict: expected a mask of shape "
                        f"{list(m.weight.shape)} for {n}"
                    )

    def _load_extra_state(self, state: dict) -> None:
        masks = state["masks"]
        self.masks = {s: {n: masks[str(s)][n].to(torch.bool).clone() for n in self.layers}
                      for s in self.levels}  # fmt: skip
        self.counts = {s: int(state.get("counts", {}).get(str(s), 0)) for s in self.levels}
