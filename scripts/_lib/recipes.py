"""Training recipes of the MNIST experiments: which phases a method trains in, and its pruner.

A run is a list of :class:`Phase`; each phase trains ``epochs`` epochs with its own warm-up +
cosine learning-rate schedule and may start by pruning (``pruner.prune(...)``) and by a fresh
optimizer (retraining starts without the dense phase's momentum). Every method fits that loop:

* ``han``: dense, then ``rounds`` rounds of prune -> retrain at ``retrain_lr_factor`` x LR
  (Han et al.: 1/10 for LeNet);
* ``global``, ``nm``: dense for ``prune_at`` of the budget, prune once, fine-tune the rest at
  the retraining LR (as Han retrains);
* ``gradual``: one phase; the pruner prunes on its cubic schedule inside ``step()``;
* ``snip``, ``rigl``: one phase that starts by pruning (SNIP: scores on a batch; RigL: random
  masks at ERK densities), sparse from step 0;
* the mask-learning methods, one phase each, their pruners' paper defaults:
  ``scl`` (SCL: masks step(s) learned through the STE, the target reached on a cubic ramp over the
  first 3/4 of the steps, then fixed), ``nmdecay`` (N:M pruning-mask decay: pruned weights scaled
  by a factor falling 1 -> 0 in 10 steps over the first 3/4), ``nmstruct`` (N:M sparse-structure
  decay: N halved stage by stage, M:M -> M/2:M -> ... -> N:M, over the first 3/4), ``gibbs``
  (masks sampled from a Gibbs distribution, temperature annealed 1 -> 1e-3 over the first 3/4,
  then the T = 0 mask fixed), ``earlycrop`` (dense until the epoch-to-epoch weight change
  settles, at the latest at ``crop_max_epoch`` of the budget, then |theta H g| pruning and sparse
  training) start dense; ``srste`` (SR-STE, N:M from step 0, mask recomputed every step, lambda
  2e-4) and ``gap`` (every layer at the target, one group of layers dense at a time for
  ``gap_interval`` of the budget, cyclically, over the first 3/4) start by pruning.

The N:M family (:data:`NM_METHODS`) is 1:M with M = round(1 / (1 - sparsity)), or ``nm=(N, M)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from sparsekern.pruning import (
    BasePruner,
    EarlyCROPPruner,
    GaPPruner,
    GibbsPruner,
    GlobalMagnitudePruner,
    GradualPruner,
    HanPruner,
    NMDecayPruner,
    NMPruner,
    RigLPruner,
    SCLPruner,
    SNIPPruner,
    SRSTEPruner,
)

__all__ = [
    "METHODS",
    "NM_METHODS",
    "Phase",
    "add_method_arguments",
    "build_pruner",
    "check_method_arguments",
    "nm_for_sparsity",
    "plan_phases",
    "pruner_options",
]

METHODS = ("han", "global", "gradual", "snip", "rigl", "nm")
METHODS += ("nmdecay", "nmstruct", "srste", "scl", "gap", "gibbs", "earlycrop")
NM_METHODS = ("nm", "nmdecay", "nmstruct", "srste")  # N:M patterns: 1:M for a sparsity, or --nm
STARTS_PRUNED = ("snip", "rigl", "srste", "gap")  # their single phase starts by pruning


@dataclass
class Phase:
    """One stretch of training.

    Attributes:
        name: ``"dense"``, ``"round 1"``, ``"sparse"``, ``"finetune"``.
        epochs: epochs it trains (0: a prune-only phase).
        lr: peak learning rate of its warm-up + cosine schedule.
        warmup: warm-up steps.
        prune: prune at its start.
        fresh_optimizer: a new optimizer at its start (after pruning).
    """

    name: str
    epochs: int
    lr: float
    warmup: int = 0
    prune: bool = False
    fresh_optimizer: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def plan_phases(
    method: str,
    *,
    lr: float,
    steps_per_epoch: int,
    epochs: int = 0,
    warmup_epochs: float = 1.0,
    rounds: int = 0,
    retrain_epochs: int = 0,
    retrain_lr_factor: float = 0.1,
    total_epochs: int = 0,
    prune_at: float = 0.6,
) -> list[Phase]:
    """The phases of ``method`` (see the module docstring).

    Args:
        method: one of :data:`METHODS`.
        lr: peak learning rate of dense (or sparse-from-the-start) training.
        steps_per_epoch: optimizer steps per epoch.
        epochs, warmup_epochs, rounds, retrain_epochs: Han's dense epochs, its warm-up (epochs),
            its rounds and retraining epochs per round.
        retrain_lr_factor: the retraining / fine-tuning LR as a fraction of ``lr``.
        total_epochs: the budget of the other methods.
        prune_at: global / nm: the fraction of ``total_epochs`` trained dense (rounded to epochs).
    """
    if method not in METHODS:
        raise ValueError(f"plan_phases: expected a method in {METHODS}, got {method!r}")
    lr_re = lr * retrain_lr_factor
    if method == "han":
        warm = round(warmup_epochs * steps_per_epoch)
        return [Phase("dense", epochs, lr, warm)] + [
            Phase(f"round {r}", retrain_epochs, lr_re, prune=True, fresh_optimizer=True)
            for r in range(1, rounds + 1)
        ]
    # min(1 epoch, 1/10 of the budget): LeNet-300-100 1 of 6 epochs, LeNet-5 0.2 of 2
    warm = min(steps_per_epoch, total_epochs * steps_per_epoch // 10)
    if method in ("global", "nm"):
        dense = round(prune_at * total_epochs)
        return [
            Phase("dense", dense, lr, warm),
            Phase("finetune", total_epochs - dense, lr_re, prune=True, fresh_optimizer=True),
        ]
    return [Phase("sparse", total_epochs, lr, warm, prune=method in STARTS_PRUNED)]


def nm_for_sparsity(sparsity: float) -> tuple[int, int]:
    """The 1:M pattern closest to ``sparsity``: ``(1, round(1 / (1 - sparsity)))`` (0.9 -> 1:10,
    0.95 -> 1:20, 0.98 -> 1:50)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"nm_for_sparsity: expected a sparsity in [0, 1), got {sparsity}")
    return 1, max(1, round(1.0 / (1.0 - sparsity)))


