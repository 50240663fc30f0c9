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
weighted by block size). In both, every layer keeps at least the floor ``min_density`` gives
(``max(1, ceil(min_density x blocks))`` blocks; None, the default: ``min(0.01, density / 2)``, so
at least one block), with a RuntimeWarning where the floor overrides a per-layer target: a
layer is emptied only with ``min_density=0``.

Example::

    model = sparsify(MyNet(), block_size=(32, 32))     # SparseLinear layers in block mode
    prune_blocks_(model, density=0.1, norm="l2", optimizer=opt)
    ...train...                                          # the kernels skip 90% of the blocks
    fast = to_inference(model)                           # BlockSparseLinear: kept blocks only
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from sparsekern.formats.block_sparse import block_grid, block_size_pair
from sparsekern.nn.masks import set_mask
from sparsekern.ops.block_sparse_conv2d import conv_weight_from_gemm, conv_weight_to_gemm
from sparsekern.pruning._common import auto_min_density, warn_collapsed
from sparsekern.pruning._layers import require_sparse_layers, resolve_per_layer
from sparsekern.pruning._vocab import renamed_keywords
from sparsekern.pruning.base import BasePruner, Closure
from sparsekern.pruning.importance import check_finite, floor_count

__all__ = [
    "BlockPruner",
    "block_magnitude_mask",
    "block_masks",
    "block_scores",
    "expand_block_mask",
    "prune_blocks_",
]

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


@renamed_keywords
def block_masks(
    layers: dict[str, nn.Module],
    density: float | dict,
    block_size=None,
    norm: str = "l1",
    scope: str = "layer",
    min_density: float | None = None,
) -> dict[str, torch.Tensor]:
    """The masks :func:`prune_blocks_` installs, computed without touching the layers:
    ``{layer: bool mask of its weight's shape}`` (whole kept blocks, ANDed with the current
    mask), for the layers the density covers. Arguments as :func:`prune_blocks_`, ``layers``
    a ``{name: sparse module}`` dict."""
    if scope not in ("layer", "global"):
        raise ValueError(f"prune_blocks_: scope must be 'layer' or 'global', got {scope!r}")
    if norm not in NORMS:
        raise ValueError(f"prune_blocks_: norm must be one of {NORMS}, got {norm!r}")
    if density is None or isinstance(density, bool):
        # resolve_per_layer reads None as "leave every layer alone": here that would be a silent
        # no-op ({}), never what a caller of a pruning function wants
        raise TypeError(
            "prune_blocks_: expected density a number in [0, 1] or a {layer / kind: density} "
            f"dict, got {density!r}"
        )
    blocks = {n: _layer_block(m, block_size) for n, m in layers.items()}  # validate all first
    if min_density is not None:
        _check_density(min_density, "prune_blocks_ (min_density)")
    for n, m in layers.items():
        check_finite(m.weight, n, "prune_blocks_")
    if scope == "layer":
        per = resolve_per_layer(layers, density, "prune_blocks_ density")
        for d in per.values():
            if d is not None:
                _check_density(d, "prune_blocks_")
        scores = {
            n: block_scores(m.weight, blocks[n], norm, m.mask)
            for n, m in layers.items()
            if per[n] is not None
        }
        keep, raised = {}, []
        for n, s in scores.items():
            md = auto_min_density(1.0 - per[n]) if min_density is None else min_density
            target = round(per[n] * s.numel())
            k = max(target, floor_count(md, s.numel()))
            if k > target:
                raised.append(f"{n} ({k} of {s.numel()} blocks kept, target {target})")
            keep[n] = _top_blocks(s, k)
        if raised:
            warnings.warn(
                f"prune_blocks_: the min_density floor keeps more blocks than the target in "
                f"{', '.join(raised)} (a layer is never emptied unless min_density=0)",
                RuntimeWarning,
                stacklevel=3,
            )
    else:
        if isinstance(density, dict):
            raise TypeError("prune_blocks_: scope='global' takes one density, got a dict")
        d = _check_density(density, "prune_blocks_")
        md = auto_min_density(1.0 - d) if min_density is None else min_density
        scores = {n: block_scores(m.weight, blocks[n], norm, m.mask) for n, m in layers.items()}
        # The floor first, then the best of the rest by one threshold, by weight count.
        keep = {n: _top_blocks(s, floor_count(md, s.numel())) for n, s in scores.items()}
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
    out = {
        n: expand_block_mask(k, layers[n].weight.shape, blocks[n]) & layers[n].mask
        for n, k in keep.items()
    }
    if min_density == 0:
        warn_collapsed(out, "prune_blocks_")
    return out


