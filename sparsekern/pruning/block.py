"""Block pruning: keep whole ``bm x bk`` blocks of each weight, chosen by their norm, so that the
block-sparse kernels can skip the rest (``SparseLinear(block_size=...)``, ``to_inference``).

A block's score is the L1 or L2 norm of its surviving weights divided by its number of in-bounds
weights (``mean |w|`` or ``sqrt(mean w^2)``), so the ragged edge blocks of a matrix whose sizes are
not multiples of the block compete fairly with full ones. Conv weights ``[out, in, kh, kw]`` are
blocked on their TAP-MAJOR GEMM view ``[out, kh*kw*in_pad]`` (``bm`` output x ``bk`` input
channels of one kernel tap per block), the matrix the block-sparse conv kernels skip blocks of
(``sparsekern.ops.block_sparse_conv2d``).

Per layer (``scope="layer"``) every layer keeps ``round(density x its blocks)`` blocks; globally
(``scope="global"``) one score threshold over all layers keeps ``density`` of all blocks (by count,
weighted by block size), with an optional per-layer floor ``min_density``.

Example::

    model = sparsify(MyNet(), block_size=(32, 32))     # SparseLinear layers in block mode
    prune_blocks_(model, density=0.1, norm="l2", optimizer=opt)
    ...train...                                          # the kernels skip 90% of the blocks
    fast = to_inference(model)                           # BlockSparseLinear: kept blocks only
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.formats.block_sparse import block_grid, block_size_pair
from sparsekern.nn.masks import set_mask
from sparsekern.ops.block_sparse_conv2d import conv_weight_from_gemm, conv_weight_to_gemm
from sparsekern.pruning._layers import require_sparse_layers, resolve_per_layer

__all__ = ["block_scores", "block_magnitude_mask", "expand_block_mask", "prune_blocks_"]

NORMS = ("l1", "l2")


def _gemm_view(t: torch.Tensor, bk: int) -> torch.Tensor:
    """Linear ``[out, in]`` as is; conv ``[out, in, kh, kw]`` -> ``[out, kh*kw*in_pad]``."""
    return t if t.dim() == 2 else conv_weight_to_gemm(t, bk)


def block_scores(
    weight: torch.Tensor, block_size, norm: str = "l1", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[R, C]`` float64 scores of the blocks of ``weight`` (``[out, in]`` or a conv weight on
    its ``[out, in*kh*kw]`` view): mean |w| (l1) or sqrt(mean w^2) (l2) over the block's in-bounds
    weights, counting only those kept by ``mask`` (pruned weights count as 0)."""
    if norm not in NORMS:
        raise ValueError(f"block_scores: norm must be one of {NORMS}, got {norm!r}")
    bm, bk = block_size_pair(block_size)
    w = weight.detach().double()
    if mask is not None:
        w = w * mask
    inside = _gemm_view(torch.ones_like(w), bk)  # 0 at the per-tap channel padding of a conv
    w = _gemm_view(w, bk)
    rows, cols = w.shape
    R, C = block_grid((rows, cols), (bm, bk))
    pad = (0, C * bk - cols, 0, R * bm - rows)
    v = w.abs() if norm == "l1" else w * w
    total = torch.nn.functional.pad(v, pad).view(R, bm, C, bk).sum(dim=(1, 3))
    ones = torch.nn.functional.pad(inside, pad).view(R, bm, C, bk).sum(dim=(1, 3))
    mean = total / ones
    return mean if norm == "l1" else mean.sqrt()


def expand_block_mask(blocks: torch.Tensor, shape, block_size) -> torch.Tensor:
    """``[R, C]`` bool -> a bool mask of ``shape`` (a weight's shape; conv weights through their
    tap-major view), True inside the kept blocks."""
    bm, bk = block_size_pair(block_size)
    full = blocks.repeat_interleave(bm, 0).repeat_interleave(bk, 1)[: shape[0]]
    if len(shape) == 2:
        return full[:, : shape[1]].contiguous()
    return conv_weight_from_gemm(full, tuple(shape), bk)


def _top_blocks(scores: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        keep[torch.topk(scores.flatten(), k).indices] = True
    return keep.view_as(scores)


def _check_density(density: float, who: str) -> float:
    d = float(density)
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"{who}: density must be in [0, 1], got {density}")
    return d