def build_pruner(
    method: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    regularization: str = "l2",
    reg_strength: float = 5e-4,
    min_density: float = 0.0,
    dropout_feeds: dict[str, str] | None = None,
    gradual_scope: str = "layer",
    gradual_start: float = 0.1,
    gradual_end: float = 0.6,
    gradual_freq: int = 100,
    rigl_delta: int = 100,
    rigl_alpha: float = 0.3,
    rigl_end: float = 0.75,
    rigl_dist: str = "erk",
    srste_decay: float = 2e-4,
    gap_interval: float = 0.05,
    crop_max_epoch: int | None = None,
    seed: int = 0,
) -> BasePruner:
    """The pruner of ``method`` for a run of ``total_steps`` optimizer steps. Every pruner gets
    the same regulariser (Han: L2 at Caffe's 5e-4 on the weights), so the methods differ only in
    how they choose masks.

    Han's pruner is built without a target: the run passes each round's (a sensitivity analysis
    may choose it after dense training). Gradual prunes from ``gradual_start`` to
    ``gradual_end`` of the steps every ``gradual_freq`` steps (both ends rounded to a multiple
    of it); RigL updates every ``rigl_delta`` steps until ``rigl_end`` of them, its random masks
    drawn from a generator seeded with ``seed``.

    The mask-learning pruners run on their defaults (their papers'; the schedules over the first
    3/4 of ``total_steps``, then fixed masks): SR-STE's lambda is ``srste_decay``; GaP's groups
    (the paper's k = 4, LeNet-300-100's 3 layers make 3) each stay dense ``gap_interval`` of the
    steps; Early-CROP prunes at the end of epoch ``crop_max_epoch`` at the latest; Gibbs's samples
    come from a generator seeded with ``seed``.
    """
    common = dict(regularization=regularization, reg_strength=reg_strength)
    if method == "han":
        return HanPruner(model, optimizer, dropout_feeds=dropout_feeds, **common)
    if method in NM_METHODS:
        n, m = nm if nm is not None else nm_for_sparsity(sparsity)
        if method == "nm":
            return NMPruner(model, optimizer, n_m=(n, m), **common)
        if method == "srste":
            return SRSTEPruner(model, optimizer, n_m=(n, m), decay=srste_decay, **common)
        recipe = "mask" if method == "nmdecay" else "structure"
        return NMDecayPruner(
            model, optimizer, n_m=(n, m), recipe=recipe, total_steps=total_steps, **common
        )
    if sparsity is None:
        raise ValueError(f"build_pruner: method {method!r} needs a sparsity, got None")
    if method == "global":
        return GlobalMagnitudePruner(
            model, optimizer, sparsity=sparsity, min_density=min_density, **common
        )
    if method == "snip":
        return SNIPPruner(model, optimizer, sparsity=sparsity, **common)
    if method == "rigl":
        return RigLPruner(
            model, optimizer, sparsity=sparsity, total_steps=total_steps, delta=rigl_delta,
            alpha=rigl_alpha, t_end=int(rigl_end * total_steps), distribution=rigl_dist,
            generator=torch.Generator().manual_seed(seed), **common,
        )  # fmt: skip
    if method == "gradual":
        dt = gradual_freq
        begin = round(gradual_start * total_steps / dt) * dt
        end = begin + max(1, round((gradual_end * total_steps - begin) / dt)) * dt
        return GradualPruner(
            model, optimizer, sparsity=sparsity, begin_step=begin, end_step=end, frequency=dt,
            scope=gradual_scope, min_density=min_density if gradual_scope == "global" else 0.0,
            **common,
        )  # fmt: skip
    if method == "scl":
        return SCLPruner(model, optimizer, sparsity=sparsity, total_steps=total_steps, **common)
    if method == "gap":
        interval = max(1, round(gap_interval * total_steps))
        return GaPPruner(
            model, optimizer, sparsity=sparsity, interval=interval, total_steps=total_steps,
            **common,
        )  # fmt: skip
    if method == "gibbs":
        gen = torch.Generator().manual_seed(seed)
        return GibbsPruner(
            model, optimizer, sparsity=sparsity, total_steps=total_steps, generator=gen, **common
        )
    if method == "earlycrop":
        return EarlyCROPPruner(model, optimizer, sparsity=sparsity, max_epoch=crop_max_epoch,
                               **common)  # fmt: skip
    raise ValueError(f"build_pruner: expected a method in {METHODS}, got {method!r}")


