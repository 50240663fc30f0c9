"""Masks of sparse layers whose weight FSDP2 shards (``torch.distributed.fsdp.fully_shard``).

``fully_shard`` turns a layer's ``weight`` into a DTensor sharded on dim 0 over the mesh
(``Shard(0)``: rank r holds rows ``torch.chunk(rows, world)[r]``) and leaves buffers alone, so the
``mask`` buffer would stay a full bool tensor on every rank (``numel`` bytes per rank: a 7B model
keeps 7 GB of masks on each GPU) that no elementwise op can combine with the DTensor weight
(``aten.masked_fill.Scalar got mixed torch.Tensor and DTensor``). :func:`shard_mask` makes the mask
a DTensor with the weight's mesh and placements: each rank holds the mask rows of its weight rows,
and ``set_mask``, the guard, ``count_nonzero``, optimizer-state zeroing and the state dict work on
it unchanged (elementwise ops on two DTensors of one placement run on the local shards).

In the forward FSDP has all-gathered the weight (a plain tensor of the full shape); the mask is
all-gathered with it by a forward pre-hook (the full bool mask, ``numel`` bytes, lives from the
forward to the end of the backward, which saves it for the masked dW) and the DTensor put back by
a forward hook that runs even when the forward raises. So every execution path (vendor with mask,
block, unstructured sparse) sees the full weight and full mask, exactly what one process sees.
Cost: one all-gather of 1 byte per weight per forward (a quarter of an fp32 weight's all-gather).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from sparsekern.nn.masks import note_mask_synced

__all__ = ["is_dtensor", "local_like", "shard_mask", "sharded_weight", "unshard_mask"]


def is_dtensor(t) -> bool:
    return isinstance(t, DTensor)


def local_like(full: torch.Tensor, like: DTensor) -> DTensor:
    """``full`` (the same tensor on every rank, ``like``'s global shape) as a DTensor with
    ``like``'s mesh and placements; each rank keeps its own shard, nothing is communicated."""
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(
            f"local_like: expected a tensor of the sharded tensor's shape {list(like.shape)}, "
            f"got {list(full.shape)}"
        )
    return distribute_tensor(
        full.to(like.device), like.device_mesh, like.placements, src_data_rank=None
    )


def sharded_weight(module: nn.Module) -> DTensor | None:
    """The module's sharded weight (FSDP's DTensor Parameter), also inside the forward where
    FSDP has swapped in the unsharded one; None for a module FSDP does not shard."""
    w = module._parameters.get("weight")
    if isinstance(w, DTensor):
        module.__dict__["_sk_sharded_weight"] = w
        return w
    return module.__dict__.get("_sk_sharded_weight")


def shard_mask(module: nn.Module) -> bool:
    """Make ``module``'s full mask buffer a DTensor sharded like its (DTensor) weight and install
    the forward hooks that all-gather it; returns whether the mask is sharded now. A no-op for a
    weight that is not a DTensor or a mask sharded already. Every rank must hold the same full
    mask (as after ``sparsify`` or a load); only its own rows are kept."""
    w = module._parameters.get("weight")
    mask = module._buffers.get("mask")
    if not isinstance(w, DTensor) or not isinstance(mask, torch.Tensor):
        return isinstance(mask, DTensor)
    sharded_weight(module)
    if not isinstance(mask, DTensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"shard_mask: expected a torch.bool mask, got {mask.dtype}")
        with torch.no_grad():
            dmask = local_like(mask, w)
            w.masked_fill_(~dmask, 0)  # the invariant, on this rank's rows
            if w.grad is not None:
                w.grad.masked_fill_(~dmask, 0)
        module._buffers["mask"] = dmask
        note_mask_synced(module)
    if "_sk_mask_hooks" not in module.__dict__:
        # prepend: before fully_shard's own pre-forward (unshard) hook when it sits on this module
        pre = module.register_forward_pre_hook(_gather_mask, prepend=True)
        post = module.register_forward_hook(_restore_mask, always_call=True)
        module.__dict__["_sk_mask_hooks"] = (pre, post)
    return True


@torch.no_grad()
def _gather_mask(module: nn.Module, args) -> None:
    dmask = module._buffers.get("mask")
    if not isinstance(dmask, DTensor):
        return
    synced = module.__dict__.get("_mask_synced")
    edited = synced is None or synced[0] is not dmask or synced[1] != dmask._version
    full = dmask.full_tensor()
    if edited:
        # the guard of _sparse_module, on the sharded weight: an in-place mask edit (or a new
        # mask buffer) zeroes the newly pruned weights before they are used
        sw = sharded_weight(module)
        if sw is not None:
            sw.masked_fill_(~dmask, 0)
            if sw.grad is not None:
                sw.grad.masked_fill_(~dmask, 0)
        w = module._parameters.get("weight")
        if w is not None and not isinstance(w, DTensor):  # already all-gathered by FSDP
            w.masked_fill_(~full, 0)
    module.__dict__["_sk_dmask"] = dmask
    module._buffers["mask"] = full
    note_mask_synced(module)


def _restore_mask(module: nn.Module, args, output) -> None:
    dmask = module.__dict__.pop("_sk_dmask", None)
    if dmask is not None:
        module._buffers["mask"] = dmask
        note_mask_synced(module)


def unshard_mask(module: nn.Module) -> torch.Tensor:
    """The full mask of ``module`` (all-gathered when sharded; a collective: every rank calls)."""
    mask = module._buffers["mask"]
    return mask.full_tensor() if isinstance(mask, DTensor) else mask
