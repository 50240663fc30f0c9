"""Han et al.'s figures for the LeNet runs (PNG, matplotlib): Fig 4 (LeNet-300-100's fc1
sparsity pattern), Fig 5 (accuracy vs parameters pruned: L1 / L2, with and without retraining,
iterative), Fig 6 (per-layer sensitivity), Fig 7 (weight histograms before / after); and
:func:`save_figure`, which every figure of scripts/ is written through (atomically). matplotlib is
imported only when a figure is drawn."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path

import torch

from sparsekern.formats._files import atomic_write
from sparsekern.training.loops import evaluate, train_epoch
from sparsekern.training.lr import WarmupCosine

__all__ = [
    "fig5_curves",
    "han_figures",
    "plot_fig4",
    "plot_fig5",
    "plot_fig6",
    "plot_fig7",
    "save_figure",
]


def save_figure(fig, path, **savefig_kwargs) -> Path:
    """``fig.savefig(path, **savefig_kwargs)``, atomically: the image is rendered in memory, then
    written by ``atomic_write`` (a temporary file in ``path``'s folder, then ``os.replace``), so a
    reader sees the old figure or the new one, never a part; on failure the temporary file is
    removed and the error names ``path``. The format is ``format=`` if given, else ``path``'s
    suffix (as ``savefig`` picks it). The figure stays open. Returns ``path``."""
    path = Path(path)
    fmt = savefig_kwargs.pop("format", None) or path.suffix[1:]
    if not fmt:
        raise ValueError(
            f"save_figure: expected a path with an image suffix (.png, .pdf, ...) or format=, "
            f"got {str(path)!r}"
        )
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, **savefig_kwargs)
    atomic_write(path, buf.getvalue())
    return path


def plot_fig4(mask: torch.Tensor, path) -> str:
    """Fig 4: fc1's mask ``[300, 784]`` as an image (black = kept), and kept inputs per pixel:
    the centre of the image keeps its connections (Han: 28 bands of width 28). Each ``plot_*``
    returns the file's name."""
    import matplotlib.pyplot as plt

    mask = mask.cpu()
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [3.2, 1]})
    a.imshow(~mask, cmap="gray", aspect="auto", interpolation="nearest")
    a.set_xlabel("input (pixel index, 28 bands of 28)")
    a.set_ylabel("fc1 output neuron")
    a.set_title(f"LeNet-300-100 fc1 sparsity pattern: {100 * mask.float().mean():.1f}% kept")
    im = b.imshow(mask.float().mean(0).view(28, 28) * 100, cmap="viridis")
    b.set_title("kept % per input pixel")
    b.axis("off")
    fig.colorbar(im, ax=b, fraction=0.046)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return Path(path).name


def plot_fig6(sens: dict, path, title: str, n_images: int) -> str:
    """Fig 6: accuracy vs parameters pruned away, one layer pruned at a time. ``sens``:
    ``{"baseline", "accuracy": {layer: [...]}, "kept": {layer: [...]}}``."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for layer, acc in sens["accuracy"].items():
        pruned = [100 * (1 - k) for k in sens["kept"][layer]]
        ax.plot(pruned, acc, marker="o", ms=3, label=layer)
    ax.axhline(sens["baseline"], color="gray", ls=":", lw=1, label="unpruned")
    ax.set_xlabel("parameters pruned away (%)")
    ax.set_ylabel(f"accuracy (%) on {n_images:,} training images, no retraining")
    ax.set_ylim(max(0, sens["baseline"] - 20), 100.2)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return Path(path).name


def plot_fig7(before: dict, after: dict, path, title: str) -> str:
    """Fig 7: histogram of the FC weights before pruning and of the survivors after retraining
    (Han: unimodal before; bimodal and wider after)."""
    import matplotlib.pyplot as plt

    w0 = torch.cat([before[k].flatten() for k in before])
    w1 = torch.cat([after[k].flatten() for k in after])
    w1 = w1[w1 != 0]
    # x range: 1.5 x the 99th percentile of the survivors' |w|; the few large weights of the
    # small last layer (|w| up to 0.8 in LeNet-300-100's fc3) would squash both plots
    lim = 1.5 * float(w1.abs().quantile(0.99))
    bins = torch.linspace(-lim, lim, 201).numpy()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    a.hist(w0.numpy(), bins=bins, color="tab:blue")
    a.set_title(f"before pruning: {len(w0):,} weights")
    b.hist(w1.numpy(), bins=bins, color="tab:red")
    b.set_title(f"after pruning + retraining: {len(w1):,} weights")
    for ax in (a, b):
        ax.set_xlabel("weight value")
        ax.set_ylabel("count")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return Path(path).name


def plot_fig5(fig5: dict, path, title: str) -> str:
    """Fig 5: accuracy change vs parameters pruned away, one curve per regulariser and retraining
    choice (``fig5``: :func:`fig5_curves`'s output; each curve's label starts with its
    regulariser, whose dense error is that curve's zero line)."""
    import matplotlib.pyplot as plt

    curves, base_error = fig5["curves"], fig5["base_error"]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for name, pts in curves.items():
        reg = name.split()[0].lower()
        xs = [100 * p["pruned"] for p in pts]
        ys = [base_error[reg] - p["error"] for p in pts]  # accuracy change in points
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.axhline(0, color="gray", lw=1)
    ax.set_xlabel("parameters pruned away (%)")
    ax.set_ylabel("accuracy change (points, test set)")
    ax.set_ylim(-4.5, 0.5)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return Path(path).name


FIG5_FRACTIONS = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97]