def add_method_arguments(parser) -> None:
    """The command-line knobs of the methods other than Han's, validated by argparse (see
    :func:`build_pruner` for what each does); :func:`check_method_arguments` checks how they
    combine, :func:`pruner_options` turns them into ``build_pruner``'s keywords."""
    from scripts._lib import checks as cli

    frac, pos = cli.fraction(), cli.number(int, 1)
    a = parser.add_argument
    a("--prune-at", type=frac, default=0.6, help="global / nm: fraction of the budget dense")
    a("--min-density", type=frac, default=0.01, help="global: minimum kept fraction per layer")
    a("--gradual-scope", choices=["layer", "global"], default="layer")
    a("--gradual-start", type=frac, default=0.1, help="gradual: first pruning step / budget")
    a("--gradual-end", type=frac, default=0.6, help="gradual: last pruning step / budget")
    a("--gradual-freq", type=pos, default=100, help="gradual: steps between prunings")
    a("--snip-batches", type=pos, default=1, help="snip: batches scored")
    a("--rigl-delta", type=pos, default=100, help="rigl: steps between mask updates")
    a("--rigl-alpha", type=frac, default=0.3, help="rigl: initial drop fraction")
    a("--rigl-end", type=cli.fraction(lo_open=True), default=0.75, help="rigl: T_end / steps")
    a("--rigl-dist", choices=["erk", "uniform"], default="erk")
    a("--nm", type=cli.nm_pattern,
      help="nm, nmdecay, nmstruct, srste: 'N:M' instead of --sparsity (default 1:round(1 / (1 - "
           "sparsity)))")  # fmt: skip
    a("--srste-decay", type=cli.number(float, 0), default=2e-4, help="srste: lambda (paper 2e-4)")
    a("--gap-interval", type=cli.fraction(lo_open=True), default=0.05,
      help="gap: steps each group stays dense / budget (40 epochs: 2 epochs)")  # fmt: skip
    a("--crop-max-epoch", type=cli.fraction(lo_open=True), default=0.5,
      help="earlycrop: prune at this fraction of the budget's epochs at the latest")  # fmt: skip


def check_method_arguments(parser, args) -> None:
    """``parser.error`` (exit 2, before any work) for knobs that contradict each other."""
    nm_family = args.method in NM_METHODS
    if nm_family and args.sparsity is None and args.nm is None:
        parser.error(f"--method {args.method} needs --sparsity or --nm")
    if args.method not in ("han", *NM_METHODS) and args.sparsity is None:
        parser.error(f"--method {args.method} needs --sparsity")
    if args.nm is not None and not nm_family:
        parser.error(f"--nm: expected --method in {NM_METHODS}, got {args.method}")
    if nm_family and args.method != "nm" and args.nm is not None and args.sparsity is not None:
        parser.error(f"--nm {args.nm[0]}:{args.nm[1]}, --sparsity: expected one of them")
    if nm_family and args.nm is None and args.sparsity > 0.99:
        parser.error(f"--sparsity: expected <= 0.99 for {args.method} (1:100), got {args.sparsity}")

    if args.gradual_start >= args.gradual_end:
        parser.error(
            f"--gradual-start: expected < --gradual-end ({args.gradual_end}), got "
            f"{args.gradual_start}"
        )
    if args.method == "global" and args.min_density > 1 - args.sparsity:
        parser.error(
            f"--min-density: expected <= 1 - sparsity = {1 - args.sparsity:.4g}, got "
            f"{args.min_density}"
        )


def pruner_options(args) -> dict:
    """``build_pruner``'s keywords from the parsed command line."""
    keys = ("min_density", "gradual_scope", "gradual_start", "gradual_end", "gradual_freq",
            "rigl_delta", "rigl_alpha", "rigl_end", "rigl_dist", "nm", "srste_decay",
            "gap_interval", "seed")  # fmt: skip
    out = {k: getattr(args, k) for k in keys}
    out["crop_max_epoch"] = crop_latest_epoch(args.crop_max_epoch, args.total_epochs)
    return out


def crop_latest_epoch(fraction: float, total_epochs: int | None) -> int | None:
    """Early-CROP's latest pruning epoch: ``max(1, round(fraction * total_epochs))`` (40 epochs,
    0.5: epoch 20; 2 epochs: epoch 1), so the sparse net trains at least the rest (a 1-epoch
    budget prunes at its end: nothing is saved)."""
    return None if not total_epochs else max(1, round(fraction * total_epochs))
