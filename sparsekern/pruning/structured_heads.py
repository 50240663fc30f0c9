"""Attention-head pruning for :func:`prune_channels` / :class:`StructuredPruner` (``heads=``):
whole heads of every ``nn.MultiheadAttention`` (torchvision's ViT, ``nn.TransformerEncoderLayer``,
sparsekern's ``SparseMultiheadAttention``) are scored, ranked and removed; the pruned attention
becomes a :class:`PrunedMultiheadAttention` (``H' * d < E``). A head's removal is exact: the model
computes what the original computes with that head's out-projection columns set to zero.

Head importances (higher = kept), named like the channel importances:

* ``"l1"`` / ``"l2"``: the L1 / L2 norm of all the head's weights: its q, k and v rows of the
  in-projection (``3 d x E``) and its ``d`` out-projection columns (``E x d``), biases not counted
  (as the channels' filter norms); ``"bn_scale"`` falls back to ``"l1"`` (no BatchNorm on a
  head, as for channel groups without one).
* ``"taylor"``: Michel, Levy and Neubig 2019 ("Are sixteen heads really better than one?"): a
  gate ``xi_h = 1`` multiplies each head's output, and ``I_h = sum_n |dL_n / dxi_h|`` over the
  samples of ``data`` (the paper's expected absolute gate gradient; removal sets ``xi_h = 0``).
  Per sample, as in the paper, where the channels' Taylor takes the batch sum first.
* ``"taylor2"``: the Fisher form, ``0.5 * sum_n (dL_n / dxi_h)^2`` (as the channels').
* ``"random"``: uniform, from ``seed``.

``"rls"`` and ``"hessian_radius"`` score channels through the channel graph's consumers, which
an attention's functional projections are not: asked for heads they are refused.

``heads`` is the fraction of each attention's heads removed (``floor(heads * H)``, at least one
kept), or ``{attention name: fraction, "*": default}``; with ``global_pruning`` the fraction of
all heads, ranked across attentions by score / the attention's mean score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from sparsekern.pruning.structured_attention import (
    PrunedMultiheadAttention,
    attention_weights,
    check_attention,
)

__all__ = [
    "HEAD_IMPORTANCES",
    "attentions",
    "head_importance",
    "head_masks",
    "head_plan",
    "rebuild_heads",
]

HEAD_IMPORTANCES = ("l1", "l2", "taylor", "taylor2", "bn_scale", "random")


def attentions(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of every ``nn.MultiheadAttention`` (incl. subclasses) and
    :class:`PrunedMultiheadAttention` in ``model``."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (nn.MultiheadAttention, PrunedMultiheadAttention))
    }


def _check_fraction(a, what: str) -> float:
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0 <= a < 1):
        raise ValueError(f"prune_channels: expected {what} in [0, 1), got {a!r}")
    return float(a)


def check_heads(model: nn.Module, heads, importance: str, global_pruning: bool) -> dict:
    """Validate ``heads`` against ``model`` before anything changes; ``{name: module}`` of the
    attentions it applies to (empty for ``heads`` None or 0)."""
    if heads is None:
        return {}
    att = attentions(model)
    if isinstance(heads, dict):
        if global_pruning:
            raise ValueError("prune_channels: expected one heads fraction with global_pruning, "
                             "got a dict")  # fmt: skip
        for k, v in heads.items():
            if k != "*" and k not in att:
                raise KeyError(
                    f"prune_channels: expected heads keys among the model's attentions "
                    f"{sorted(att)} or '*', got {k!r}"
                )
            _check_fraction(v, f"heads[{k!r}]")
        asked = any(v > 0 for v in heads.values())
    else:
        asked = _check_fraction(heads, "heads") > 0
    if not asked:
        return {}
    if not att:
        raise ValueError(
            f"prune_channels: expected a model with nn.MultiheadAttention modules for heads="
            f"{heads!r}, got none in a {type(model).__name__}"
        )
    if importance not in HEAD_IMPORTANCES:
        raise ValueError(
            f"prune_channels: expected importance in {HEAD_IMPORTANCES} with heads (head "
            f"scores: sparsekern.pruning.structured_heads), got {importance!r}"
        )
    for n, m in att.items():
        check_attention(m, n)
    return att


# --------------------------------------------------------------------------------- importances
def _norm_scores(m: nn.Module, p: int) -> torch.Tensor:
    w_in, _b, w_out, _bo = attention_weights(m)  # [3, H, d, E], [E, H, d]
    if p == 1:
        s = w_in.abs().sum((0, 2, 3), dtype=torch.float64) + w_out.abs().sum(
            (0, 2), dtype=torch.float64
        )
        return s
    sq = w_in.double().pow(2).sum((0, 2, 3)) + w_out.double().pow(2).sum((0, 2))
    return sq.sqrt()


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _gate_scores(
    model: nn.Module, att: dict, data: Iterable, loss_fn: Callable, order: int, batch_fn
) -> dict[str, torch.Tensor]:
    """Michel et al.'s head gates: every attention runs as a full :class:`PrunedMultiheadAttention`
    (same output) whose per-sample gates collect ``dL/dxi``; the originals are put back."""
    full = {}
    for n, m in att.items():
        full[n] = PrunedMultiheadAttention.from_attention(m, torch.ones(m.num_heads, dtype=bool))
        full[n].gates = []
    scores = {n: torch.zeros(m.num_heads, dtype=torch.float64) for n, m in att.items()}
    was_training = model.training
    try:
        for n, f in full.items():
            _swap(model, n, f)
        model.eval()  # as the channels' Taylor: eval-mode statistics, no dropout
        batches = 0
        for batch in data:
            for f in full.values():
                f.gates.clear()
            with torch.enable_grad():
                loss = batch_fn(model, batch, loss_fn)
                names = [n for n, f in full.items() if f.gates]
                gates = [g for n in names for g in full[n].gates]
                grads = torch.autograd.grad(loss, gates, allow_unused=True)
            k = 0
            for n in names:
                for _ in full[n].gates:
                    g = grads[k]
                    k += 1
                    if g is None:
                        continue
                    g = g.detach().double()  # [B, H]
                    scores[n] += g.abs().sum(0) if order == 1 else 0.5 * g.pow(2).sum(0)
            batches += 1
        if batches == 0:
            raise ValueError("prune_channels: importance 'taylor' needs data: got no batches")
    finally:
        for n, m in att.items():
            _swap(model, n, m)
        model.train(was_training)
    return scores


def head_importance(
    model: nn.Module,
    att: dict[str, nn.Module],
    importance: str,
    *,
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    seed: int = 0,
    batch_fn=None,
) -> dict[str, torch.Tensor]:
    """``{attention name: [num_heads] float64 scores}`` (higher = kept). ``batch_fn(model,
    batch, loss_fn) -> loss`` runs one batch (default: ``loss_fn(model(x), y)``)."""
    if importance in ("l1", "l2", "bn_scale"):
        return {n: _norm_scores(m, 2 if importance == "l2" else 1) for n, m in att.items()}
    if importance == "random":
        gen = torch.Generator().manual_seed(seed + 1)  # not the channels' draw
        return {n: torch.rand(m.num_heads, generator=gen, dtype=torch.float64)
                for n, m in att.items()}  # fmt: skip
    if data is None or loss_fn is None:
        raise ValueError(
            f"prune_channels: importance {importance!r} for heads expected data and loss_fn, "
            f"got data={type(data).__name__}, loss_fn={type(loss_fn).__name__}"
        )
    if batch_fn is None:

        def batch_fn(model, batch, loss_fn):
            x, y = batch
            return loss_fn(model(*(x if isinstance(x, tuple) else (x,))), y)

    return _gate_scores(model, att, data, loss_fn, 1 if importance == "taylor" else 2, batch_fn)


# ------------------------------------------------------------------------------------- planning
def head_plan(
    scores: dict[str, torch.Tensor],
    heads,
    global_pruning: bool = False,
    removed: dict[str, set[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """``{attention name: [num_heads] bool keep}``: per attention the lowest-scoring
    ``floor(heads * H)`` removed, or globally over score / mean; at least one head kept per
    attention. ``removed`` heads (earlier rounds) stay removed and count toward the target."""
    removed = removed or {}
    keep = {n: torch.ones(len(s), dtype=torch.bool) for n, s in scores.items()}
    ranked = {}
    for n, s in scores.items():
        s = s.clone()
        for h in removed.get(n, ()):
            s[h] = -math.inf  # ranks below every kept head
        ranked[n] = s
    if global_pruning:
        total = sum(len(s) for s in scores.values())
        n_remove = math.floor(float(heads) * total)
        flat = []
        for n, s in ranked.items():
            mean = scores[n].mean()
            norm = s / mean if mean > 0 else s
            flat += [(float(v), n, h) for h, v in enumerate(norm.tolist())]
        flat.sort(key=lambda t: t[0])  # stable: ties keep the attention and head order
        for _v, n, h in flat:
            if n_remove == 0:
                break
            if int(keep[n].sum()) > 1:
                keep[n][h] = False
                n_remove -= 1
        return keep
    for n, s in ranked.items():
        a = heads.get(n, heads.get("*", 0.0)) if isinstance(heads, dict) else heads
        k = min(math.floor(float(a) * len(s)), len(s) - 1)
        k = max(k, len(removed.get(n, ())))
        if k > 0:
            keep[n][torch.argsort(s, stable=True)[:k]] = False
    return keep


def head_masks(m: nn.Module, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The masks of a ``SparseMultiheadAttention`` that remove the heads where ``keep`` is False:
    ``in_proj [3E, E]`` (their q, k, v rows) and ``out_proj [E, E]`` (their columns), ANDed with
    the masks it has."""
    d = m.head_dim
    rows = keep.to(m.in_proj.mask.device).repeat_interleave(d).repeat(3)  # [3 * H * d]
    cols = keep.to(m.out_proj.mask.device).repeat_interleave(d)  # [H * d]
    return m.in_proj.mask & rows[:, None], m.out_proj.mask & cols[None, :]


