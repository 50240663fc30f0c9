"""Structured pruning with physical removal: whole channels (conv filters, FC neurons) leave the
model, which becomes a smaller *dense* model, faster on any device with no special kernel.

    small = prune_channels(model, (torch.randn(1, 3, 224, 224),), amount=0.5, importance="l1")

Coupled channels are found by tracing (``torch.fx`` plus a shape pass, see
``sparsekern.pruning._dependency``): residual adds, ``torch.cat``, depthwise convs, BatchNorm and
flatten into Linear. Layers whose outputs reach the model output (the classifier) or an op that
cannot be followed keep all their channels.

Importances (one score per coupled channel, higher = keep; see :data:`IMPORTANCES`):

* ``"l1"`` / ``"l2"``: the L1 / L2 norm of each producer filter (conv output channel, FC row),
  summed over the producers (and depthwise convs) the channel is coupled across; with
  ``include_consumers`` the consumers' input slices (the weights reading the channel) are added.
* ``"taylor"``: Molchanov et al. 2017, first order: ``|sum_{n,h,w} g * a|`` where ``a`` is what a
  consumer reads of the channel and ``g`` the loss gradient there, summed over consumers and
  accumulated over the batches of ``data`` (removing the channel sets ``a`` to 0, and the first
  order change of the loss is ``-g . a``).
* ``"taylor2"``: second order with the Fisher approximation of the Hessian
  (``H ~ g g^T`` per sample): ``0.5 * sum_n (sum_{h,w} g_n a_n)^2``, accumulated likewise.
* ``"bn_scale"``: network slimming (Liu et al. 2017): ``|gamma|`` of the BatchNorm(s) on the
  channel; groups with no BatchNorm fall back to ``"l1"`` (then ``amount`` still applies to them).
  Train with :class:`StructuredPruner`'s ``bn_l1`` to push the gammas to zero first.
* ``"random"``: uniform, from ``seed`` (the control).
* ``"rls"``: Yu et al. 2022: each consumer's inverse input autocorrelation ``P = R^{-1}``, kept
  by recursive least squares over ``data`` (or over training, ``rls_state``), with its weights:
  the least-squares error added by removing the channel's input columns and re-fitting the
  rest, ``tr(W_S (P_SS)^{-1} W_S^T)``, summed over consumers (``importance_rls``).
* ``"hessian_radius"``: after Ebrahimi and Klabjan 2021: the top Hessian eigenvector ``v`` by
  power iteration (double backward over ``data`` with ``loss_fn``); ``1 - m_c`` where ``m_c`` is
  ``v``'s mass on the channel's weights, so the neurons carrying the sharpest direction go first
  and the spectral radius falls (``importance_hessian``).

``amount`` is the fraction of each group's prunable channels removed (``floor(amount * n)``, at
least one kept), a dict ``{producer layer name: amount}`` (``"*"``: the default for the others),
or, with ``global_pruning=True``, the fraction of all prunable channels, ranked across groups by
their importance divided by the group's mean importance (Torch-Pruning's "mean" normalisation, so
that layers of different scale compete fairly).

``heads`` (a fraction, a per-attention dict, or global like ``amount``) also removes whole
attention heads of every ``nn.MultiheadAttention``, scored by the same ``importance`` (``"l1"`` /
``"l2"`` / ``"taylor"`` / ``"taylor2"`` / ``"random"``; ``sparsekern.pruning.structured_heads``)
into a :class:`PrunedMultiheadAttention`. Attentions are opaque to the channel graph (their
residual stream is not followed), so heads and channels are planned independently.

Not pruned, with a warning naming what is left: ConvNeXt's residual width (the depthwise convs,
stem / downsampling convs, LayerNorm2d and layer scale of a stage). Its LayerNorms normalise
across the channels, so removing one changes all the others: no removal is exact there.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from sparsekern.pruning._dependency import (
    ChannelGraph,
    _UnionFind,
    build_channel_graph,
    dense_weight,
    is_conv,
    is_linear,
    rebuild_pruned,
)
from sparsekern.pruning.base import BasePruner
from sparsekern.pruning.importance_hessian import hessian_channel_scores
from sparsekern.pruning.importance_rls import InputAutocorrelation, rls_scores_from_data
from sparsekern.pruning.structured_attention import PrunedMultiheadAttention
from sparsekern.pruning.structured_heads import (
    check_heads,
    head_importance,
    head_masks,
    head_plan,
    rebuild_heads,
)

__all__ = [
    "IMPORTANCES",
    "PrunedMultiheadAttention",
    "StructuredPruner",
    "channel_groups",
    "channel_importance",
    "count_macs",
    "count_params",
    "prune_channels",
    "pruning_plan",
    "removal_plan",
]

IMPORTANCES = ("l1", "l2", "taylor", "taylor2", "bn_scale", "random", "rls", "hessian_radius")
_GRADIENT = ("taylor", "taylor2", "hessian_radius")
_CLOSURE = object()  # a batch whose loss_fn runs the model itself (StructuredPruner's closure)


def _as_tuple(example_inputs) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _check_amount(a, what: str) -> float:
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0 <= a < 1):
        raise ValueError(f"prune_channels: expected {what} in [0, 1), got {a!r}")
    return float(a)


def _check_importance(importance) -> None:
    if importance not in IMPORTANCES:
        raise ValueError(
            f"prune_channels: expected importance in {IMPORTANCES}, got {importance!r}"
        )


def channel_groups(model: nn.Module, example_inputs) -> list[dict]:
    """The prunable channel groups of ``model``: ``[{"producers": [...], "channels": n,
    "bns": [...]}]``; layers in no group keep all their outputs."""
    cg = build_channel_graph(model, _as_tuple(example_inputs))
    return [
        {"producers": list(g.producers), "channels": len(g.classes), "bns": list(g.bns)}
        for g in cg.groups
    ]


# --------------------------------------------------------------------------------- importances
def _sum_by_class(cg: ChannelGraph, ids: torch.Tensor, values: torch.Tensor, out: dict) -> None:
    """``out[class] += values[k]`` for the channel ids ``ids`` ``[K]``."""
    roots = cg.roots(ids)
    uniq, inv = roots.unique(return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, values.double())
    for r, v in zip(uniq.tolist(), sums.tolist()):
        out[r] = out.get(r, 0.0) + v


def _row_norms(w: torch.Tensor, p: int) -> torch.Tensor:
    """``[R]`` float64 L1 or L2 norms of the rows of ``w`` ``[R, K]`` (computed in w's dtype:
    a float64 copy of VGG's 100M-weight classifier would cost 800 MB)."""
    return torch.linalg.vector_norm(w, ord=p, dim=1).double()


def _norm_scores(model, cg: ChannelGraph, p: int, include_consumers: bool) -> dict[int, float]:
    mods = dict(model.named_modules())
    out: dict[int, float] = {}
    for name in cg.producers + cg.depthwise:
        w = dense_weight(mods[name]).flatten(1)  # [C_out, in * kh * kw]
        ids = cg.out_ids[name] if name in cg.out_ids else cg.in_ids[name]
        _sum_by_class(cg, ids, _row_norms(w, p), out)
    if include_consumers:
        for name in cg.consumers:
            w = dense_weight(mods[name])  # [C_out, C_in(, kh, kw)]
            w = w.transpose(0, 1).flatten(1)  # [C_in, ...]: what reads each input column
            _sum_by_class(cg, cg.in_ids[name], _row_norms(w, p), out)
    return out


def _bn_scores(model, cg: ChannelGraph) -> dict[int, float]:
    mods = dict(model.named_modules())
    out: dict[int, float] = {}
    for name in cg.bns:
        bn = mods[name]
        if bn.affine:
            _sum_by_class(cg, cg.in_ids[name], bn.weight.detach().double().abs(), out)
    return out


def _taylor_scores(
    model: nn.Module, cg: ChannelGraph, data: Iterable, loss_fn: Callable, order: int
) -> dict[int, float]:
    """Accumulate Taylor scores over ``data`` at the consumers' inputs (what removal zeroes).
    Gradients come from ``torch.autograd.grad``: no ``.grad`` of the model is touched."""
    mods = dict(model.named_modules())
    acts: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_m, inputs):
            acts[name] = inputs[0]

        return fn

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in cg.consumers]
    per_col: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()  # BatchNorm statistics stay as they are; the gradient is the eval-mode one
    try:
        for batch in data:
            x, y = batch
            acts.clear()
            with torch.enable_grad():
                out = None if x is _CLOSURE else model(*_as_tuple(x))
                loss = loss_fn(out, y)
                names = [n for n in cg.consumers if n in acts and acts[n].requires_grad]
                grads = torch.autograd.grad(loss, [acts[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                if g is None:
                    continue
                ga = (g * acts[n]).detach().double()  # [B, C(, H, W)] or [B, ..., C]
                if n in cg.last_dim:  # channels last (a Linear on [B, ..., C])
                    s = ga.reshape(ga.shape[0], -1, ga.shape[-1]).sum(1)  # [B, C]
                else:
                    s = ga.flatten(2).sum(2) if ga.dim() > 2 else ga  # [B, C]
                v = s.sum(0).abs() if order == 1 else 0.5 * (s**2).sum(0)
                per_col[n] = per_col[n] + v if n in per_col else v
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not per_col:
        raise ValueError("prune_channels: importance 'taylor' needs data: got no batches")
    out: dict[int, float] = {}
    for n, v in per_col.items():
        _sum_by_class(cg, cg.in_ids[n], v, out)
    return out


def channel_importance(
    model: nn.Module,
    cg: ChannelGraph,
    importance: str,
    *,
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    seed: int = 0,
    include_consumers: bool = False,
    rls_state: InputAutocorrelation | None = None,
) -> list[torch.Tensor]:
    """One ``[n_channels]`` float64 score tensor per group of ``cg`` (higher = more important)."""
    _check_importance(importance)
    if importance == "rls":
        sc = rls_scores_from_data(model, cg, data, rls=rls_state)
        return [
            torch.tensor([sc.get(r, 0.0) for r in g.classes], dtype=torch.float64)
            for g in cg.groups
        ]
    if importance in ("l1", "l2", "bn_scale"):
        l1 = _norm_scores(model, cg, 1 if importance != "l2" else 2, include_consumers)
        bn = _bn_scores(model, cg) if importance == "bn_scale" else {}
        out = []
        for g in cg.groups:
            # slimming falls back to L1 where a group has no BN
            src = bn if importance == "bn_scale" and g.bns else l1
            out.append(torch.tensor([src.get(r, 0.0) for r in g.classes], dtype=torch.float64))
        return out
    if importance == "random":
        gen = torch.Generator().manual_seed(seed)
        return [torch.rand(len(g.classes), generator=gen, dtype=torch.float64) for g in cg.groups]
    if data is None or loss_fn is None:
        raise ValueError(
            f"prune_channels: importance {importance!r} expected data (batches of (inputs, "
            f"targets)) and loss_fn(output, targets), got data={type(data).__name__}, "
            f"loss_fn={type(loss_fn).__name__}"
        )
    if importance == "hessian_radius":
        gen = torch.Generator().manual_seed(seed)  # the power iteration's start
        sc, _rho = hessian_channel_scores(model, cg, data, loss_fn, generator=gen)
    else:
        sc = _taylor_scores(model, cg, data, loss_fn, 1 if importance == "taylor" else 2)
    return [
        torch.tensor([sc.get(r, 0.0) for r in g.classes], dtype=torch.float64) for g in cg.groups
    ]


# ------------------------------------------------------------------------------------- planning
def _group_amounts(cg: ChannelGraph, amount) -> list[float]:
    if not isinstance(amount, dict):
        a = _check_amount(amount, "amount")
        return [a] * len(cg.groups)
    default = _check_amount(amount.get("*", 0.0), "amount['*']")
    prunable = cg.group_of_layer()
    known = set(cg.producers)
    for k, v in amount.items():
        if k == "*":
            continue
        if k not in known:
            raise KeyError(
                f"prune_channels: expected layer names among the model's conv/linear layers "
                f"{sorted(known)}, got unknown layer {k!r}"
            )
        _check_amount(v, f"amount[{k!r}]")
        if k not in prunable and v > 0:
            raise ValueError(
                f"prune_channels: expected a layer whose output channels can be pruned, got "
                f"{k!r}, whose outputs reach the model output or an op that cannot be followed"
            )
    out = []
    for g in cg.groups:
        given = [float(amount[p]) for p in g.producers if p in amount]
        # coupled layers lose the same channels: the largest amount asked for any of them
        out.append(max(given) if given else default)
    return out


def removal_plan(
    cg: ChannelGraph, scores: list[torch.Tensor], amount, global_pruning: bool = False
) -> set[int]:
    """The classes (union-find roots) to remove: the lowest-scoring ``floor(amount * n)`` of each
    group, or globally over normalised scores; at least one channel per group stays."""
    removed: set[int] = set()
    if global_pruning:
        if isinstance(amount, dict):
            raise ValueError("prune_channels: expected one amount with global_pruning, got a dict")
        a = _check_amount(amount, "amount")
        total = sum(len(g.classes) for g in cg.groups)
        n_remove = math.floor(a * total)
        if n_remove == 0:
            return removed
        norm, owner = [], []
        for gi, s in enumerate(scores):
            mean = s.mean()
            norm.append(s / mean if mean > 0 else s)
            owner.append(torch.full((len(s),), gi))
        flat, own = torch.cat(norm), torch.cat(owner)
        pos = torch.cat([torch.arange(len(s)) for s in scores])
        left = [len(g.classes) for g in cg.groups]
        for k in torch.argsort(flat, stable=True).tolist():
            if n_remove == 0:
                break
            gi = int(own[k])
            if left[gi] > 1:
                removed.add(cg.groups[gi].classes[int(pos[k])])
                left[gi] -= 1
                n_remove -= 1
        return removed
    for g, s, a in zip(cg.groups, scores, _group_amounts(cg, amount)):
        n = min(math.floor(a * len(g.classes)), len(g.classes) - 1)
        if n > 0:
            for k in torch.argsort(s, stable=True)[:n].tolist():
                removed.add(g.classes[k])
    return removed


def _empty_graph() -> ChannelGraph:
    return ChannelGraph(_UnionFind(), {}, {}, [], [], [], [], [])


def warn_left(cg: ChannelGraph, model: nn.Module, who: str) -> None:
    """Warn (never a silent skip) when depthwise convs keep all their channels: ConvNeXt's
    residual width, which is shared by the whole stage and normalised by LayerNorms."""
    left = cg.left_depthwise()
    if not left:
        return
    shown = "; ".join(f"{n} (at {w})" for n, w in list(left.items())[:3])
    more = f" and {len(left) - 3} more" if len(left) > 3 else ""
    ln = any(isinstance(m, nn.LayerNorm) for m in model.modules())
    why = (
        " They carry the residual width of their stage, which LayerNorms normalise across the "
        "channels: removing a channel would change every other channel's output, so the width "
        "(stem / downsampling convs, depthwise convs, LayerNorms, layer scales) is left whole "
        "and only the MLP hidden units are pruned."
        if ln
        else ""
    )
    warnings.warn(
        f"{who}: {len(left)} depthwise conv(s) keep all their channels, coupled to an op the "
        f"channel graph does not follow: {shown}{more}.{why}",
        UserWarning,
        stacklevel=4,
    )


def _plan(model, inputs, amount, importance, global_pruning, heads=None, **kw):
    """``(channel graph, removed classes, {attention: [H] keep})``: validated before anything
    is scored; with heads only (``amount`` 0) a model fx cannot trace is accepted."""
    att = check_heads(model, heads, importance, global_pruning)
    asked = any(v > 0 for v in amount.values()) if isinstance(amount, dict) else amount > 0
    try:
        cg = build_channel_graph(model, inputs)
    except ValueError:
        if asked or not att:
            raise
        cg = _empty_graph()  # heads only: the channel graph is not needed
    if not cg.groups and asked:
        # never a silent no-op: say what was found, so that the user knows nothing can be removed
        raise ValueError(
            f"prune_channels: expected a model with prunable channel groups, got 0 in a "
            f"{type(model).__name__} ({len(cg.producers)} conv/linear layers, all reaching the "
            "output or an op the channel graph does not follow: see channel_groups())"
        )
    if not global_pruning:
        _group_amounts(cg, amount)  # validate before the (maybe costly) importance pass
    if asked:
        warn_left(cg, model, "prune_channels")
    removed: set[int] = set()
    if cg.groups:
        scores = channel_importance(model, cg, importance, **kw)
        removed = removal_plan(cg, scores, amount, global_pruning)
    keep_heads = {}
    if att:
        hs = head_importance(model, att, importance, data=kw.get("data"),
                             loss_fn=kw.get("loss_fn"), seed=kw.get("seed", 0))  # fmt: skip
        keep_heads = head_plan(hs, heads, global_pruning)
    return cg, removed, keep_heads


def pruning_plan(
    model: nn.Module,
    example_inputs,
    amount: float | dict = 0.5,
    importance: str = "l1",
    *,
    global_pruning: bool = False,
    heads: float | dict | None = None,
    **importance_kwargs,
) -> dict[str, dict[str, torch.Tensor]]:
    """What :func:`prune_channels` would keep, without building anything: ``{"out": {layer:
    [C_out] bool}, "in": {layer: [C_in] bool}, "heads": {attention: [num_heads] bool}}`` for
    every conv / linear / BN layer touched (``in`` of a Linear after a flatten: its feature
    columns; of a BN or depthwise conv: its channels) and, with ``heads``, every attention.
    Same arguments as :func:`prune_channels`; ``model`` is not changed (a Taylor head score
    swaps its attentions for the pass and puts them back)."""
    _check_importance(importance)
    if not isinstance(amount, dict):
        _check_amount(amount, "amount")
    cg, removed, keep_heads = _plan(
        model, _as_tuple(example_inputs), amount, importance, global_pruning, heads,
        **importance_kwargs,
    )  # fmt: skip
    return {
        "out": {n: cg.keep(ids, removed) for n, ids in cg.out_ids.items()},
        "in": {n: cg.keep(ids, removed) for n, ids in cg.in_ids.items()},
        "heads": keep_heads,
    }


def prune_channels(
    model: nn.Module,
    example_inputs,
    amount: float | dict = 0.5,
    importance: str = "l1",
    *,
    global_pruning: bool = False,
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    seed: int = 0,
    include_consumers: bool = False,
    rls_state: InputAutocorrelation | None = None,
    heads: float | dict | None = None,
) -> nn.Module:
    """A new, physically smaller copy of ``model`` with channels (and, with ``heads``, attention
    heads) removed; ``model`` is untouched.

    Args:
        model: any torch.fx-traceable model of ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm2d``
            (sparsekern's SparseConv2d / SparseLinear are read as ``weight * mask``).
        example_inputs: a tensor or tuple of tensors, e.g. ``(torch.randn(1, 3, 64, 64),)``: the
            shape pass that finds flatten sizes; any batch size and spatial size the model
            accepts (the result works at others too).
        amount: pruned fraction in [0, 1) per group, or ``{layer: amount, "*": default}``, or
            with ``global_pruning`` the fraction of all prunable channels (see module docstring).
        importance: one of :data:`IMPORTANCES`.
        data, loss_fn: for ``"taylor"`` / ``"taylor2"`` / ``"hessian_radius"``: an iterable of
            ``(inputs, targets)`` batches and ``loss_fn(model_output, targets) -> 0-d loss``;
            ``"rls"`` needs ``data`` only (or ``rls_state``).
        rls_state: for ``"rls"``: an :class:`InputAutocorrelation` kept during training (it
            names the layers of ``model``; read, not changed).
        seed: for ``"random"``.
        include_consumers: L1/L2 also sum the consumers' weights that read each channel.
        heads: fraction in [0, 1) of each ``nn.MultiheadAttention``'s heads removed (at least
            one kept), or ``{attention name: fraction, "*": default}``, or with
            ``global_pruning`` the fraction of all heads; scored by ``importance`` (``"l1"`` /
            ``"l2"`` of the head's q/k/v rows and out-projection columns, ``"taylor"`` Michel
            et al.'s gate gradient, ``"taylor2"``, ``"random"``: see
            ``sparsekern.pruning.structured_heads``). A pruned attention becomes a
            :class:`PrunedMultiheadAttention`. With ``amount=0`` the model need not be
            traceable by torch.fx (``nn.TransformerEncoder``).

    Returns:
        a plain PyTorch model (no sparsekern modules but ``PrunedMultiheadAttention``), same
        output shape; ``amount=0`` and no ``heads`` give an exact copy (equal outputs).

    Raises:
        ValueError: amount outside [0, 1), unknown importance, untraceable model, missing data,
            a nonzero amount on a model with no prunable channel group (never a silent no-op),
            ``heads`` on a model without attention, an importance heads do not support
            (``"rls"``, ``"hessian_radius"``), an attention whose heads cannot be split
            (kdim / vdim, bias_k / bias_v, add_zero_attn).
        KeyError: a per-layer dict naming a layer (or attention) the model does not have.

    Warns:
        UserWarning: depthwise convs that keep all their channels (ConvNeXt's residual width,
            which is not pruned: see ``warn_left``).
    """
    _check_importance(importance)
    if not isinstance(amount, dict):
        _check_amount(amount, "amount")
    inputs = _as_tuple(example_inputs)
    new = copy.deepcopy(model)  # everything below reads or changes the copy only
    cg, removed, keep_heads = _plan(
        new,
        inputs,
        amount,
        importance,
        global_pruning,
        heads,
        data=data,
        loss_fn=loss_fn,
        seed=seed,
        include_consumers=include_consumers,
        rls_state=rls_state,
    )
    rebuild_heads(new, keep_heads)  # first: rebuild_pruned leaves the attentions' insides alone
    rebuild_pruned(new, cg, removed)
    return new


# ------------------------------------------------------------------------------------- measures
def count_params(model: nn.Module) -> int:
    """Parameters (weights, biases, BN affine), counted once each."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs) -> int:
    """Multiply-accumulates of the conv and linear layers (and ``nn.MultiheadAttention`` /
    ``PrunedMultiheadAttention``: its projections and the two attention products) for one
    forward of ``example_inputs`` (the FLOP convention of the pruning papers: 1 MAC = 1 "FLOP";
    BN, LayerNorm, activations, softmax, pooling and adds are not counted)."""
    total = 0

    def hook(m, _inp, out):
        nonlocal total
        per_out = m.weight[0].numel()  # in/groups * kh * kw for a conv, in for a linear
        total += out.numel() * per_out

    def mha_hook(m, inp, _out):
        # nn.MultiheadAttention runs its projections functionally (no Linear hook fires):
        # q/k/v in-projections, Q K^T, A V and the out-projection
        nonlocal total
        q, k = inp[0], inp[1]
        lq, lk = (q.shape[-2], k.shape[-2]) if m.batch_first else (q.shape[0], k.shape[0])
        b = q.numel() // (lq * m.embed_dim)
        e, kd, vd = m.embed_dim, m.kdim, m.vdim
        i = m.num_heads * m.head_dim  # embed_dim, or fewer after head pruning
        total += b * (lq * e * i + lk * kd * i + lk * vd * i + 2 * lq * lk * i + lq * i * e)

    handles = [m.register_forward_hook(hook) for m in model.modules() if is_conv(m) or is_linear(m)]
    handles += [
        m.register_forward_hook(mha_hook)
        for m in model.modules()
        if isinstance(m, (nn.MultiheadAttention, PrunedMultiheadAttention))
    ]
    was_training = model.training
    model.eval()
    try:
        model(*_as_tuple(example_inputs))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


# --------------------------------------------------------------------------- iterative pruning
class StructuredPruner(BasePruner):
    """Iterative structured pruning with fine-tuning, under the common :class:`BasePruner`
    lifecycle. During training the removed channels are *masked* (the producers' rows, the
    depthwise filters and every consumer column that reads them set to False), so the model keeps
    its shapes and the optimizer its parameters; :meth:`export` then removes them physically.

    The target (``sparsity``, a schedule, or ``prune(sparsity)``) is the fraction of each
    group's channels removed; rounds are cumulative (a removed channel stays removed). With
    ``bn_l1 > 0``, :meth:`regularization_loss` is network slimming's ``bn_l1 * sum |gamma|`` over
    the BatchNorms of the prunable groups: add it to the loss during (sparsity) training, then
    prune with ``importance="bn_scale"``.

    Args:
        model: a sparsified model (``sparsekern.sparsify``), traceable by torch.fx.
        optimizer: as in :class:`BasePruner`.
        example_inputs: for the shape pass.
        importance: one of :data:`IMPORTANCES`.
        global_pruning: rank across groups (see :func:`prune_channels`).
        data, loss_fn: Taylor importances: batches and loss; without them the ``closure`` given
            to ``prune`` / ``step`` is used (one batch, its backward through autograd.grad).
            ``"hessian_radius"`` needs both (power iteration re-runs the model); ``"rls"``
            needs ``data`` or ``rls_state``.
        bn_l1: slimming's L1 coefficient on the BN scales.
        rls_state: for ``"rls"``: an :class:`InputAutocorrelation` on ``model`` kept during
            training (the paper's ``P``); pair with :class:`RecoveryGate` for its schedule.
        heads: fraction of each attention's heads removed (or a dict / global, as in
            :func:`prune_channels`), reached at the first round and kept after (removed heads
            stay removed); the attentions must be sparse (``sparsify`` converts
            ``nn.MultiheadAttention``): a removed head's q/k/v rows of ``in_proj`` and its
            ``out_proj`` columns are masked, and :meth:`export` drops them
            (:class:`PrunedMultiheadAttention`).

    Warns:
        UserWarning: depthwise convs that keep all their channels (ConvNeXt's residual width).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        example_inputs,
        sparsity: float | None = None,
        schedule=None,
        importance: str = "l1",
        global_pruning: bool = False,
        data: Iterable | None = None,
        loss_fn: Callable | None = None,
        bn_l1: float = 0.0,
        seed: int = 0,
        rls_state: InputAutocorrelation | None = None,
        heads: float | dict | None = None,
    ) -> None:
        _check_importance(importance)
        att = check_heads(model, heads, importance, global_pruning)
        for n, m in att.items():
            if not (hasattr(m, "in_proj") and hasattr(m.out_proj, "mask")):
                raise ValueError(
                    f"StructuredPruner: heads expected sparse attentions (sparsekern.sparsify "
                    f"converts nn.MultiheadAttention), got a {type(m).__name__} at {n!r}"
                )
        if importance == "hessian_radius" and (data is None or loss_fn is None):
            raise ValueError(
                "StructuredPruner: importance 'hessian_radius' expected data and loss_fn (power "
                f"iteration re-runs the model), got data={type(data).__name__}, "
                f"loss_fn={type(loss_fn).__name__}"
            )
        if importance == "rls" and data is None and rls_state is None:
            raise ValueError(
                "StructuredPruner: importance 'rls' expected data or rls_state, got neither"
            )
        if not (bn_l1 >= 0 and math.isfinite(bn_l1)):
            raise ValueError(f"StructuredPruner: expected bn_l1 >= 0, got {bn_l1}")
        self.example_inputs = _as_tuple(example_inputs)
        self.cg = build_channel_graph(model, self.example_inputs)
        if not self.cg.groups:
            raise ValueError("StructuredPruner: expected a model with prunable channels, got none")
        warn_left(self.cg, model, "StructuredPruner")
        mods = dict(model.named_modules())
        touched = set(self.cg.producers) | set(self.cg.consumers) | set(self.cg.depthwise)
        touched |= {f"{n}.{p}" for n in att for p in ("in_proj", "out_proj")}
        super().__init__(
            model,
            optimizer,
            sparsity=sparsity,
            schedule=schedule,
            layers=[n for n in mods if n in touched and hasattr(mods[n], "mask")],
        )
        self.importance = importance
        self.global_pruning = global_pruning
        self.data, self.loss_fn = data, loss_fn
        self.bn_l1 = float(bn_l1)
        self.seed = seed
        self.rls_state = rls_state
        self.removed: set[int] = set()
        self.heads, self._att = heads, att
        self.removed_heads: dict[str, list[int]] = {n: [] for n in att}
        self._gammas = [mods[b].weight for g in self.cg.groups for b in g.bns if mods[b].affine]

    def _config(self) -> dict:
        return {
            "importance": self.importance,
            "global_pruning": self.global_pruning,
            "bn_l1": self.bn_l1,
            "seed": self.seed,
            "heads": self.heads,
        }

    def _extra_state(self) -> dict:
        return {"removed_channels": self.removed_channels(), "removed_heads": self.removed_heads}

    def _load_extra_state(self, state: dict) -> None:
        self.removed = self._classes_from(state["removed_channels"])
        heads = state.get("removed_heads", {})
        if set(heads) != set(self.removed_heads) and heads:
            raise ValueError(
                f"StructuredPruner: expected removed heads for the attentions "
                f"{sorted(self.removed_heads)}, got {sorted(heads)}"
            )
        self.removed_heads = {n: list(heads.get(n, [])) for n in self.removed_heads}

    def removed_channels(self) -> dict[str, list[int]]:
        """``{producer: removed output channel indices}`` (the first producer of each group)."""
        out = {}
        for g in self.cg.groups:
            p = g.producers[0]
            roots = self.cg.roots(self.cg.out_ids[p]).tolist()
            out[p] = [i for i, r in enumerate(roots) if r in self.removed]
        return out

    def _classes_from(self, by_producer: dict[str, list[int]]) -> set[int]:
        return {
            self.cg.uf.find(int(self.cg.out_ids[p][i]))
            for p, idx in by_producer.items()
            for i in idx
        }

    def regularization_loss(self) -> torch.Tensor:
        """``bn_l1 * sum |gamma|`` (network slimming), or a 0-d zero."""
        if self.bn_l1 == 0 or not self._gammas:
            return next(iter(self.layers.values())).weight.new_zeros(())
        return self.bn_l1 * sum(g.abs().sum() for g in self._gammas)

    def compute_masks(self, sparsity, closure) -> dict[str, torch.Tensor]:
        data, loss_fn = self.data, self.loss_fn
        if self.importance in _GRADIENT and data is None:
            if closure is None:
                raise ValueError(
                    f"StructuredPruner: importance {self.importance!r} expected data and "
                    "loss_fn, or a closure, got neither"
                )
            # the closure runs the model itself on the current batch: one batch of scores
            data, loss_fn = [(_CLOSURE, None)], lambda _out, _y: closure()
        scores = channel_importance(
            self.model, self.cg, self.importance, data=data, loss_fn=loss_fn, seed=self.seed,
            rls_state=self.rls_state,
        )  # fmt: skip
        # a removed channel stays removed: rank it below every kept one
        for g, s in zip(self.cg.groups, scores):
            for k, r in enumerate(g.classes):
                if r in self.removed:
                    s[k] = -1.0
        removed = removal_plan(self.cg, scores, sparsity, self.global_pruning) | self.removed
        self._pending = removed
        masks = self._masks_for(removed)
        self._pending_heads = self.removed_heads
        if self._att:
            keep = self._head_plan(data, loss_fn, closure)
            self._pending_heads = {n: (~k).nonzero().flatten().tolist() for n, k in keep.items()}
            for n, k in keep.items():
                masks[f"{n}.in_proj"], masks[f"{n}.out_proj"] = head_masks(self._att[n], k)
        return masks

    def _head_plan(self, data, loss_fn, closure) -> dict[str, torch.Tensor]:
        batch_fn = None
        if self.importance in _GRADIENT and self.data is None:

            def batch_fn(_model, _batch, _loss_fn):  # the closure runs the model itself
                return closure()

        sc = head_importance(
            self.model, self._att, self.importance, data=data, loss_fn=loss_fn, seed=self.seed,
            batch_fn=batch_fn,
        )  # fmt: skip
        removed = {n: set(h) for n, h in self.removed_heads.items()}
        return head_plan(sc, self.heads, self.global_pruning, removed=removed)

    def _apply(self, masks, **record) -> bool:
        self.removed = set(self._pending)
        self.removed_heads = self._pending_heads
        heads = sum(len(h) for h in self.removed_heads.values())
        return super()._apply(
            masks, **record, channels_removed=len(self.removed), heads_removed=heads
        )

    def _masks_for(self, removed: set[int]) -> dict[str, torch.Tensor]:
        cg, out = self.cg, {}

        def keep(ids):
            return cg.keep(ids, removed)

        for name, m in self.layers.items():
            mask = m.mask.clone()
            if name in cg.depthwise:
                mask[~keep(cg.in_ids[name])] = False
            else:
                if name in cg.out_ids:
                    mask[~keep(cg.out_ids[name])] = False
                if name in cg.in_ids:
                    mask[:, ~keep(cg.in_ids[name])] = False
            out[name] = mask
        return out

    def export(self) -> nn.Module:
        """A physically smaller plain copy of the model without the removed channels; in eval
        mode it computes what the masked model computes."""
        new = copy.deepcopy(self.model)
        cg = build_channel_graph(new, self.example_inputs)
        keep = {}
        for n, gone in self.removed_heads.items():
            keep[n] = torch.ones(self._att[n].num_heads, dtype=torch.bool)
            keep[n][gone] = False
        rebuild_heads(new, keep)
        # same trace, same id numbering: the removed classes carry over
        rebuild_pruned(new, cg, {cg.uf.find(r) for r in self.removed})
        return new
