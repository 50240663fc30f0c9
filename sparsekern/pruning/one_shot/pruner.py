"""The one-shot pruner (:class:`OneShotPruner`), :func:`one_shot` and the report's table: the
sequential layer-by-layer procedure of the package docstring."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable

import torch
from torch import nn

from sparsekern.nn._sparse_module import is_sparse_module
from sparsekern.nn._swap import replace_module
from sparsekern.nn.masks import set_mask, zero_optimizer_state
from sparsekern.pruning._sparsegpt import sparsegpt_prune
from sparsekern.pruning._vocab import n_m_pair, renamed_keywords
from sparsekern.pruning._wanda import magnitude_layer_mask, wanda_mask
from sparsekern.pruning.base import BasePruner, Closure
from sparsekern.pruning.one_shot._auto import _PAPER_DAMP, AutoSelection
from sparsekern.pruning.one_shot._calibration import (
    _check_calibration,
    _device,
    _dry_run,
    _guard_output_check,
    _run,
    _StopForward,
)
from sparsekern.pruning.one_shot._layers import (
    _from_2d,
    _inputs_2d,
    _is_head,
    _kind,
    _sparse_version,
    _tied,
    _to_2d,
    _unsupported,
)

__all__ = ["METHODS", "OneShotPruner", "format_one_shot_report", "one_shot"]

METHODS = ("sparsegpt", "wanda", "magnitude")
SELECTIONS = ("auto", "row", "block")
DISTORTIONS = ("kl", "mse")


def _rel_error(W: torch.Tensor, W_new: torch.Tensor, G: torch.Tensor) -> float:
    """``||W X - W' X||^2 / ||W X||^2`` over the calibration inputs, exactly from ``G = X^T X``."""
    D = W - W_new
    num = float(((D @ G) * D).sum())
    den = float(((W @ G) * W).sum())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _check_n_m(n_m) -> tuple[int, int] | None:
    return None if n_m is None else n_m_pair(n_m, "one_shot")


