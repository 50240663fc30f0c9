"""Hessian spectral-radius neuron importance (after Ebrahimi and Klabjan 2021, "Neuron-based
pruning of deep neural networks with better generalization using Kronecker factored curvature
approximation", arXiv 2111.08577): train and prune at once, from a randomly initialised net,
choosing the neurons to remove so that the spectral radius of the loss Hessian (its sharpness)
goes down, which steers training to flatter minima.

Spectral radius. ``rho = max |eig(H)|`` of the Hessian of the loss over the weights and biases of
the layers the channel graph touches, by power iteration on Hessian-vector products (double
backward, exact; the paper approximates ``H`` with Kronecker factors, K-FAC, to scale: on the
small nets here the exact product is affordable and has no approximation to argue about).
Masked weights (sparsekern layers) are out of the problem: the iteration runs on
``M H M`` (``v`` is projected on the kept weights each step).

Neuron score (our choice; the paper's selection rule solves a constrained problem we did not
have the text of). With ``v`` the top eigenvector (``||v|| = 1``), ``m_c = sum v_i^2`` over the
weights of channel ``c`` (its producers' rows and biases, its consumers' input columns) is the
share of the sharpest direction carried by that neuron. Removing neuron ``c`` restricts ``H`` to
the other coordinates; the Rayleigh quotient of ``v`` with ``c``'s coordinates cut is
``(rho - 2 rho m_c + v_c^T H_cc v_c) / (1 - m_c)``, i.e. ``rho`` falls by about ``rho * m_c``
for small ``m_c``: the neurons with the largest mass are the ones whose removal flattens most.
The importance (higher = kept) is ``1 - m_c``, so pruning removes the high-mass neurons first.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparsekern.pruning._dependency import ChannelGraph, plain_copy

__all__ = ["hessian_channel_scores", "hessian_spectral_radius"]


def _hvp_fn(model: nn.Module, params: list[torch.Tensor], data: list, loss_fn: Callable):
    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [torch.zeros_like(p) for p in params]
        for x, y in data:
            # the fused attention kernels have no double backward: the math one has
            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                loss = loss_fn(model(*(x if isinstance(x, tuple) else (x,))), y)
                g = torch.autograd.grad(loss, params, create_graph=True)
                gv = sum((gi * vi).sum() for gi, vi in zip(g, v))
                hv = torch.autograd.grad(gv, params, allow_unused=True)
            for o, h in zip(out, hv):
                if h is not None:
                    o.add_(h.detach())
        return [o / len(data) for o in out]

    return hvp


def hessian_spectral_radius(
    model: nn.Module,
    params: list[torch.Tensor],
    data: Iterable,
    loss_fn: Callable,
    *,
    iters: int = 50,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    masks: list[torch.Tensor | None] | None = None,
) -> tuple[float, list[torch.Tensor]]:
    """``(rho, v)``: the largest-magnitude eigenvalue of the Hessian of the mean of
    ``loss_fn(model(x), y)`` over ``data`` with respect to ``params``, and its unit eigenvector
    (one tensor per parameter), by power iteration (stops when rho changes by less than
    ``tol * |rho|``) from a random start drawn from ``generator`` (None: the global RNG).
    ``masks``: per parameter, the kept entries (``M H M``). The returned
    ``rho`` is signed: ``|rho|`` is the spectral radius."""
    data = list(data)
    if not data:
        raise ValueError("hessian_spectral_radius: expected batches of (inputs, targets), got none")
    if iters < 1:
        raise ValueError(f"hessian_spectral_radius: expected iters >= 1, got {iters}")
    masks = masks or [None] * len(params)
    v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]

    def project(vs):
        vs = [vi * m if m is not None else vi for vi, m in zip(vs, masks)]
        n = math.sqrt(sum(float((vi.double() ** 2).sum()) for vi in vs))
        if n == 0 or not math.isfinite(n):
            raise ValueError(f"hessian_spectral_radius: expected a finite nonzero vector, got {n}")
        return [vi / n for vi in vs]

    hvp = _hvp_fn(model, params, data, loss_fn)
    v = project(v)
    rho = 0.0
    for _ in range(iters):
        hv = hvp(v)
        hv = [h * m if m is not None else h for h, m in zip(hv, masks)]
        new = sum(float((a.double() * b.double()).sum()) for a, b in zip(v, hv))
        if all(float(h.abs().max()) == 0 for h in hv):
            return 0.0, v  # flat in every kept direction
        v = project(hv)
        done = abs(new - rho) <= tol * abs(new)
        rho = new
        if done:
            break
    # a negative dominant eigenvalue makes v flip each step: rho is v . Hv, signed
    return rho, v


def _plain(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy with sparsekern layers as plain ones (``weight * mask``: double backward through
    vendor ops) and the masks by parameter name."""
    new = copy.deepcopy(model)
    masks = {}
    for name, m in list(new.named_modules()):
        if getattr(m, "mask", None) is not None:
            masks[f"{name}.weight" if name else "weight"] = m.mask.detach().clone()
            parent_name, _, attr = name.rpartition(".")
            parent = new.get_submodule(parent_name) if parent_name else new
            setattr(parent, attr, plain_copy(m))
    return new, masks


def hessian_channel_scores(
    model: nn.Module,
    cg: ChannelGraph,
    data: Iterable,
    loss_fn: Callable,
    *,
    iters: int = 50,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> tuple[dict[int, float], float]:
    """``({class: 1 - m_c}, rho)`` (see the module docstring), in eval mode (BatchNorm
    statistics fixed); ``model`` is not changed."""
    plain, masks = _plain(model)
    plain.eval()
    mods = dict(plain.named_modules())
    names = list(dict.fromkeys(cg.producers + cg.consumers + cg.depthwise))
    keys, params = [], []
    for n in names:
        for attr in ("weight", "bias"):
            p = getattr(mods[n], attr, None)
            if p is not None:
                keys.append((n, attr))
                params.append(p)
    rho, v = hessian_spectral_radius(
        plain, params, data, loss_fn, iters=iters, tol=tol, generator=generator,
        masks=[masks.get(f"{n}.{a}") for n, a in keys],
    )  # fmt: skip
    vec = {k: t.double() ** 2 for k, t in zip(keys, v)}
    wanted = {r for g in cg.groups for r in g.classes}
    mass: dict[int, float] = {}

    def add(ids: torch.Tensor, per_id: torch.Tensor) -> None:
        roots = cg.roots(ids).tolist()
        for r, val in zip(roots, per_id.tolist()):
            if r in wanted:
                mass[r] = mass.get(r, 0.0) + val

    for n in names:
        w2 = vec[(n, "weight")]
        ids_out = cg.out_ids.get(n, cg.in_ids.get(n) if n in cg.depthwise else None)
        if ids_out is not None:  # rows (and biases) of producers and depthwise convs
            rows = w2.flatten(1).sum(1)
            if (n, "bias") in vec:
                rows = rows + vec[(n, "bias")]
            add(ids_out, rows)
        if n in cg.consumers and n in cg.in_ids:  # input columns of consumers
            cols = w2.transpose(0, 1).flatten(1).sum(1)
            add(cg.in_ids[n], cols)
    return {r: 1.0 - mass.get(r, 0.0) for r in wanted}, rho
