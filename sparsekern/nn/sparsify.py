"""Swap a model's dense layers for their sparse versions, in place, and say what stayed dense."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch import nn

from sparsekern.formats.block_sparse import block_size_pair
from sparsekern.nn._checks import check_model
from sparsekern.nn._hf_resize import keep_masks_on_resize
from sparsekern.nn._sparse_module import is_sparse_module
from sparsekern.nn._swap import find_slots, swap_slots
from sparsekern.nn.compact import CompactSparseLinear
from sparsekern.nn.masks import mask_every_gradient
from sparsekern.nn.sparse_attention import SparseConv1D, SparseMultiheadAttention, is_hf_conv1d
from sparsekern.nn.sparse_conv2d import SparseConv2d
from sparsekern.nn.sparse_linear import SparseLinear

__all__ = [
    "DEFAULT_LAYERS",
    "HF_CONV1D",
    "SUPPORTED_LAYERS",
    "Coverage",
    "coverage",
    "sparse_modules",
    "sparsify",
]

#: dense layer type -> its sparse version
SUPPORTED_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: SparseLinear,
    nn.Conv2d: SparseConv2d,
    nn.MultiheadAttention: SparseMultiheadAttention,
}
#: stands for HF transformers' ``Conv1D`` in ``layers`` (recognised without importing it)
HF_CONV1D = "transformers.Conv1D"
DEFAULT_LAYERS = (nn.Linear, nn.Conv2d, nn.MultiheadAttention, HF_CONV1D)


def _targets(layers) -> tuple[dict[type[nn.Module], type[nn.Module]], bool]:
    if isinstance(layers, (type, str)):
        layers = (layers,)
    supported = ", ".join([f"nn.{t.__name__}" for t in SUPPORTED_LAYERS] + [repr(HF_CONV1D)])
    targets, conv1d = {}, False
    for layer in layers:
        if layer == HF_CONV1D or (isinstance(layer, type) and _is_conv1d_type(layer)):
            conv1d = True
        elif layer in SUPPORTED_LAYERS:
            targets[layer] = SUPPORTED_LAYERS[layer]
        else:
            got = layer.__name__ if isinstance(layer, type) else repr(layer)
            raise TypeError(f"sparsify: expected layers among ({supported}), got {got}")
    return targets, conv1d


def _is_conv1d_type(t: type) -> bool:
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers")


def _take_over_torch_prune(module: nn.Module) -> torch.Tensor | None:
    """If ``torch.nn.utils.prune`` pruned ``module``'s weight (``weight_orig``, ``weight_mask``,
    a forward pre-hook), make ``weight`` a plain Parameter again (``weight_orig * weight_mask``,
    the same Parameter object as ``weight_orig``) and return the mask as bool; else None."""
    from torch.nn.utils import prune

    hooks = [
        h for h in module._forward_pre_hooks.values()
        if isinstance(h, prune.BasePruningMethod) and h._tensor_name == "weight"
    ]  # fmt: skip
    if not hooks:
        return None
    mask = module._buffers["weight_mask"].detach() != 0
    prune.remove(module, "weight")  # weight = orig * mask, as a Parameter; the hook is gone
    return mask


def sparsify(
    model: nn.Module, layers=DEFAULT_LAYERS, block_size=None, storage: str = "dense"
) -> nn.Module:
    """Replace, in place and recursively, every module of ``model`` whose type is exactly one of
    ``layers`` by its sparse version, via ``from_dense``: the sparse module holds the SAME
    Parameter objects, so outputs are unchanged (masks start all True) and an optimizer already
    built on ``model.parameters()`` keeps working.

    * ``nn.Linear -> SparseLinear``, ``nn.Conv2d -> SparseConv2d``,
      ``nn.MultiheadAttention -> SparseMultiheadAttention`` (masks on ``in_proj_weight`` and
      ``out_proj``, honoured in forward and backward), HF transformers' ``Conv1D`` (GPT-2) ->
      ``SparseConv1D`` (pass the class or ``HF_CONV1D``).
    * Already-sparse modules are left alone (and so is everything inside them).
    * Only exact types are swapped: a subclass of ``nn.Linear`` / ``nn.Conv2d`` may have its own
      ``forward`` or be read directly by its parent (``nn.MultiheadAttention.out_proj``), which a
      sparse module there would not see; ``SparseMultiheadAttention`` takes care of its own.
    * A module registered at several places stays one shared sparse module; sparse modules that
      share one weight Parameter share one mask (one mask per Parameter).
    * A weight also used outside its sparse module (a tied embedding, GPT-2's ``lm_head`` and
      ``wte``) gets its gradient masked on every path (``mask_every_gradient``); a warning says so.
    * A module pruned by ``torch.nn.utils.prune`` is taken over: its weight becomes
      ``weight_orig * weight_mask`` and its sparse version's mask is ``weight_mask``.
    * Weight matrices that stay dense are reported (a warning naming them and their share of the
      weights; :func:`coverage` returns the same).
    * If ``model`` itself is one of ``layers``, it cannot be replaced in place: its sparse version
      is returned instead. Otherwise ``model`` itself is returned.

    Args:
        model: any ``nn.Module`` (e.g. torchvision ``alexnet(weights=None)``, ``vit_b_16``).
        layers: types among ``nn.Linear``, ``nn.Conv2d``, ``nn.MultiheadAttention``, HF
            ``Conv1D`` (or ``HF_CONV1D``); default all of them.
        block_size: ``(bm, bk)`` (or an int): the SparseLinear layers and the groups=1
            SparseConv2d layers run in block mode (see ``SparseLinear``). Default: None.
        storage: ``"dense"`` (default: the sparse modules keep the dense ``weight`` Parameter)
            or ``"compact"``: each ``nn.Linear`` (and ``SparseLinear``) becomes a
            ``CompactSparseLinear`` whose trainable parameter is its kept weights only
            (``values [nnz]``; grads and optimizer state the same size; state dict keys
            ``weight``/``bias``/``mask`` as before). Compact layers get NEW Parameters: build the
            optimizer after ``sparsify``. Other layer types keep dense storage.

    Raises:
        TypeError: an entry of ``layers`` is not supported (the message lists what is).
        ValueError: ``storage`` is not ``"dense"``/``"compact"``, or ``"compact"`` with a
            ``block_size``.
    """
    check_model(model, "sparsify")
    if storage not in ("dense", "compact"):
        raise ValueError(f"sparsify: expected storage 'dense' or 'compact', got {storage!r}")
    if storage == "compact" and block_size is not None:
        raise ValueError(
            f"sparsify: expected block_size=None with storage='compact', got {block_size!r} "
            "(block mode keeps dense storage)"
        )
    targets, conv1d = _targets(layers)
    if block_size is not None:
        block_size_pair(block_size)  # fail before anything is swapped

    def wanted(module: nn.Module) -> bool:
        return type(module) in targets or (conv1d and is_hf_conv1d(module))

    def already_sparse(module: nn.Module) -> bool:  # left alone, and everything inside it
        return is_sparse_module(module) or isinstance(module, SparseMultiheadAttention)

    def convert(_name: str, module: nn.Module) -> nn.Module:  # once per module (swap_slots)
        mask = _take_over_torch_prune(module)
        if is_hf_conv1d(module):
            new = SparseConv1D.from_dense(module)
        elif isinstance(module, nn.MultiheadAttention):
            new = SparseMultiheadAttention.from_dense(module)
        else:
            cls = targets[type(module)]
            blocks = block_size is not None and (cls is SparseLinear or module.groups == 1)
            new = cls.from_dense(module, block_size=block_size if blocks else None)
        if mask is not None:
            new.set_mask(mask)
        return new

    slots = find_slots(model, wanted, skip=already_sparse)
    if slots and slots[0][0] is None:  # the model itself is one of layers
        new = swap_slots(model, slots, convert)
        _share_masks_and_mask_tied(new)
        return _compact(new) if storage == "compact" else new
    swap_slots(model, slots, convert)
    _share_masks_and_mask_tied(model)
    keep_masks_on_resize(model)  # HF resize_token_embeddings would drop the LM head's mask
    if storage == "compact":
        model = _compact(model)
    report = coverage(model)
    if report.dense_weights:
        names = ", ".join(report.dense_weights[:6]) + (
            ", ..." if len(report.dense_weights) > 6 else ""
        )
        warnings.warn(
            f"sparsify: {report.dense_fraction:.1%} of the weight-matrix parameters stay dense "
            f"(not in a supported layer): {names}",
            stacklevel=2,
        )
    return model


def _compact(model: nn.Module) -> nn.Module:
    """Every SparseLinear of ``model`` (in place; ``model`` itself if it is one) becomes a
    CompactSparseLinear with its kept weights and mask."""
    if isinstance(model, SparseLinear):
        return CompactSparseLinear.from_dense(model)
    slots = find_slots(
        model, lambda m: isinstance(m, SparseLinear) and m.__dict__.get("block_size") is None
    )
    # in model.modules() order of the parents, each place once (a parent registered at several
    # places is one parent): the order the warnings below come in
    order = {id(m): i for i, m in enumerate(model.modules())}
    places: dict[tuple[int, str], tuple] = {}
    for slot in slots:
        places.setdefault((id(slot[0]), slot[1]), slot)
    kept = []
    for parent, attr, name, child in sorted(places.values(), key=lambda s: order[id(s[0])]):
        if child.__dict__.get("_mask_every_gradient"):
            # a weight tied to another module: new Parameters would untie it
            warnings.warn(
                f"sparsify: a SparseLinear under {type(parent).__name__}.{attr} shares "
                "its weight with another module; it keeps dense storage",
                stacklevel=3,
            )
            continue
        kept.append((parent, attr, name, child))
    swap_slots(model, kept, lambda _name, child: CompactSparseLinear.from_dense(child))
    return model


def _share_masks_and_mask_tied(model: nn.Module) -> None:
    """One mask per weight Parameter: sparse modules sharing a weight share the first one's mask
    buffer; a weight that other (dense) modules also use gets its gradient masked on every
    path."""
    owners: dict[int, nn.Module] = {}
    for _, m in sparse_modules(model):
        w = m.weight
        first = owners.setdefault(id(w), m)
        if first is not m and m._buffers["mask"] is not first._buffers["mask"]:
            m.mask = first._buffers["mask"]  # the same tensor: set_mask on either sets both
    sparse_ids = {id(m.weight) for _, m in sparse_modules(model)}
    users: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in sparse_ids and not is_sparse_module(mod) and not _owns_mask(mod, p):
                users.setdefault(id(p), []).append(f"{mod_name}.{p_name}".lstrip("."))
    for w_id, where in users.items():
        layer = owners[w_id]
        mask_every_gradient(layer)
        warnings.warn(
            f"sparsify: the weight of a sparse layer is also used by {where} (tied weights): its "
            "gradient is masked on every path, so pruned entries stay zero there too",
            stacklevel=3,
        )


def _owns_mask(module: nn.Module, param: torch.Tensor) -> bool:
    # SparseMultiheadAttention holds in_proj_weight itself; its ParameterMask children mask it
    return any(
        getattr(c, "weight", None) is param for c in module.children() if is_sparse_module(c)
    )


def sparse_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every sparse module (SparseLinear, SparseConv2d, ...) in
    ``model``, names as in ``model.named_modules()`` (``""`` for ``model`` itself); shared
    modules once."""
    for name, module in model.named_modules():
        if is_sparse_module(module):
            yield name, module