# ---------------------------------------------------------------------------- the pruner
class OneShotPruner(AutoSelection, BasePruner):
    """One-shot pruning from calibration inputs (package docstring), under the common lifecycle::

        pruner = OneShotPruner(model, calibration=batches, method="sparsegpt", n_m=(2, 4))
        kept = pruner.prune()            # {layer: kept fraction}; pruner.report: per layer
        summary = pruner.finalize()
        fast, how = export_semi_structured(model)    # on a GPU: 2:4 SparseLinear -> cuSPARSELt

    ``step()`` only counts steps (there is no schedule: the method is one-shot); ``prune()`` may be
    called again (e.g. after more training), it re-runs the whole sequential procedure.

    Args:
        model: any ``nn.Module``; its selected layers are replaced in place by sparse ones at
            construction (a model that is itself a dense layer cannot be: wrap it in
            ``nn.Sequential``).
        optimizer: the optimizer training the model, or None (its state is zeroed where pruned).
        calibration: an iterable of batches (tensor / tuple / dict), read into a list.
        method: ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``.
        sparsity: pruned fraction in [0, 1] (default 0.5); with ``n_m`` it must be ``1 - n/m``
            or None.
        n_m: ``(n, m)``: keep N of every M consecutive inputs (2:4 for sparse tensor cores).
        layers: names of the layers to prune (default: package docstring).
        block_size: SparseGPT's lazy-update column block (128; ``blocksize=`` is the
            deprecated name).
        percdamp: SparseGPT's dampening, a fraction of ``mean(diag H)``: None (default) is the
            paper's 0.01 with ``selection="row"`` / ``"block"``, and with ``"auto"`` a choice
            among 0.01, 0.1 and 1.0 (package docstring); a number is used as given (``"auto"``
            then chooses the selection only).
        compensate: SparseGPT's error-compensation update; False is the ablation (the same mask
            selection, kept weights unchanged).
        selection: SparseGPT's mask selection: ``"auto"`` (default: the lowest held-out model
            distortion among ``"row"`` everywhere, ``"block"`` everywhere (each at every
            dampening of ``percdamp``) and a per-layer choice, then a cross-fitted guard against
            the all-magnitude model, then the kept model solved on every batch; see the module
            docstring),
            ``"row"`` (the same count in every row of a block) or ``"block"`` (one threshold
            over the whole block, as the reference code does). ``"row"`` / ``"block"`` use
            every calibration batch and have no guard. On the small GPT-2 of
            ``docs/one_shot.md`` ``"row"`` is far better, on the MNIST MLP ``"block"`` is.
        distortion: ``selection="auto"``'s measure of the model output against the dense
            model's on the held-out batches: ``"kl"`` (default; the output's last dimension
            are logits, >= 2) or ``"mse"`` (relative squared error, any floating output).
            Refused (``ValueError``) with another method or selection, which do not use it.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        calibration: Iterable,
        method: str = "sparsegpt",
        sparsity: float | None = None,
        n_m: tuple[int, int] | None = None,
        layers: Iterable[str] | None = None,
        block_size: int = 128,
        percdamp: float | None = None,
        compensate: bool = True,
        selection: str = "auto",
        distortion: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"OneShotPruner: expected an nn.Module, got {type(model).__name__}")
        if method not in METHODS:
            raise ValueError(f"one_shot: expected method in {METHODS}, got {method!r}")
        self.n_m = _check_n_m(n_m)
        if self.n_m is not None:
            nominal = 1.0 - self.n_m[0] / self.n_m[1]
            if sparsity is not None and abs(float(sparsity) - nominal) > 1e-12:
                raise ValueError(
                    f"one_shot: expected sparsity None or {nominal:.4g} (the sparsity of "
                    f"{self.n_m[0]}:{self.n_m[1]}), got {sparsity}"
                )
            sparsity = nominal
        elif sparsity is None:
            sparsity = 0.5
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
            raise TypeError(f"one_shot: expected a sparsity in [0, 1], got {sparsity!r}")
        if not 0.0 <= float(sparsity) <= 1.0:
            raise ValueError(f"one_shot: expected a sparsity in [0, 1], got {sparsity}")
        if isinstance(block_size, bool) or not (isinstance(block_size, int) and block_size >= 1):
            raise ValueError(f"one_shot: expected block_size an integer >= 1, got {block_size!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"one_shot: expected selection in {SELECTIONS}, got {selection!r}")
        if percdamp is not None and (
            isinstance(percdamp, bool)
            or not isinstance(percdamp, (int, float))
            or not (percdamp >= 0 and math.isfinite(percdamp))
        ):
            raise ValueError(f"one_shot: expected percdamp None or a number >= 0, got {percdamp!r}")
        guarded = method == "sparsegpt" and selection == "auto"
        if distortion is not None and distortion not in DISTORTIONS:
            raise ValueError(f"one_shot: expected distortion in {DISTORTIONS}, got {distortion!r}")
        if distortion is not None and not guarded:
            raise ValueError(
                f"one_shot: distortion is the measure of selection='auto''s guard (method "
                f"'sparsegpt'), got it with method={method!r}, selection={selection!r}"
            )
        self.distortion = (distortion or "kl") if guarded else None
        self.calibration = _check_calibration(calibration)
        check = _guard_output_check(self.distortion) if guarded else None
        _dry_run(model, self.calibration, check)  # a bad batch fails here, before any change
        self.method = method
        self.block_size = block_size
        self.percdamp = None if percdamp is None else float(percdamp)
        self.compensate = bool(compensate)
        self.selection = selection
        self.skipped: dict[str, tuple[str, str]] = {}  # name -> (kind, reason)
        self.kinds: dict[str, str] = {}
        self._replaced: list[tuple[nn.Module, nn.Module]] = []
        names = self._select(model, layers)
        try:
            if not names:
                raise ValueError(
                    f"one_shot: expected at least one layer to prune, got none (skipped: "
                    f"{ {n: r for n, (_, r) in self.skipped.items()} })"
                )
            super().__init__(model, optimizer, sparsity=float(sparsity), layers=names)
        except Exception:
            for old, new in self._replaced:  # leave the model as it came
                replace_module(model, new, old)
            raise
        self.report: list[dict] = []

    # ------------------------------------------------------------------ selection
    def _select(self, model: nn.Module, layers) -> list[str]:
        if _kind(model) is not None and not is_sparse_module(model):
            raise TypeError(
                f"one_shot: the model is itself a dense {type(model).__name__}, which cannot be "
                "replaced in place: wrap it, e.g. nn.Sequential(layer)"
            )
        found = {n: m for n, m in model.named_modules() if _kind(m) is not None}
        if layers is None:
            wanted = []
            for n, m in found.items():
                if _is_head(n):
                    self.skipped[n] = (_kind(m), "the LM head (left dense by default)")
                elif (other := _tied(model, n, m)) is not None:
                    self.skipped[n] = (_kind(m), f"weight tied with {other!r}")
                else:
                    wanted.append(n)
        else:
            if isinstance(layers, str):
                layers = [layers]
            wanted = list(layers)
            unknown = [n for n in wanted if n not in found]
            if unknown:
                raise KeyError(
                    f"one_shot: expected layer names among the supported layers {list(found)}, "
                    f"got unknown {unknown}"
                )
        names = []
        for n in wanted:
            m, kind = found[n], _kind(found[n])
            why = _unsupported(m, kind)
            if why is not None:
                self.skipped[n] = (kind, why)
                continue
            new = _sparse_version(m, kind)
            if new is not m:
                replace_module(model, m, new)
                self._replaced.append((m, new))
            self.kinds[n] = kind
            names.append(n)
        return names

    # ------------------------------------------------------------------ the procedure
    def compute_masks(self, sparsity, closure: Closure | None = None) -> dict:
        raise NotImplementedError(
            "OneShotPruner prunes sequentially (each layer's inputs come from the pruned layers "
            "before it), which changes the model as it goes: call prune()"
        )

    @torch.no_grad()
    def _order(self, device) -> tuple[list[str], dict[str, int]]:
        """The selected layers in the order the forward first calls them (one calibration
        batch), and how many times each is called per forward."""
        order: list[str] = []
        calls: dict[str, int] = {}
        handles = []
        for n, m in self.layers.items():

            def hook(mod, inputs, n=n):
                calls[n] = calls.get(n, 0) + 1
                if n not in order:
                    order.append(n)

            handles.append(m.register_forward_pre_hook(hook))
        try:
            _run(self.model, self.calibration[0], device)
        finally:
            for h in handles:
                h.remove()
        return order, calls

    @torch.no_grad()
    def _statistics(self, name: str, stop: bool, device, dtype, held: set[int]):
        """``G = X^T X`` of layer ``name``'s inputs with the model as it is now, over the solve
        batches and over the held-out ones (indices in ``held``; ``None`` where no token came),
        their token counts and the seconds taken."""
        module, kind = self.layers[name], self.kinds[name]
        state = {"G": [None, None], "n": [0, 0], "part": 0}  # [solve, held out]

        def hook(mod, inputs):
            x = _inputs_2d(mod, kind, inputs[0].detach()).to(dtype)
            part = state["part"]
            g = x.t() @ x
            old = state["G"][part]
            state["G"][part] = g if old is None else old + g
            state["n"][part] += x.shape[0]
            if stop:
                raise _StopForward

        t0 = time.perf_counter()
        h = module.register_forward_pre_hook(hook)
        try:
            for i, batch in enumerate(self.calibration):
                state["part"] = int(i in held)
                with contextlib.suppress(_StopForward):
                    _run(self.model, batch, device)
        finally:
            h.remove()
        return state["G"], state["n"], time.perf_counter() - t0

    @torch.no_grad()
    def _prune_layer(
        self, name: str, Gs: list, counts: list[int], sparsity, method, score, selection, damp
    ):
        """Prune layer ``name`` from ``Gs = [G_solve, G_heldout]`` (``G_heldout`` None when there
        is no held-out batch) with ``method`` (SparseGPT: ``selection`` ``"row"`` / ``"block"``
        at dampening ``damp``); ``score()``: the model's held-out distortion as it is now (the
        per-layer candidate of ``selection="auto"``: :meth:`_choose`), else None."""
        module, kind = self.layers[name], self.kinds[name]
        G_solve = Gs[0]
        G_all = G_solve if Gs[1] is None else G_solve + Gs[1]
        W = _to_2d(module, kind).to(G_solve.dtype).clone()  # a copy: candidates are written over
        t0 = time.perf_counter()
        extra = {}
        if method == "sparsegpt":
            H = G_solve * (2.0 / counts[0])
            if score is not None:
                (W_new, keep), chosen, extra["heldout_distortion"] = self._choose(
                    module, kind, W, H, sparsity, score, damp
                )
                extra["selection"] = chosen
            else:
                W_new, keep = self._sparsegpt(W, H, sparsity, selection, damp)
        else:
            if method == "wanda":
                col_norm = torch.diagonal(G_solve).clamp_min(0).sqrt()
                keep = wanda_mask(W, col_norm, sparsity, self.n_m)
            else:
                keep = magnitude_layer_mask(W, sparsity, self.n_m)
            W_new = W * keep
        seconds = time.perf_counter() - t0
        rel = _rel_error(W, W_new, G_all)
        module.weight.copy_(_from_2d(W_new, module, kind).to(module.weight.dtype))
        new_mask = _from_2d(keep, module, kind).to(module.mask.device)
        reset = ~new_mask | (new_mask != module.mask)
        set_mask(module, new_mask, self.optimizer)
        for opt in self._others:  # optimizers holding the weights' state, not passed in
            zero_optimizer_state(opt, module.weight, reset)
        return {
            "name": name,
            "kind": kind,
            "shape": list(W.shape),
            "density": float(keep.float().mean()),
            "rel_error": rel,
            "tokens": counts[0] + counts[1],
            "seconds": seconds,
            **extra,
        }

    def _sparsegpt(self, W, H, sparsity, selection, damp):
        return sparsegpt_prune(
            W, H, sparsity, self.n_m, self.block_size, damp, self.compensate, selection
        )

    def _pass(
        self,
        order,
        calls,
        held_idx,
        target,
        device,
        dtype,
        method,
        score=None,
        plan=None,
        damp=None,
    ) -> list[dict]:
        """The sequential layer-by-layer procedure (package docstring) with ``method``; SparseGPT
        takes each layer's selection from ``plan`` (``{layer: "row" | "block" | "magnitude"}``;
        None: the pruner's ``selection``) at dampening ``damp`` (None: the pruner's, else the
        paper's 0.01); ``score``: the per-layer candidate (:meth:`_choose`)."""
        damp = damp if damp is not None else _PAPER_DAMP if self.percdamp is None else self.percdamp
        rows = []
        for n in order:
            Gs, counts, calib_s = self._statistics(n, calls[n] == 1, device, dtype, held_idx)
            if Gs[0] is None or counts[0] == 0:
                self.skipped[n] = (self.kinds[n], "no inputs seen on the calibration set")
                continue
            sel = self.selection if plan is None else plan[n]
            how = "magnitude" if method == "sparsegpt" and sel == "magnitude" else method
            row = self._prune_layer(n, Gs, counts, target, how, score, sel, damp)
            row["calib_seconds"] = calib_s
            rows.append(row)
        return rows

    def prune(self, sparsity: float | None = None, closure: Closure | None = None) -> dict:
        """Run the sequential procedure (package docstring) at ``sparsity`` (default: the
        constructor's); fills :attr:`report`. Returns ``{layer: kept fraction}``."""
        target = (
            self._default_target()
            if sparsity is None
            else self._check_target(sparsity, "prune(sparsity)")
        )
        if self.n_m is not None and abs(target - self.sparsity) > 1e-12:
            raise ValueError(
                f"OneShotPruner.prune: expected the sparsity of {self.n_m[0]}:{self.n_m[1]}, "
                f"{self.sparsity:.4g}, got {target}"
            )
        self._others = self._other_optimizers()
        device = _device(self.model)
        dtype = torch.float64 if device.type == "cpu" else torch.float32
        guarded = self.method == "sparsegpt" and self.selection == "auto"
        was_training = self.model.training
        self.model.eval()
        try:
            order, calls = self._order(device)
            for n in self.layers:
                if n not in order:
                    self.skipped[n] = (self.kinds[n], "not called by the forward")
            if not guarded:
                rows = self._pass(order, calls, set(), target, device, dtype, self.method)
            else:
                rows = self._guarded_pass(order, calls, target, device, dtype)
        finally:
            self.model.train(was_training)
        rows += [{"name": n, "kind": k, "skipped": why} for n, (k, why) in self.skipped.items()]
        self.report = rows
        self.rounds += 1
        self.history.append(
            {
                "step": self.steps,
                "round": self.rounds,
                "target": target,
                "sparsity": self.current_sparsity(),
                "kept": self.kept_fractions(),
                "changed": True,
            }
        )
        return self.kept_fractions()

    def _config(self) -> dict:
        return {
            "method": self.method,
            "n_m": None if self.n_m is None else list(self.n_m),
            "block_size": self.block_size,
            "percdamp": self.percdamp,
            "compensate": self.compensate,
            "selection": self.selection,
            # only where used: a state saved with row / block / Wanda / magnitude before the
            # guard existed still loads; an "auto" one (another procedure then) is refused
            **({} if self.distortion is None else {"distortion": self.distortion}),
        }

    def _extra_state(self) -> dict:
        return {"report": [dict(r) for r in self.report]}

    def _load_extra_state(self, state: dict) -> None:
        self.report = [dict(r) for r in state.get("report", [])]


