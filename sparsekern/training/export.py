"""Exports of a pruned model, each checked against the model it came from: Han's relative-index
storage (``save_compressed``) and the block-sparse inference form (``to_inference``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sparsekern.formats.relative_index import load_compressed, save_compressed

__all__ = ["export_block_sparse", "save_compressed_checked"]


def save_compressed_checked(model: nn.Module, path, rebuild: Callable[[], nn.Module]) -> dict:
    """``save_compressed(model, path)``, then load the file into ``rebuild()`` (a fresh model of
    the same architecture) and check that every state-dict tensor is bit-identical.

    Returns:
        ``save_compressed``'s report plus ``{"path": file name, "round_trip": "exact"}``.

    Raises:
        RuntimeError: naming the first tensor that differs after the round trip.
    """
    path = Path(path)
    report = save_compressed(model, path)
    back = load_compressed(path, rebuild()).state_dict()
    for k, v in model.state_dict().items():
        if k not in back or not torch.equal(v.cpu(), back[k].cpu()):
            raise RuntimeError(
                f"{path}: expected save_compressed / load_compressed to give the model back bit "
                f"for bit, got a different {k}"
            )
    return {"path": path.name, **report, "round_trip": "exact"}


def export_block_sparse(
    model: nn.Module,
    example: torch.Tensor,
    block: int,
    path,
    rebuild: Callable[[], nn.Module],
    rtol: float = 1e-4,
) -> dict:
    """``sparsekern.nn.to_inference(model, block_size=(block, block))``: the SparseLinear layers
    become BlockSparseLinear and the groups=1 SparseConv2d layers BlockSparseConv2d (only blocks
    holding a kept weight are stored; grouped convs stay masked). The exported model goes to
    ``path`` through ``sparsekern.save_inference`` (atomic, SHA-256 checked; read it back with
    ``load_inference(path, to_inference(rebuild(), block_size=...))``). Checked: the reloaded
    model gives the masked model's logits on ``example`` ``[B, ...]`` (fp32, eval mode) within
    ``rtol`` of their largest magnitude (the same products summed in another order).

    Returns:
        ``{"status", "path", "block_size", "layers": {name: {"weights_kept", "blocks_stored"}},
        "file_bytes", "max_abs_diff"}``.

    Raises:
        RuntimeError: the reloaded model's logits are further off.
    """
    from sparsekern.nn import BlockSparseConv2d, BlockSparseLinear, sparse_modules, to_inference
    from sparsekern.nn.inference import load_inference, save_inference

    path = Path(path)
    model.eval()
    inf = to_inference(model, block_size=(block, block))
    save_inference(inf, path)  # atomic, checksummed: a killed save keeps the previous export
    back = load_inference(path, to_inference(rebuild(), block_size=(block, block)))
    back.eval()
    with torch.no_grad():
        ref, got = model(example), back(example)
    diff = float((ref - got).abs().max())
    tol = rtol * max(1.0, float(ref.abs().max()))
    if diff > tol:
        raise RuntimeError(
            f"block-sparse export {path}: expected logits within {tol:.2e} of the masked model, "
            f"got max |diff| {diff:.3e}"
        )
    kept = {n: float(m.density) for n, m in sparse_modules(model)}
    layers = {
        n: {"weights_kept": kept[n], "blocks_stored": float(m.density)}
        for n, m in back.named_modules()
        if isinstance(m, (BlockSparseLinear, BlockSparseConv2d))
    }
    return {
        "status": f"ok, {len(layers)} layers block-sparse, max |logit diff| {diff:.2e}",
        "path": path.name,
        "block_size": [block, block],
        "layers": layers,  # blocks_stored >= weights_kept: a block holding one kept weight stays
        "file_bytes": path.stat().st_size,
        "max_abs_diff": diff,
    }
