"""Masks through HF transformers' ``resize_token_embeddings``.

HF resizes the LM head by building a new plain ``nn.Linear`` (an untied head, LLaMA: the sparse
head and its mask would be gone) or by re-tying the head to the new, larger embedding weight (a
tied head, GPT-2: the mask would keep the old vocabulary size). ``sparsify`` wraps the model's
``resize_token_embeddings`` with :func:`keep_masks_on_resize`: after the resize the head is a
sparse layer again, with its mask resized: the old tokens' rows as they were, the new tokens'
rows kept (they are new weights, pruned by the next pruning step like any other).
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.nn.masks import mask_every_gradient, set_mask

__all__ = ["keep_masks_on_resize"]


class _ResizeKeepingMasks:
    """The model's ``resize_token_embeddings``, keeping the sparse LM head's mask (module
    docstring). Picklable; a deep copy follows the model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args, **kwargs):
        model = self.model
        head = model.get_output_embeddings()
        old = head._buffers.get("mask") if isinstance(head, nn.Module) else None
        old = None if old is None else old.clone()
        result = type(model).resize_token_embeddings(model, *args, **kwargs)
        if old is None:
            return result
        head = model.get_output_embeddings()
        w = head.weight
        mask = torch.ones(w.shape, dtype=torch.bool, device=w.device)
        rows, cols = min(old.shape[0], w.shape[0]), min(old.shape[1], w.shape[1])
        mask[:rows, :cols] = old[:rows, :cols].to(w.device)
        if "mask" not in head._buffers:  # replaced by a plain nn.Linear
            from sparsekern.nn.sparse_linear import SparseLinear

            if type(head) is not nn.Linear:
                raise TypeError(
                    "resize_token_embeddings: expected the resized LM head as an nn.Linear to "
                    f"make sparse again, got {type(head).__name__}; its mask is lost"
                )
            head = SparseLinear.from_dense(head)
            model.set_output_embeddings(head)
        else:  # re-tied to the new embedding weight: the buffer takes the new shape
            head._buffers["mask"] = torch.ones_like(mask)
        set_mask(head, mask)
        embed = model.get_input_embeddings()
        if embed is not None and getattr(embed, "weight", None) is head.weight:
            mask_every_gradient(head)  # a tied weight: its gradient masked on every path
        return result


def keep_masks_on_resize(model: nn.Module) -> None:
    """Wrap ``model.resize_token_embeddings`` (HF transformers' models) so that a resize keeps the
    sparse LM head and resizes its mask (module docstring). Other models: nothing."""
    if callable(getattr(type(model), "resize_token_embeddings", None)) and callable(
        getattr(model, "get_output_embeddings", None)
    ):
        model.__dict__["resize_token_embeddings"] = _ResizeKeepingMasks(model)