# ----------------------------------------------------------------------------------- rebuilding
def _plain_attention(m: nn.MultiheadAttention) -> nn.MultiheadAttention:
    """sparsekern's ``SparseMultiheadAttention`` as a plain one holding its masked weights."""
    w_in, b_in, w_out, b_out = attention_weights(m)
    new = nn.MultiheadAttention(
        m.embed_dim, m.num_heads, dropout=m.dropout, bias=b_in is not None,
        batch_first=m.batch_first, device=w_in.device, dtype=w_in.dtype,
    )  # fmt: skip
    with torch.no_grad():
        new.in_proj_weight.copy_(w_in.reshape(-1, m.embed_dim))
        if b_in is not None:
            new.in_proj_bias.copy_(b_in.reshape(-1))
        new.out_proj.weight.copy_(w_out.reshape(m.embed_dim, -1))
        if b_out is not None:
            new.out_proj.bias.copy_(b_out)
        else:
            new.out_proj.bias = None
    for p_new, p_old in ((new.in_proj_weight, m.in_proj_weight),
                         (new.out_proj.weight, m.out_proj.weight)):  # fmt: skip
        p_new.requires_grad_(p_old.requires_grad)
    return new.train(m.training)


def rebuild_heads(model: nn.Module, keep: dict[str, torch.Tensor]) -> int:
    """In ``model`` (already a copy): each attention of ``keep`` losing a head becomes a
    :class:`PrunedMultiheadAttention`; every other sparse attention its plain
    ``nn.MultiheadAttention``. A ``nn.TransformerEncoder`` holding a pruned attention stops
    using nested tensors (its fast path assumes ``E = H * d``). Returns the heads removed."""
    removed = 0
    for n, m in attentions(model).items():
        k = keep.get(n)
        if k is not None and not bool(k.all()):
            _swap(model, n, PrunedMultiheadAttention.from_attention(m, k))
            removed += int((~k).sum())
        elif (
            isinstance(m, nn.MultiheadAttention)
            and hasattr(m, "in_proj")  # sparsekern's sparse attention (one packed in-projection)
            and m._qkv_same_embed_dim
            and m.bias_k is None
            and not m.add_zero_attn
        ):
            _swap(model, n, _plain_attention(m))
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
            isinstance(getattr(layer, "self_attn", None), PrunedMultiheadAttention)
            for layer in m.layers
        ):
            m.use_nested_tensor = False
    return removed