def block_magnitude_mask(
    weight: torch.Tensor,
    block_size,
    density: float,
    norm: str = "l1",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A bool mask of ``weight``'s shape keeping the ``round(density x blocks)`` highest-scoring
    blocks (see :func:`block_scores`), ANDed with ``mask`` if given (nothing regrows)."""
    d = _check_density(density, "block_magnitude_mask")
    scores = block_scores(weight, block_size, norm, mask)
    blocks = _top_blocks(scores, round(d * scores.numel()))
    out = expand_block_mask(blocks, weight.shape, block_size)
    return out & mask if mask is not None else out


def _layer_block(module: nn.Module, block_size) -> tuple[int, int]:
    if block_size is not None:
        return block_size_pair(block_size)
    own = getattr(module, "block_size", None)
    if own is None:
        raise ValueError(
            f"prune_blocks_: expected block_size=(bm, bk) or layers in block mode, got a "
            f"{type(module).__name__} without a block size"
        )
    return block_size_pair(own)


def prune_blocks_(
    model: nn.Module,
    density: float | dict,
    block_size=None,
    norm: str = "l1",
    scope: str = "layer",
    min_density: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """Prune ``model``'s sparse layers to whole blocks, in place (through ``set_mask``: pruned
    weights and their optimizer state zeroed). Returns ``{layer: kept fraction of weights}``.

    Args:
        model: a model with sparse layers (``sparsify``).
        density: kept fraction of blocks: a number, or per layer / kind (``{"fc1": 0.1, "conv":
            0.5, "*": 0.2}``; layers matching no key are left alone). ``scope="global"`` takes
            one number.
        block_size: ``(bm, bk)``; default: each layer's own block size (SparseLinear block mode).
        norm: ``"l1"`` or ``"l2"`` (per-weight mean, see :func:`block_scores`).
        scope: ``"layer"`` (each layer keeps its own fraction) or ``"global"`` (one threshold).
        min_density: global scope only: every layer keeps at least this fraction of its blocks.
        optimizer: whose state for pruned weights is zeroed.
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"prune_blocks_: scope must be 'layer' or 'global', got {scope!r}")
    if norm not in NORMS:
        raise ValueError(f"prune_blocks_: norm must be one of {NORMS}, got {norm!r}")
    layers = require_sparse_layers(model, "prune_blocks_")
    blocks = {n: _layer_block(m, block_size) for n, m in layers.items()}  # validate all first
    _check_density(min_density, "prune_blocks_ (min_density)")
    scores = {n: block_scores(m.weight, blocks[n], norm, m.mask) for n, m in layers.items()}
    if scope == "layer":
        per = resolve_per_layer(layers, density, "prune_blocks_ density")
        for d in per.values():
            if d is not None:
                _check_density(d, "prune_blocks_")
        keep = {
            n: _top_blocks(scores[n], round(d * scores[n].numel()))
            for n, d in per.items()
            if d is not None
        }
    else:
        if isinstance(density, dict):
            raise TypeError("prune_blocks_: scope='global' takes one density, got a dict")
        d = _check_density(density, "prune_blocks_")
        # The floor first, then the best of the rest by one threshold, by weight count.
        keep = {n: _top_blocks(s, round(min_density * s.numel())) for n, s in scores.items()}
        size = {n: blocks[n][0] * blocks[n][1] for n in layers}
        total = sum(s.numel() * size[n] for n, s in scores.items())
        budget = d * total - sum(int(k.sum()) * size[n] for n, k in keep.items())
        cand = [
            (float(v), size[n], n, i)
            for n, s in scores.items()
            for i, v in enumerate(s.flatten().tolist())
            if not keep[n].view(-1)[i]
        ]
        cand.sort(key=lambda t: -t[0])
        for _, sz, n, i in cand:
            if budget < sz / 2:
                break
            keep[n].view(-1)[i] = True
            budget -= sz
    kept = {}
    for n, k in keep.items():
        m = layers[n]
        new = expand_block_mask(k, m.weight.shape, blocks[n]) & m.mask
        set_mask(m, new, optimizer)
        kept[n] = int(new.count_nonzero()) / new.numel()
    return kept