class Coverage:
    """What ``sparsify`` covered: ``sparse`` (names of the sparse layers), ``dense_weights``
    (names of the weight-matrix parameters, 2 or more dims of size > 1, outside any sparse layer),
    ``sparse_fraction`` / ``dense_fraction`` (of the weight-matrix parameters' elements)."""

    def __init__(self, sparse, dense_weights, covered: int, total: int):
        self.sparse, self.dense_weights = sparse, dense_weights
        self.covered, self.total = covered, total

    @property
    def sparse_fraction(self) -> float:
        return self.covered / self.total if self.total else 1.0

    @property
    def dense_fraction(self) -> float:
        return 1.0 - self.sparse_fraction

    def __repr__(self) -> str:
        return (
            f"Coverage({len(self.sparse)} sparse layers, {self.sparse_fraction:.1%} of the "
            f"weight-matrix parameters; dense: {self.dense_weights})"
        )


def coverage(model: nn.Module) -> Coverage:
    """Which weight matrices of ``model`` are in sparse layers (prunable) and which stay dense.
    Parameters with fewer than two dimensions of size > 1 (biases, norms, per-channel scales such
    as ConvNeXt's ``layer_scale [C, 1, 1]``) are not counted."""
    sparse = list(sparse_modules(model))
    covered_ids = {id(m.weight) for _, m in sparse}
    dense, covered, total = [], 0, 0
    for name, p in model.named_parameters():
        if sum(s > 1 for s in p.shape) < 2:  # biases, norms, per-channel scales [C, 1, 1]
            continue
        total += p.numel()
        if id(p) in covered_ids:
            covered += p.numel()
        else:
            dense.append(name)
    return Coverage([n for n, _ in sparse], dense, covered, total)
