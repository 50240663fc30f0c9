"""Independent re-computation of SparseGPT ``selection="auto"``'s figures through the public API
(shared by the one-shot tests): a plan replayed layer by layer, the folds, the guard's pooled
figures."""

import copy

import pytest
import torch
import torch.nn.functional as F

from sparsekern.pruning import one_shot


def folds(n: int) -> list[list[int]]:
    k = max(1, min(4, n))
    return [list(range(f, n, k)) for f in range(k)]


def replay(dense, batches, plan: dict, damp: float, sparsity: float, n_m=None):
    """``dense`` pruned with ``plan`` (``{layer: "row" | "block" | "magnitude"}``, forward order)
    one layer at a time from ``batches``: sequential pruning is layer by layer (the later
    layer's statistics come from the pruned earlier ones)."""
    m = copy.deepcopy(dense)
    kw = {"n_m": n_m} if n_m is not None else {"sparsity": sparsity}
    for name, sel in plan.items():
        if sel == "magnitude":
            one_shot(m, batches, "magnitude", layers=[name], **kw)
        else:
            one_shot(m, batches, selection=sel, percdamp=damp, layers=[name], **kw)
    return m


@torch.no_grad()
def distortion(dense, model, held: list) -> tuple[float, torch.Tensor, int]:
    """Summed ``KL(p_dense || p)`` over the rows of ``held``, the rows' top-1 flips, rows."""
    x = torch.cat(held)
    ref = F.log_softmax(dense.eval()(x), -1)
    logp = F.log_softmax(model.eval()(x), -1)
    kl = float((ref.exp() * (ref - logp)).sum(-1).sum())
    return kl, logp.argmax(-1) != ref.argmax(-1), len(x)


def guard_figures(dense, cal: list, plan: dict, damp: float, sparsity: float):
    """The guard's figures: the plan solved without each guard fold and measured on it, the
    all-magnitude model on the same rows: ``(auto {"kl", "top1"}, magnitude {...}, b, c)``."""
    mag = copy.deepcopy(dense)
    one_shot(mag, cal, "magnitude", sparsity)
    kl_a = kl_m = 0.0
    fa, fm, rows = [], [], 0
    for f in folds(len(cal))[:-1]:
        m = replay(dense, [c for i, c in enumerate(cal) if i not in f], plan, damp, sparsity)
        held = [cal[i] for i in f]
        ka, flips_a, n = distortion(dense, m, held)
        km, flips_m, _ = distortion(dense, mag, held)
        kl_a, kl_m, rows = kl_a + ka, kl_m + km, rows + n
        fa.append(flips_a)
        fm.append(flips_m)
    fa, fm = torch.cat(fa), torch.cat(fm)
    b, c = int((fm & ~fa).sum()), int((fa & ~fm).sum())
    auto = {"kl": kl_a / rows, "top1": float(fa.float().mean())}
    magnitude = {"kl": kl_m / rows, "top1": float(fm.float().mean())}
    return auto, magnitude, b, c


def check_guard(guard: dict, dense, cal: list, plan: dict, damp: float, sparsity: float) -> bool:
    """Assert the report's guard figures are the independently re-computed ones
    (:func:`guard_figures`); returns whether the plan should win (KL no higher, and
    ``b - c >= 2 sqrt(b + c)`` with ``b > c``)."""
    auto, magnitude, b, c = guard_figures(dense, cal, plan, damp, sparsity)
    for k in ("kl", "top1"):
        assert guard["auto"][k] == pytest.approx(auto[k], rel=1e-4), k
        assert guard["magnitude"][k] == pytest.approx(magnitude[k], rel=1e-4), k
    assert guard["top1_only_flipped_by"] == {"magnitude": b, "auto": c}
    return auto["kl"] <= magnitude["kl"] and b > c and b - c >= 2 * (b + c) ** 0.5
