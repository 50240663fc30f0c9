"""Swap a model's dense layers for their sparse versions, in place."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from sparsekern.formats.block_sparse import block_size_pair
from sparsekern.nn._sparse_module import is_sparse_module
from sparsekern.nn.sparse_conv2d import SparseConv2d
from sparsekern.nn.sparse_linear import SparseLinear

__all__ = ["SUPPORTED_LAYERS", "sparse_modules", "sparsify"]

#: dense layer type -> its sparse version
SUPPORTED_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: SparseLinear,
    nn.Conv2d: SparseConv2d,
}


def _targets(layers) -> dict[type[nn.Module], type[nn.Module]]:
    if isinstance(layers, type):
        layers = (layers,)
    supported = ", ".join(f"nn.{t.__name__}" for t in SUPPORTED_LAYERS)
    targets = {}
    for layer in layers:
        if layer not in SUPPORTED_LAYERS:
            got = layer.__name__ if isinstance(layer, type) else repr(layer)
            raise TypeError(f"sparsify: layers must be among ({supported}), got {got}")
        targets[layer] = SUPPORTED_LAYERS[layer]
    return targets


def sparsify(model: nn.Module, layers=(nn.Linear, nn.Conv2d), block_size=None) -> nn.Module:
    """Replace, in place and recursively, every module of ``model`` whose type is exactly one of
    ``layers`` by its sparse version (``nn.Linear -> SparseLinear``, ``nn.Conv2d ->
    SparseConv2d``), via ``from_dense``: the sparse module holds the SAME Parameter objects, so
    outputs are unchanged (masks start all True) and an optimizer already built on
    ``model.parameters()`` keeps working.

    * Already-sparse modules are left alone (and so is everything inside them).
    * Only exact types are swapped: a subclass of ``nn.Linear`` / ``nn.Conv2d`` may have its own
      ``forward`` or be read directly by its parent (``nn.MultiheadAttention.out_proj``), which a
      SparseLinear would silently change.
    * A module registered at several places stays one shared sparse module.
    * If ``model`` itself is one of ``layers``, it cannot be replaced in place: its sparse version
      is returned instead. Otherwise ``model`` itself is returned.

    Args:
        model: any ``nn.Module`` (e.g. torchvision ``alexnet(weights=None)``, ``vgg16``).
        layers: a type or a tuple of types among ``nn.Linear``, ``nn.Conv2d``.
        block_size: ``(bm, bk)`` (or an int): the SparseLinear layers and the groups=1
            SparseConv2d layers run in block mode (the block-sparse kernels skip all-pruned
            blocks; see ``SparseLinear``, ``SparseConv2d``). Default: None.

    Raises:
        TypeError: an entry of ``layers`` is not supported (the message lists what is).
    """
    targets = _targets(layers)
    if block_size is not None:
        block_size_pair(block_size)  # fail before anything is swapped
    converted: dict[int, nn.Module] = {}  # id(dense) -> sparse, for shared modules

    def convert(module: nn.Module) -> nn.Module:
        if id(module) not in converted:
            cls = targets[type(module)]
            blocks = block_size is not None and (cls is SparseLinear or module.groups == 1)
            if blocks:
                converted[id(module)] = cls.from_dense(module, block_size=block_size)
            else:
                converted[id(module)] = cls.from_dense(module)
        return converted[id(module)]

    if type(model) in targets:
        return convert(model)

    def walk(parent: nn.Module) -> None:
        # _modules rather than named_children(): the latter skips a module registered twice under
        # one parent, which would leave its second slot dense.
        for name, child in list(parent._modules.items()):
            if child is None or is_sparse_module(child):
                continue
            if type(child) in targets:
                setattr(parent, name, convert(child))
            else:
                walk(child)

    walk(model)
    return model


def sparse_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every sparse module (SparseLinear, SparseConv2d) in ``model``,
    names as in ``model.named_modules()`` (``""`` for ``model`` itself); shared modules once."""
    for name, module in model.named_modules():
        if is_sparse_module(module):
            yield name, module