@renamed_keywords
def prune_blocks_(
    model: nn.Module,
    density: float | dict,
    block_size=None,
    norm: str = "l1",
    scope: str = "layer",
    min_density: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """Prune ``model``'s sparse layers to whole blocks, in place (through ``set_mask``: pruned
    weights and their optimizer state zeroed). Returns ``{layer: kept fraction of weights}`` for
    the layers it pruned. The functional form of :class:`BlockPruner` (whose target is a
    sparsity, ``1 - density``).

    Args:
        model: a model with sparse layers (``sparsify``).
        density: kept fraction of blocks: a number, or per layer / kind (``{"fc1": 0.1, "conv":
            0.5, "*": 0.2}``; layers matching no key are left alone). ``scope="global"`` takes
            one number.
        block_size: ``(bm, bk)``; default: each layer's own block size (SparseLinear block mode).
        norm: ``"l1"`` or ``"l2"`` (per-weight mean, see :func:`block_scores`).
        scope: ``"layer"`` (each layer keeps its own fraction) or ``"global"`` (one threshold).
        min_density: every layer keeps at least ``max(1, ceil(min_density x blocks))`` blocks
            (a RuntimeWarning where that overrides a per-layer target); None (default):
            ``min(0.01, density / 2)``; 0: no floor (an emptied layer is warned about).
        optimizer: whose state for pruned weights is zeroed.
    """
    layers = require_sparse_layers(model, "prune_blocks_")
    masks = block_masks(layers, density, block_size, norm, scope, min_density)
    kept = {}
    for n, new in masks.items():
        set_mask(layers[n], new, optimizer)
        kept[n] = int(new.count_nonzero()) / new.numel()
    return kept


class BlockPruner(BasePruner):
    """Block pruning behind the :class:`BasePruner` lifecycle: whole ``bm x bk`` blocks of each
    weight kept by their norm, so that the block-sparse kernels skip the rest.

    Lifecycle::

        model = sparsify(MyNet(), block_size=(32, 32))
        pruner = BlockPruner(model, opt, sparsity=0.9, norm="l2")   # 90% of the blocks pruned
        ... train; kept = pruner.prune(); ... fine-tune; fast = to_inference(model)

    Args:
        model, optimizer, sparsity, schedule, layers, regularization, reg_strength: see
            :class:`BasePruner`; the sparsity is the pruned fraction of *blocks*, per layer
            (``scope="layer"``, a number or a per-layer dict) or overall (``"global"``).
        block_size: ``(bm, bk)``; default: each layer's own block size.
        norm: ``"l1"`` or ``"l2"``.
        scope: ``"layer"`` or ``"global"``.
        min_density: the floor of :func:`prune_blocks_` (default None: at least one block).
    """

    per_layer_targets = True
    monotone = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        block_size=None,
        norm: str = "l1",
        scope: str = "layer",
        min_density: float | None = None,
        **base,
    ) -> None:
        super().__init__(model, optimizer, **base)
        sparsity = base.get("sparsity")
        if scope not in ("layer", "global"):
            raise ValueError(f"BlockPruner: expected scope 'layer' or 'global', got {scope!r}")
        if norm not in NORMS:
            raise ValueError(f"BlockPruner: expected norm in {NORMS}, got {norm!r}")
        for m in self.layers.values():
            _layer_block(m, block_size)  # every layer has a block size
        self.block_size = None if block_size is None else list(block_size_pair(block_size))
        self.norm, self.scope = norm, scope
        if min_density is not None:
            min_density = _check_density(min_density, "BlockPruner (min_density)")
        self.min_density = min_density
        if scope == "global" and isinstance(sparsity, dict):
            raise TypeError("BlockPruner: scope='global' takes one sparsity, got a dict")

    @torch.no_grad()
    def compute_masks(self, sparsity, closure: Closure | None = None) -> dict:
        """Keep ``1 - sparsity`` of the blocks (per layer or globally) by :func:`block_scores`."""
        if isinstance(sparsity, dict):
            per = self._per_layer(sparsity)
            density = {n: 1.0 - s for n, s in per.items() if s is not None}
        else:
            density = 1.0 - sparsity
        bs = None if self.block_size is None else tuple(self.block_size)
        return block_masks(self.layers, density, bs, self.norm, self.scope, self.min_density)

    def _config(self) -> dict:
        return {
            "block_size": self.block_size,
            "norm": self.norm,
            "scope": self.scope,
            "min_density": self.min_density,
        }
