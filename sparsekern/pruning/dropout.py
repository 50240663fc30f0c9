"""Han et al.'s dropout rule for retraining a pruned network (Sec. 3.2).

Dropout acts on neurons, and a layer's capacity is its connection count ``C_i = N_i N_{i-1}``;
pruning shrinks ``C_i``, so the dropout in front of layer ``i`` must shrink with the square root
of the kept connections:

    D_r = D_o * sqrt(C_ir / C_io)

(o: original, r: retraining). E.g. LeNet-300-100's fc2 at 9% kept with D_o = 0.5 retrains with
0.5 * sqrt(0.09) = 0.15.
"""

from __future__ import annotations

import math

from torch import nn

from sparsekern.pruning._graph import DROPOUT_MODULES, dropout_feeds
from sparsekern.pruning._layers import sparse_layers

__all__ = ["adjusted_dropout", "find_dropout_feeds", "apply_dropout_adjustment"]


def adjusted_dropout(p_original: float, c_original: int, c_retrain: int) -> float:
    """``D_r = D_o * sqrt(C_ir / C_io)``.

    Args:
        p_original: the dropout probability the dense network was trained with, in [0, 1].
        c_original: connections of the layer it feeds before pruning (> 0).
        c_retrain: connections kept now, 0 <= c_retrain <= c_original.

    Returns:
        The dropout probability to retrain with, in [0, p_original].
    """
    if not 0.0 <= p_original <= 1.0:
        raise ValueError(f"adjusted_dropout: expected p_original in [0, 1], got {p_original}")
    if c_original <= 0:
        raise ValueError(f"adjusted_dropout: expected c_original > 0, got {c_original}")
    if not 0 <= c_retrain <= c_original:
        raise ValueError(
            f"adjusted_dropout: expected 0 <= c_retrain <= c_original = {c_original}, "
            f"got {c_retrain}"
        )
    return p_original * math.sqrt(c_retrain / c_original)


def find_dropout_feeds(model: nn.Module) -> dict[str, str]:
    """``{dropout module name: sparse layer name}``: which ``nn.Dropout`` module sits on the input
    of which sparse layer, read from a ``torch.fx`` trace of ``model`` (through element-wise,
    pooling and flatten ops; ``F.dropout`` calls have no module to adjust and are not listed).

    When fx cannot trace the model, falls back to registration order: a dropout module feeds the
    next sparse layer registered after it, with no Linear/Conv in between (right for
    ``nn.Sequential`` stacks). Pass the map explicitly (``HanPruner(dropout_feeds=...)``) when
    neither fits.
    """
    feeds = dropout_feeds(model)
    if feeds is not None:
        return feeds
    layers = sparse_layers(model)
    feeds, pending = {}, None
    for name, m in model.named_modules():
        if isinstance(m, DROPOUT_MODULES):
            pending = name
        elif name in layers:
            if pending is not None:
                feeds[pending] = name
            pending = None
        elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            pending = None
    return feeds


def apply_dropout_adjustment(
    model: nn.Module,
    feeds: dict[str, str],
    p_original: dict[str, float],
    c_original: dict[str, int],
) -> dict[str, float]:
    """Set each dropout module's ``p`` to ``adjusted_dropout(p_o, C_o, C_r)`` of the layer it feeds.

    Args:
        model: the model holding the dropout modules and sparse layers.
        feeds: ``{dropout name: layer name}`` (see :func:`find_dropout_feeds`).
        p_original: ``{dropout name: p before pruning}``.
        c_original: ``{layer name: connections before pruning}``.

    Returns:
        ``{dropout name: new p}``.
    """
    modules = dict(model.named_modules())
    out = {}
    for d, layer in feeds.items():
        c_r = int(modules[layer].mask.count_nonzero())
        p = adjusted_dropout(p_original[d], c_original[layer], c_r)
        modules[d].p = p
        out[d] = p
    return out
