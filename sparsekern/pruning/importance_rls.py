"""RLS channel importance (Yu, Zhang, Wang, Ma, Song 2022, "Recursive least squares for training
and pruning convolutional neural networks", arXiv 2201.04813): each layer keeps the inverse of
its input autocorrelation matrix, ``P = R^{-1}``, by recursive least squares; ``P`` and the
layer's weights together score the layer's *input* channels (nodes), the unimportant ones are
removed, training goes on, and the next pruning waits until the net has recovered the
performance it had before (:class:`RecoveryGate`).

The recursion. A consumer layer (conv, Linear) reads rows ``x`` of dimension ``d`` (a Linear:
its input features; a conv: the ``C_in * kh * kw`` im2col patch of each output position, channel
major like ``weight.flatten(1)``). With forgetting factor ``lam`` and ``R_0 = delta * I``:

    R_t = lam * R_{t-1} + X_t^T X_t            (X_t: the [k, d] rows of batch t)
    P_t = R_t^{-1} = (1/lam) (P - P X^T (lam I_k + X P X^T)^{-1} X P)      (block Woodbury)

Sherman-Morrison is the ``k = 1`` case. When a batch has ``k >= d`` rows (a conv: batch times
output positions) Woodbury's ``k x k`` solve costs more than inverting ``R_t`` (``d x d``), so
that path inverts ``lam * P^{-1} + X^T X`` instead: the same ``P_t`` (float64 throughout).
Forgetting is applied once per batch (rows of one batch weigh equally): the paper's RLS works
per sample; per batch is what a minibatch trainer sees, and equals it for ``lam = 1``.

The score. ``P`` is the inverse Gram matrix of the layer's least-squares problem
``min_W' sum_t ||W x_t - W' x_t||^2`` (the layer reproduces its own outputs): removing the input
columns ``S`` of one channel and re-solving for the other weights increases that error by

    E(S) = tr(W_S (P_SS)^{-1} W_S^T)        (W_S: the [C_out, |S|] columns reading channel S)

(the optimal-brain-surgeon formula with ``H = 2R``; for one column ``||w_c||^2 / P_cc``). A
channel read by several consumers (a flatten into a Linear, a residual stream) sums ``E`` over
them; higher = kept. This is the "inverse autocorrelation combined with the weights" of the
abstract made exact for the layer's own least-squares error; the paper's own formula was not
available to us, and its weights are trained by RLS, here by any optimizer (the pruning rule is
what this package offers; the RLS optimizer is not implemented).

Defaults: ``lam = 1.0`` (no forgetting: scores from the calibration batches at pruning time,
the paper's value was not found), ``delta = 1e-3`` (``R_0``: a ridge that keeps ``P`` finite for
never-active inputs, e.g. dead ReLUs; negligible against ``X^T X`` of a few batches).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.pruning._dependency import ChannelGraph, dense_weight, is_conv, is_linear

__all__ = [
    "InputAutocorrelation",
    "RecoveryGate",
    "removal_error",
    "rls_channel_scores",
    "rls_scores_from_data",
    "rls_update",
]


def rls_update(p: torch.Tensor, x: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """One RLS step: ``P' = (lam * P^{-1} + x^T x)^{-1}`` for ``P`` ``[d, d]`` (symmetric
    positive definite) and rows ``x`` ``[k, d]``; float64. Woodbury for ``k < d``, else the
    direct inverse of the updated autocorrelation (same result, cheaper)."""
    if p.dim() != 2 or p.shape[0] != p.shape[1] or x.dim() != 2 or x.shape[1] != p.shape[0]:
        raise ValueError(
            f"rls_update: expected P [d, d] and x [k, d], got {tuple(p.shape)}, {tuple(x.shape)}"
        )
    if not (0 < lam <= 1):
        raise ValueError(f"rls_update: expected a forgetting factor in (0, 1], got {lam}")
    p, x = p.double(), x.double()
    k, d = x.shape
    if k < d:
        px = p @ x.T  # [d, k]
        s = lam * torch.eye(k, dtype=p.dtype, device=p.device) + x @ px  # [k, k]
        p = (p - px @ torch.linalg.solve(s, px.T)) / lam
    else:
        r = lam * torch.linalg.inv(p) + x.T @ x
        p = torch.linalg.inv(r)
    return 0.5 * (p + p.T)  # keep it symmetric against rounding


def _rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[k, d]`` the rows a consumer multiplies by its weight: a conv's im2col patches, a
    Linear's input features (over all leading dims)."""
    if is_conv(m):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            pad = 0
        else:
            pad = m.padding
        cols = F.unfold(x, m.kernel_size, m.dilation, pad, m.stride)  # [B, d, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class InputAutocorrelation:
    """``P = R^{-1}`` of the input of each named consumer, kept by RLS from forward hooks.

    ``with InputAutocorrelation(model, names) as rls: ...`` updates ``rls.p[name]`` at every
    forward pass (training included: the paper keeps ``P`` through training); or call
    :meth:`observe` on calibration batches. ``names=None``: every ungrouped conv and Linear.
    Layers with ``d > max_dim`` inputs are refused
    (``P`` is ``d x d`` float64: 4096 inputs take 128 MB)."""

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str] | None = None,
        *,
        forgetting: float = 1.0,
        delta: float = 1e-3,
        max_dim: int = 4096,
    ) -> None:
        if not (0 < forgetting <= 1):
            raise ValueError(
                f"InputAutocorrelation: expected forgetting in (0, 1], got {forgetting}"
            )
        if not (delta > 0 and math.isfinite(delta)):
            raise ValueError(f"InputAutocorrelation: expected delta > 0, got {delta}")
        mods = dict(model.named_modules())
        if names is None:  # every layer that can consume channels: ungrouped convs, Linears
            names = [n for n, m in mods.items() if (is_conv(m) and m.groups == 1) or is_linear(m)]
        self.model, self.lam, self.delta = model, float(forgetting), float(delta)
        self.modules = {n: mods[n] for n in names}
        self.p: dict[str, torch.Tensor] = {}
        for n, m in self.modules.items():
            d = m.weight[0].numel()
            if d > max_dim:
                raise ValueError(
                    f"InputAutocorrelation: expected layers with at most {max_dim} inputs, got "
                    f"{n!r} with {d} (P would be {d}x{d} float64)"
                )
            self.p[n] = torch.eye(d, dtype=torch.float64, device=m.weight.device) / self.delta
        self._handles: list = []

    def _hook(self, name):
        def fn(m, inputs):
            with torch.no_grad():
                self.p[name] = rls_update(self.p[name], _rows(m, inputs[0].detach()), self.lam)

        return fn

    def __enter__(self) -> InputAutocorrelation:
        self._handles = [
            m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def observe(self, batches: Iterable) -> int:
        """Run the model (eval mode) on ``(inputs, targets)`` batches; returns their number."""
        was = self.model.training
        self.model.eval()
        n = 0
        try:
            with self:
                for x, _y in batches:
                    self.model(*(x if isinstance(x, tuple) else (x,)))
                    n += 1
        finally:
            self.model.train(was)
        return n


def removal_error(w: torch.Tensor, p: torch.Tensor, cols: torch.Tensor) -> float:
    """``tr(W_S (P_SS)^{-1} W_S^T)``: the least-squares error added by removing input columns
    ``cols`` of ``w`` ``[C_out, d]`` and re-fitting the others (``p`` ``[d, d]``)."""
    ws = w[:, cols].double()  # [C_out, |S|]
    pss = p[cols][:, cols]
    return float((torch.linalg.solve(pss, ws.T) * ws.T).sum())


def rls_channel_scores(
    model: nn.Module, cg: ChannelGraph, rls: InputAutocorrelation
) -> dict[int, float]:
    """``{class: sum over consumers of removal_error}`` for the classes of ``cg``'s groups."""
    mods = dict(model.named_modules())
    wanted = {r for g in cg.groups for r in g.classes}
    out: dict[int, float] = {}
    for name in cg.consumers:
        if name not in rls.p:
            continue
        m = mods[name]
        w = dense_weight(m).flatten(1)  # [C_out, d]
        per_in = w.shape[1] // len(cg.in_ids[name])  # kh * kw for a conv, 1 for a Linear
        col_cls = cg.roots(cg.in_ids[name]).repeat_interleave(per_in)  # [d]
        for r in col_cls.unique().tolist():
            if r in wanted:
                cols = (col_cls == r).nonzero().flatten()
                out[r] = out.get(r, 0.0) + removal_error(w, rls.p[name], cols)
    return out


def rls_scores_from_data(
    model: nn.Module,
    cg: ChannelGraph,
    data: Iterable,
    *,
    forgetting: float = 1.0,
    delta: float = 1e-3,
    rls: InputAutocorrelation | None = None,
) -> dict[int, float]:
    """Scores from a tracker kept during training (``rls``), else from ``data`` batches."""
    if rls is None:
        if data is None:
            raise ValueError(
                "prune_channels: importance 'rls' expected data (batches of (inputs, targets)) "
                "or rls_state (an InputAutocorrelation kept during training), got neither"
            )
        rls = InputAutocorrelation(model, cg.consumers, forgetting=forgetting, delta=delta)
        if rls.observe(data) == 0:
            raise ValueError("prune_channels: importance 'rls' needs data: got no batches")
    return rls_channel_scores(model, cg, rls)


class RecoveryGate:
    """The paper's repruning rule: prune again only once the net has recovered the performance
    it had before the last pruning. ``ready(metric)`` with a higher-is-better validation metric
    (accuracy): True before the first pruning and whenever ``metric >= reference - tol``;
    call :meth:`pruned` with the metric measured just before each pruning (the new reference).

        gate = RecoveryGate()
        for epoch in ...:
            train(...); acc = validate()
            if epoch >= warmup and gate.ready(acc) and pruner.sparsity < target:
                gate.pruned(acc); pruner.prune(next_level)
    """

    def __init__(self, tol: float = 0.0) -> None:
        if not (tol >= 0 and math.isfinite(tol)):
            raise ValueError(f"RecoveryGate: expected tol >= 0, got {tol}")
        self.tol = float(tol)
        self.reference: float | None = None
        self.history: list[tuple[str, float]] = []

    def ready(self, metric: float) -> bool:
        if not math.isfinite(metric):
            raise ValueError(f"RecoveryGate: expected a finite metric, got {metric}")
        ok = self.reference is None or metric >= self.reference - self.tol
        self.history.append(("ready" if ok else "wait", float(metric)))
        return ok

    def pruned(self, metric_before: float) -> None:
        if not math.isfinite(metric_before):
            raise ValueError(f"RecoveryGate: expected a finite metric, got {metric_before}")
        self.reference = float(metric_before)
        self.history.append(("pruned", float(metric_before)))
