"""Finding the sparse layers of a model and telling conv from FC."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sparsekern.nn._sparse_module import is_sparse_module


def sparse_layers(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """``{name: module}`` for the sparse modules of ``model`` (``SparseLinear``, ``SparseConv2d``,
    anything with a ``mask`` buffer), in ``named_modules`` order; restricted to ``names`` if
    given (an unknown name raises ``KeyError`` listing the sparse layers)."""
    found = {
        n: m
        for n, m in model.named_modules()
        if is_sparse_module(m) or isinstance(m._buffers.get("mask"), torch.Tensor)
    }
    _refuse_weights_read_by_parents(model, found)
    if names is None:
        return found
    names = list(names)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise KeyError(f"expected names of sparse layers {list(found)}, got unknown {unknown}")
    return {n: found[n] for n in names}


def _refuse_weights_read_by_parents(model: nn.Module, found: dict[str, nn.Module]) -> None:
    """Raise for a sparse layer whose weight its parent reads directly, bypassing the layer's
    forward (so its mask is honoured neither in forward nor in backward): a SparseLinear put by
    hand as a plain ``nn.MultiheadAttention``'s ``out_proj``. ``SparseMultiheadAttention``
    (what ``sparsify`` makes) applies the masks itself."""
    from sparsekern.nn.sparse_attention import SparseMultiheadAttention

    for parent_name, parent in model.named_modules():
        if isinstance(parent, nn.MultiheadAttention) and not isinstance(
            parent, SparseMultiheadAttention
        ):
            child = parent._modules.get("out_proj")
            if child is not None and any(child is m for m in found.values()):
                name = f"{parent_name}.out_proj".lstrip(".")
                raise ValueError(
                    f"sparse layer {name!r} is read directly by its parent, a plain "
                    "nn.MultiheadAttention (its forward uses out_proj.weight, not out_proj's "
                    "forward): its mask would be ignored. Expected a SparseMultiheadAttention "
                    "there: run sparsekern.sparsify(model) on the attention instead"
                )


def require_sparse_layers(model: nn.Module, who: str) -> dict[str, nn.Module]:
    layers = sparse_layers(model)
    if not layers:
        raise ValueError(
            f"{who}: expected a model with sparse layers (run sparsekern.sparsify(model) first), "
            f"got a {type(model).__name__} with none"
        )
    return layers


def layer_kind(module: nn.Module) -> str:
    """``"conv"`` for a convolution (weight of 3 or more dims, ``[out, in/g, kh, kw]``), ``"fc"``
    for a fully connected layer (weight ``[out, in]``)."""
    return "conv" if module.weight.dim() > 2 else "fc"


def resolve_per_layer(layers: dict[str, nn.Module], value, what: str) -> dict[str, float | None]:
    """Expand ``value`` (a number, or a dict) into ``{layer name: number or None}``.

    A dict is looked up per layer by the layer's name first, then by its kind (``"conv"`` or
    ``"fc"``), then by ``"*"`` (any layer); a layer matching none gets None (left alone). Keys
    that are neither layer names, kinds nor ``"*"`` raise ``KeyError``: a typo must not silently
    leave a layer unpruned.
    """
    if value is None:
        return dict.fromkeys(layers)
    if not isinstance(value, dict):
        return {n: float(value) for n in layers}
    allowed = set(layers) | {"conv", "fc", "*"}
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise KeyError(
            f"{what}: expected keys among the sparse layers {list(layers)}, 'conv', 'fc' or '*', "
            f"got unknown {unknown}"
        )
    out: dict[str, float | None] = {}
    for n, m in layers.items():
        for key in (n, layer_kind(m), "*"):
            if key in value and value[key] is not None:
                out[n] = float(value[key])
                break
        else:
            out[n] = None
    return out