@renamed_keywords
def one_shot(
    model: nn.Module,
    calibration: Iterable,
    method: str = "sparsegpt",
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    layers: Iterable[str] | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    block_size: int = 128,
    percdamp: float | None = None,
    compensate: bool = True,
    selection: str = "auto",
    distortion: str | None = None,
) -> list[dict]:
    """Prune ``model`` in place, one shot, from ``calibration`` (package docstring).

    Args:
        model: any ``nn.Module`` with ``nn.Linear`` / ``nn.Conv2d`` / HF ``Conv1D`` layers (or
            their sparse versions); they become ``SparseLinear`` / ``SparseConv2d`` /
            ``SparseConv1D`` with their masks set.
        calibration: an iterable of batches: tensors (``model(x)``), tuples/lists
            (``model(*b)``) or dicts (``model(**b)``).
        method: ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``.
        sparsity: pruned fraction in [0, 1]; default 0.5, or with ``n_m`` the pattern's
            ``1 - n/m`` (another value with ``n_m`` raises ``ValueError``).
        n_m: ``(n, m)``, e.g. ``(2, 4)``: N:M instead of unstructured.
        layers: names of the layers to prune; default every supported layer but the LM head and
            tied weights.
        optimizer: zero its state where pruned.
        block_size, percdamp, compensate, selection, distortion: SparseGPT's options (see
            :class:`OneShotPruner`).

    Returns:
        The per-layer report (package docstring); :func:`format_one_shot_report` prints it.
    """
    pruner = OneShotPruner(
        model,
        optimizer,
        calibration=calibration,
        method=method,
        sparsity=sparsity,
        n_m=n_m,
        layers=layers,
        block_size=block_size,
        percdamp=percdamp,
        compensate=compensate,
        selection=selection,
        distortion=distortion,
    )
    pruner.prune()
    return pruner.report


