"""Keeping masks through HF transformers' ``save_pretrained`` / ``from_pretrained``.

``save_pretrained`` writes the state dict, the sparse layers' ``mask`` buffers included; a plain
``from_pretrained`` builds the dense model, lists the masks as unexpected keys and drops them. Load
through :func:`from_pretrained` instead (it sparsifies the fresh model and installs the masks it
reads back from the checkpoint), or call :func:`load_masks` on a model you built yourself::

    model = sparsekern.sparsify(GPT2LMHeadModel(config))
    ...  # prune, train
    model.save_pretrained("ckpt")
    model = sparsekern.nn.hf.from_pretrained(GPT2LMHeadModel, "ckpt")  # masks back, exact

No import of transformers here: the model class is yours.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from sparsekern.nn.masks import set_mask
from sparsekern.nn.sparsify import DEFAULT_LAYERS, sparse_modules, sparsify

__all__ = ["checkpoint_state_dict", "from_pretrained", "load_masks"]


def checkpoint_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an HF checkpoint folder (``model.safetensors``, sharded safetensors with
    their index, or ``pytorch_model.bin``, read with ``weights_only=True``) or of one file."""
    path = Path(path)
    files: list[Path]
    if path.is_file():
        files = [path]
    else:
        index = next((path / n for n in ("model.safetensors.index.json",
                                          "pytorch_model.bin.index.json")
                      if (path / n).exists()), None)  # fmt: skip
        if index is not None:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [path / s for s in shards]
        else:
            files = [
                p for n in ("model.safetensors", "pytorch_model.bin") if (p := path / n).exists()
            ]
    if not files:
        raise FileNotFoundError(
            f"checkpoint_state_dict: expected model.safetensors or pytorch_model.bin in {path}, "
            f"found {sorted(p.name for p in path.iterdir()) if path.is_dir() else 'no such file'}"
        )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(f)))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def load_masks(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Install every ``<layer>.mask`` of ``state_dict`` on ``model``'s sparse layer of that name
    (``set_mask``: the pruned weights are zeroed). All are checked before any is installed.
    Returns the names of the layers that got a mask; sparse layers with no mask in
    ``state_dict`` keep theirs."""
    todo = []
    for name, module in sparse_modules(model):
        key = f"{name}.mask" if name else "mask"
        if key in state_dict:
            mask = state_dict[key]
            if mask.shape != module.weight.shape:
                raise ValueError(
                    f"load_masks: expected {key} of the weight's shape "
                    f"{list(module.weight.shape)}, got {list(mask.shape)}"
                )
            todo.append((name, module, mask.to(module.weight.device) != 0))
    for _, module, mask in todo:
        set_mask(module, mask)
    return [n for n, _, _ in todo]


def from_pretrained(model_cls, path: str | os.PathLike, *args, layers=DEFAULT_LAYERS, **kwargs):
    """``model_cls.from_pretrained(path, ...)``, sparsified (``layers`` as in ``sparsify``), with
    the masks the checkpoint holds installed: the model that ``save_pretrained`` saved."""
    model = model_cls.from_pretrained(path, *args, **kwargs)
    model = sparsify(model, layers=layers)
    load_masks(model, checkpoint_state_dict(path))
    return model
