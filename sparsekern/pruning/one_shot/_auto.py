"""SparseGPT's ``selection="auto"`` (the package docstring): the folds of the calibration batches,
the candidates chosen on the last fold, the cross-fitted guard against magnitude pruning on the
others, and the kept plan solved on every batch. A mixin of :class:`OneShotPruner`: it uses the
pruner's sequential pass (``_pass``), layers, kinds and options."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparsekern.pruning._wanda import magnitude_layer_mask
from sparsekern.pruning.one_shot._calibration import _output_tensor, _run_out
from sparsekern.pruning.one_shot._layers import _from_2d, _to_2d

_GUARD_Z = 2.0  # standard errors by which auto must flip fewer top-1 outputs (package docstring)
_PAPER_DAMP = 0.01  # SparseGPT's dampening, a fraction of mean(diag H)
# selection="auto"'s dampening grid (percdamp=None): the paper's 0.01 and two decades up, where
# the MNIST MLP at 90% does best ("block" at 1.0: 6.91% test error, at 0.01: 12.98%; docstring)
_AUTO_DAMPS = (0.01, 0.1, 1.0)


def _folds(n_batches: int) -> list[set[int]]:
    """``selection="auto"``'s folds of the calibration batches: ``K = min(4, n)``, fold ``k``
    the batches ``i`` with ``i % K == k``. The last fold (every 4th batch: 3, 7, ...; the last
    one with 2 or 3 batches) chooses the candidate, the others guard it; one batch: one fold,
    measured in-sample."""
    k = max(1, min(4, n_batches))
    return [set(range(f, n_batches, k)) for f in range(k)]


class AutoSelection:
    """``selection="auto"``'s methods of :class:`OneShotPruner`."""

    def _choose(self, module, kind, W, H, sparsity, score, damp):
        """``selection="auto"``'s per-layer candidate, one layer: each option (SparseGPT with
        ``"row"`` and with ``"block"`` selection at dampening ``damp``, one N:M solver for N:M,
        and the magnitude mask without an update) is installed in turn, the earlier layers as
        chosen and the later ones still dense, and the model's distortion on the held-out
        batches measured; the lowest wins (ties: the first in that order). Returns
        ``((W', keep), chosen, {option: distortion})``."""
        cands = {"row": self._sparsegpt(W, H, sparsity, "row", damp)}
        if self.n_m is None:
            cands["block"] = self._sparsegpt(W, H, sparsity, "block", damp)
        keep_m = magnitude_layer_mask(W, sparsity, self.n_m)
        cands["magnitude"] = (W * keep_m, keep_m)
        mask0 = module.mask.clone()
        dist = {}
        for c, (W_c, keep_c) in cands.items():
            module.mask.copy_(_from_2d(keep_c, module, kind))
            module.weight.copy_(_from_2d(W_c, module, kind).to(module.weight.dtype))
            dist[c] = score()
        module.mask.copy_(mask0)  # the caller installs the winner with set_mask
        chosen = min(dist, key=dist.get)
        return cands[chosen], chosen, dist

    # ------------------------------------------------------------------ the guard
    @torch.no_grad()
    def _reference(self, held: list, device) -> list[torch.Tensor]:
        """The dense model's outputs on the held-out batches, on the CPU in float32: log-softmax
        over the last dimension (``distortion="kl"``) or as they are (``"mse"``)."""
        refs = []
        for b in held:
            y = _output_tensor(_run_out(self.model, b, device)).detach().float()
            if self.distortion == "kl":
                y = F.log_softmax(y.reshape(-1, y.shape[-1]), dim=-1)
            refs.append(y.cpu())
        return refs

    @torch.no_grad()
    def _measure(self, held: list, refs: list, device) -> dict:
        """The model's output against the dense model's on the held-out batches, as sums that
        pool over folds (:func:`_figures`): ``kl`` (sum over output rows of ``KL(p_dense ||
        p)``), ``rows``, ``flips`` (bool ``[rows]`` on the CPU, True where the argmax differs;
        empty for ``"mse"``), ``num`` / ``den`` (``||y - y_dense||^2``, ``||y_dense||^2``)."""
        m = {"kl": 0.0, "rows": 0, "num": 0.0, "den": 0.0, "flips": []}
        for b, ref in zip(held, refs):
            y = _output_tensor(_run_out(self.model, b, device)).detach().float()
            ref = ref.to(y.device)
            if self.distortion == "kl":
                logp = F.log_softmax(y.reshape(-1, y.shape[-1]), dim=-1)
                p = ref.exp()
                m["kl"] += float(torch.where(p > 0, p * (ref - logp), 0.0).sum())
                m["flips"].append((logp.argmax(-1) != ref.argmax(-1)).cpu())
                m["rows"] += ref.shape[0]
            else:
                m["num"] += float(((y - ref) ** 2).sum())
                m["den"] += float((ref**2).sum())
        m["flips"] = torch.cat(m["flips"]) if m["flips"] else torch.zeros(0, dtype=torch.bool)
        return m

    def _figures(self, parts: list[dict]) -> dict[str, float]:
        """Pooled figures of :meth:`_measure`'s sums: ``{"kl": mean KL per output row, "top1":
        the fraction of rows flipped}`` (``"kl"``) or ``{"mse": sum num / sum den}``; a
        non-finite value counts as inf."""
        if self.distortion == "kl":
            rows = sum(p["rows"] for p in parts)
            flips = sum(int(p["flips"].sum()) for p in parts)
            d = {"kl": sum(p["kl"] for p in parts) / rows, "top1": flips / rows}
        else:
            num, den = sum(p["num"] for p in parts), sum(p["den"] for p in parts)
            d = {"mse": num / den if den > 0 else (0.0 if num == 0 else math.inf)}
        return {k: v if math.isfinite(v) else math.inf for k, v in d.items()}

    @torch.no_grad()
    def _install_magnitude(self, names: list[str], sparsity: float) -> None:
        """Magnitude masks on ``names`` in place (weights and mask buffers, no optimizer reset):
        for measuring the all-magnitude model's distortion; undone by :meth:`_restore`."""
        for n in names:
            module, kind = self.layers[n], self.kinds[n]
            keep = magnitude_layer_mask(_to_2d(module, kind), sparsity, self.n_m)
            module.mask.copy_(_from_2d(keep, module, kind))
            module.weight.mul_(module.mask)

    @staticmethod
    @torch.no_grad()
    def _restore(layers: dict, saved: dict) -> None:
        for n, (w, mask) in saved.items():
            layers[n].weight.copy_(w)
            layers[n].mask.copy_(mask)

    @torch.no_grad()
    def _guarded_pass(self, order, calls, target, device, dtype) -> list[dict]:
        """``selection="auto"`` (package docstring): candidates chosen on the last fold, the
        chosen one guarded against magnitude on the other folds (cross-fitted: solved without
        the fold it is measured on), then solved on every batch, or magnitude pruning where the
        guard finds no evidence for it. Every row gets ``guard``."""
        folds = _folds(len(self.calibration))
        choose_idx = folds[-1] if len(folds) > 1 else set()
        held = [self.calibration[i] for i in sorted(choose_idx)] or self.calibration
        refs = self._reference(held, device)

        def snapshot() -> dict:  # weights and masks, on the CPU: one copy of the selected layers
            return {
                n: tuple(
                    t.detach().to("cpu", copy=True)
                    for t in (self.layers[n].weight, self.layers[n].mask)
                )
                for n in order
            }

        dense = snapshot()
        self._install_magnitude(order, target)
        m_mag = self._measure(held, refs, device)
        self._restore(self.layers, dense)

        def score() -> float:  # the per-layer choice: KL (or MSE) alone, the smooth measure
            return self._figures([self._measure(held, refs, device)])[self.distortion]

        def run(plan, damp, per_layer=False) -> tuple[list[dict], dict]:
            self._restore(self.layers, dense)
            rows = self._pass(
                order,
                calls,
                choose_idx,
                target,
                device,
                dtype,
                "sparsegpt",
                score if per_layer else None,
                plan,
                damp,
            )
            return rows, self._measure(held, refs, device)

        # 1. the choice, on the last fold: row / block everywhere at each dampening, then the
        # per-layer candidate at the best one's dampening
        damps = _AUTO_DAMPS if self.percdamp is None else (self.percdamp,)
        sels = ("row", "block") if self.n_m is None else ("row",)
        figures, best = {}, None
        for d in damps:
            for sel in sels:
                rows, m = run(dict.fromkeys(order, sel), d)
                label = f"{sel}@{d:g}"
                figures[label] = self._figures([m])
                if best is None or figures[label][self.distortion] < best[2][self.distortion]:
                    best = (label, d, figures[label], m, {r["name"]: sel for r in rows}, rows)
        d = best[1]
        rows, m = run(None, d, per_layer=True)
        label = f"per-layer@{d:g}"
        figures[label] = self._figures([m])
        if figures[label][self.distortion] < best[2][self.distortion]:
            best = (label, d, figures[label], m, {r["name"]: r["selection"] for r in rows}, rows)
        cand, damp, _, m_choice, plan, choice_rows = best
        figures["magnitude"] = self._figures([m_mag])

        # 2. the guard, on the other folds: the chosen candidate solved without the fold
        guard_folds = folds[:-1]
        if guard_folds:
            parts_a, parts_m = [], []
            for f in guard_folds:
                self._restore(self.layers, dense)
                held_f = [self.calibration[i] for i in sorted(f)]
                refs_f = self._reference(held_f, device)
                self._install_magnitude(order, target)
                parts_m.append(self._measure(held_f, refs_f, device))
                self._restore(self.layers, dense)
                self._pass(order, calls, f, target, device, dtype, "sparsegpt", None, plan, damp)
                parts_a.append(self._measure(held_f, refs_f, device))
                del refs_f
        else:  # one batch: in-sample, the choice's own figures
            parts_a, parts_m = [m_choice], [m_mag]
        d_auto, d_mag = self._figures(parts_a), self._figures(parts_m)
        flips_a = torch.cat([p["flips"] for p in parts_a])
        flips_m = torch.cat([p["flips"] for p in parts_m])
        # top-1, paired over the guard's rows: b rows flipped by magnitude only, c by auto only
        b = int((flips_m & ~flips_a).sum())
        c = int((flips_a & ~flips_m).sum())
        worse = d_auto[self.distortion] > d_mag[self.distortion]
        if self.distortion == "kl" and not (b > c and b - c >= _GUARD_Z * math.sqrt(b + c)):
            worse = True  # no evidence that auto flips fewer top-1 predictions than magnitude

        # 3. the kept model, solved on every batch
        self._restore(self.layers, dense)
        if worse:
            rows = self._pass(order, calls, set(), target, device, dtype, "magnitude")
            for r in rows:  # what auto had chosen, for the record
                r["selection"] = "magnitude"
                r["auto_selection"] = plan[r["name"]]
            kept = "magnitude"
        else:
            rows = self._pass(
                order, calls, set(), target, device, dtype, "sparsegpt", None, plan, damp
            )
            choice = {r["name"]: r for r in choice_rows}
            for r in rows:
                r["selection"] = plan[r["name"]]
                if plan[r["name"]] != "magnitude":
                    r["percdamp"] = damp
                if "heldout_distortion" in choice[r["name"]]:
                    r["heldout_distortion"] = choice[r["name"]]["heldout_distortion"]
            kept = "auto"
        guard = {
            "kept": kept,
            "candidate": cand,
            "percdamp": damp,
            "distortion": self.distortion,
            "auto": d_auto,
            "magnitude": d_mag,
            "candidates": figures,
            "heldout_batches": len(choose_idx),
            "guard_batches": sum(len(f) for f in guard_folds),
        }
        if self.distortion == "kl":
            guard["top1_only_flipped_by"] = {"magnitude": b, "auto": c}
        for r in rows:
            r["guard"] = dict(guard)
        return rows