def format_one_shot_report(report: list[dict]) -> str:
    """The report as a markdown table (with a ``selection`` column where SparseGPT's
    ``selection="auto"`` chose: the layer's pick, and what the guard kept)."""
    auto = any("guard" in r for r in report)
    lines = [
        "| layer | kind | shape | density | rel. error | solver s | calib s |"
        + (" selection |" if auto else ""),
        "|---|---|---|---:|---:|---:|---:|" + ("---|" if auto else ""),
    ]
    for r in report:
        if "skipped" in r:
            lines.append(
                f"| {r['name']} | {r['kind']} | | | | | skipped: {r['skipped']} |"
                + (" |" if auto else "")
            )
            continue
        rows, cols = r["shape"]
        line = (
            f"| {r['name']} | {r['kind']} | {rows}x{cols} | {r['density']:.4f} | "
            f"{r['rel_error']:.4g} | {r['seconds']:.3f} | {r['calib_seconds']:.3f} |"
        )
        if auto:
            g = r.get("guard")
            if g is None:
                line += " |"
            else:
                figs = ", ".join(
                    f"{k} {g['auto'][k]:.4g} vs {g['magnitude'][k]:.4g}" for k in g["auto"]
                )
                pick = r["selection"]
                if g["distortion"] == "kl":
                    o = g["top1_only_flipped_by"]
                    figs += f"; top-1 flips by one only {o['auto']} vs {o['magnitude']}"
                line += (
                    f" {pick} (guard kept {g['kept']}, auto = {g['candidate']}: auto vs "
                    f"magnitude {figs}) |"
                )
        lines.append(line)
    return "\n".join(lines)