def fig5_curves(
    make_model: Callable[[], torch.nn.Module],
    make_optimizer: Callable[[torch.nn.Module, float], torch.optim.Optimizer],
    dense: dict,
    train_loader,
    test_loader,
    *,
    lr: float,
    epochs: int,
    warmup: int,
    retrain_lr: float,
    retrain_epochs: int,
    regs: dict[str, float],
    seed: int,
    iterative: list[dict],
    progress=None,
) -> dict:
    """Fig 5's curves: for a dense net trained with L2 and one trained with L1, prune every layer
    to the same kept fraction (Han's rule, one shot); test error without retraining and after
    ``retrain_epochs`` of retraining (same regulariser, ``retrain_lr``); plus the iterative run.

    Args:
        make_model: a fresh sparse model. make_optimizer: ``(model, lr) -> optimizer``.
        dense: ``{reg: state dict}`` of dense nets already trained (the main run's); the other
            regulariser's dense net is trained here (``epochs``, ``lr``, ``warmup``).
        train_loader, test_loader: MNIST loaders (the train loader's generator is reseeded).
        regs: ``{"l2": strength, "l1": strength}``.
        iterative: the main run's rounds, ``[{"pruned", "error"}]``.

    Returns:
        ``{"curves": {label: [{"pruned", "error"}]}, "base_error": {reg: %}, "fractions"}``.
    """
    from sparsekern.pruning import HanPruner

    spe = len(train_loader)
    curves, base = {}, {}
    for reg in ("l2", "l1"):
        torch.manual_seed(seed)
        train_loader.sampler.sampler.generator.manual_seed(seed)
        model = make_model()
        if reg in dense:
            model.load_state_dict(dense[reg])
        else:
            opt = make_optimizer(model, lr)
            pr = HanPruner(model, opt, regularization=reg, reg_strength=regs[reg])
            sched = WarmupCosine(lr, epochs * spe, warmup)
            for e in range(epochs):
                if progress is not None:
                    progress.describe(f"fig5 dense {reg} {e + 1}/{epochs}")
                train_epoch(model, train_loader, opt, pr, lr=sched, step0=e * spe,
                            progress=progress)  # fmt: skip
        base[reg] = evaluate(model, test_loader)["top1_error"]
        no, yes = [], []
        for f in FIG5_FRACTIONS:
            m = copy.deepcopy(model)
            opt = make_optimizer(m, retrain_lr)
            pr = HanPruner(m, opt, regularization=reg, reg_strength=regs[reg])
            pr.prune(f)
            no.append({"pruned": f, "error": evaluate(m, test_loader)["top1_error"]})
            sched = WarmupCosine(retrain_lr, retrain_epochs * spe)
            for e in range(retrain_epochs):
                if progress is not None:
                    progress.describe(f"fig5 {reg} pruned {100 * f:.0f}% retrain {e + 1}")
                train_epoch(m, train_loader, opt, pr, lr=sched, step0=e * spe,
                            progress=progress)  # fmt: skip
            yes.append({"pruned": f, "error": evaluate(m, test_loader)["top1_error"]})
        curves[f"{reg.upper()} regularization w/o retrain"] = no
        curves[f"{reg.upper()} regularization w/ retrain"] = yes
    curves["L2 iterative prune and retrain (main run)"] = list(iterative)
    return {"curves": curves, "base_error": base, "fractions": FIG5_FRACTIONS}


def han_figures(model, dense_state: dict, sens: dict | None, out, network: str, n_sens: int):
    """The cheap figures of a Han run, into folder ``out``: Fig 4 (a model with LeNet-300-100's
    784-input ``fc1``), Fig 6 (when a sensitivity analysis ``sens`` ran, on ``n_sens`` images)
    and Fig 7 (the FC layers, ``dense_state`` against the model now). Returns the file names."""
    out = Path(out)
    names = []
    fc1 = getattr(model, "fc1", None)
    if fc1 is not None and fc1.weight.shape[1] == 784:
        names.append(plot_fig4(fc1.mask, out / "fig4_fc1_sparsity.png"))
    if sens:
        title = f"{network}: sensitivity of each layer to pruning"
        names.append(plot_fig6(sens, out / "fig6_sensitivity.png", title, n_sens))
    fc = [n for n, m in model.named_modules() if hasattr(m, "mask") and m.weight.dim() == 2]
    before = {n: dense_state[f"{n}.weight"] for n in fc}
    after = {n: model.get_submodule(n).weight.detach() for n in fc}
    names.append(plot_fig7(before, after, out / "fig7_weight_hist.png", f"{network}: FC weights"))
    return names
