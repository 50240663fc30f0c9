"""Block-sparse inference: ``BlockSparseLinear`` (a layer that stores only its kept blocks) and
``to_inference`` (a pruned model -> one whose Linear weights are ``BlockSparseMatrix``).

Memory and the state dict fall with density: a ``BlockSparseLinear`` holds ``values [nnz, bm, bk]``
plus ``row_ptr`` (int32, one per block-row + 1) and ``col_idx`` (int32, one per stored block), i.e.
``nnz*bm*bk*itemsize + 4*(R + 1 + nnz)`` bytes against ``out*in*itemsize`` dense. At 32x32 fp32
blocks the metadata is 4 bytes per 4096 of values (0.1%).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sparsekern.formats.block_sparse import BlockSparseMatrix, _pair
from sparsekern.nn.sparse_linear import SparseLinear
from sparsekern.ops.block_sparse_linear import block_sparse_linear

__all__ = ["BlockSparseLinear", "DEFAULT_BLOCK", "to_inference"]

DEFAULT_BLOCK = (32, 32)


class BlockSparseLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` a :class:`BlockSparseMatrix` ``(out_features,
    in_features)``: only stored blocks exist, in memory and in the state dict.

    Parameters: ``values [nnz, bm, bk]`` (trainable at a fixed layout: its gradient covers stored
    blocks only) and ``bias [out_features]`` or None. Buffers: ``row_ptr [ceil(out/bm) + 1]``,
    ``col_idx [nnz]`` (int32). ``shape`` and ``block_size`` travel as extra state. Loading a state
    dict replaces the layout (any nnz), validated as a ``BlockSparseMatrix``.
    """

    def __init__(self, weight: BlockSparseMatrix, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(weight, BlockSparseMatrix):
            raise TypeError(
                f"BlockSparseLinear: weight must be a BlockSparseMatrix, got "
                f"{type(weight).__name__}"
            )
        self.out_features, self.in_features = weight.shape
        self.block_size = weight.block_size
        self.values = nn.Parameter(weight.values.detach().clone())
        self.register_buffer("row_ptr", weight.row_ptr.clone())
        self.register_buffer("col_idx", weight.col_idx.clone())
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(
                    f"BlockSparseLinear: bias must have shape ({self.out_features},), got "
                    f"{tuple(bias.shape)}"
                )
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("bias", None)
        self._matrix: BlockSparseMatrix | None = None

    @classmethod
    def from_sparse(cls, layer: nn.Linear, block_size=None) -> BlockSparseLinear:
        """From a ``SparseLinear`` (blocks holding any kept weight are stored, as ``weight*mask``)
        or a plain ``nn.Linear`` (blocks holding any nonzero). ``block_size``: default the layer's
        own block size in block mode, else :data:`DEFAULT_BLOCK`."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(
                f"BlockSparseLinear.from_sparse: expected an nn.Linear / SparseLinear, got "
                f"{type(layer).__name__}"
            )
        if block_size is None:
            block_size = getattr(layer, "block_size", None) or DEFAULT_BLOCK
        mask = layer._buffers.get("mask")
        with torch.no_grad():
            w = BlockSparseMatrix.from_dense(layer.weight.detach(), _pair(block_size), mask=mask)
        new = cls(w, None if layer.bias is None else layer.bias.detach())
        new.values.requires_grad_(layer.weight.requires_grad)
        new.train(layer.training)
        return new

    @property
    def weight(self) -> BlockSparseMatrix:
        """The layer's ``BlockSparseMatrix``; its ``values`` is the ``values`` Parameter."""
        m = self._matrix
        if m is None or m.values is not self.values or m.row_ptr is not self.row_ptr:
            # Rebuilt after .to(), a load or a cast (derived metadata costs a few small ops).
            m = BlockSparseMatrix(
                self.values,
                self.row_ptr,
                self.col_idx,
                (self.out_features, self.in_features),
                self.block_size,
                _validate=False,
            )
            self._matrix = m
        return m

    @property
    def density(self) -> float:
        """Stored fraction of the block grid."""
        return self.weight.density

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``[..., in_features] -> [..., out_features]``."""
        return block_sparse_linear(input, self.weight, self.bias)

    def to_dense(self) -> torch.Tensor:
        """``[out_features, in_features]``: the dense weight (zeros outside stored blocks)."""
        return self.weight.to_dense()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, block_size={self.block_size}, "
            f"nnz_blocks={self.values.shape[0]}, density={self.density:.4f}"
        )

    def get_extra_state(self):
        return {
            "shape": [self.out_features, self.in_features],
            "block_size": list(self.block_size),
        }

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or "shape" not in state or "block_size" not in state:
            raise ValueError(
                f"BlockSparseLinear: expected extra state {{'shape', 'block_size'}}, got {state!r}"
            )
        shape = tuple(state["shape"])
        if shape != (self.out_features, self.in_features):
            raise ValueError(
                f"BlockSparseLinear: expected shape {(self.out_features, self.in_features)}, "
                f"got {shape} in the state dict"
            )
        if _pair(state["block_size"]) != self.block_size:  # loaded with the tensors above
            raise ValueError(
                f"BlockSparseLinear: expected block_size {self.block_size}, got "
                f"{tuple(state['block_size'])} in the state dict"
            )

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_matrix"] = None  # derived; rebuilt on first use
        return state

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # The stored layout may have any number of blocks: replace the tensors instead of copying
        # into same-shaped ones, after validating the whole matrix.
        keys = [prefix + k for k in ("values", "row_ptr", "col_idx")]
        extra = state_dict.get(prefix + "_extra_state")
        if all(k in state_dict for k in keys):
            block = self.block_size
            if isinstance(extra, dict) and "block_size" in extra:
                block = tuple(extra["block_size"])
            try:
                m = BlockSparseMatrix(
                    state_dict[keys[0]],
                    state_dict[keys[1]],
                    state_dict[keys[2]],
                    (self.out_features, self.in_features),
                    block,
                )
            except ValueError as e:
                error_msgs.append(f"While loading {prefix!r}: {e}")
                return
            dev = self.values.device
            with torch.no_grad():
                self.values = nn.Parameter(
                    m.values.to(dev, self.values.dtype), self.values.requires_grad
                )
            self.row_ptr = m.row_ptr.to(dev)
            self.col_idx = m.col_idx.to(dev)
            self.block_size = m.block_size
            self._matrix = None  # the shapes now match: the default load below copies them
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def to_inference(
    model: nn.Module, block_size=None, inplace: bool = False, dense_too: bool = False
) -> nn.Module:
    """A model whose ``SparseLinear`` layers (and, with ``dense_too``, plain ``nn.Linear``
    layers) are replaced by :class:`BlockSparseLinear` layers holding only the kept blocks.

    Outputs equal the masked model's (the same weights, summed in another order: within float
    tolerance). Other layers (``SparseConv2d`` included) are kept as they are.

    Args:
        model: a model with sparse layers (e.g. after ``sparsify`` and pruning).
        block_size: ``(bm, bk)`` for every converted layer; default each layer's own block size in
            block mode, else :data:`DEFAULT_BLOCK` (32x32).
        inplace: convert ``model`` itself instead of a deep copy.
        dense_too: also convert plain ``nn.Linear`` layers (blocks holding any nonzero).
    Returns:
        The converted model (``model`` itself when ``inplace``; if ``model`` is a single Linear
        layer, the new layer).
    """
    if block_size is not None:
        block_size = _pair(block_size)  # fail before anything is converted
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_inference: expected an nn.Module, got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)

    def convertible(m: nn.Module) -> bool:
        return isinstance(m, SparseLinear) or (dense_too and type(m) is nn.Linear)

    if convertible(target):
        return BlockSparseLinear.from_sparse(target, block_size)
    done: dict[int, nn.Module] = {}

    def walk(parent: nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if convertible(child):
                if id(child) not in done:
                    done[id(child)] = BlockSparseLinear.from_sparse(child, block_size)
                setattr(parent, name, done[id(child)])
            else:
                walk(child)

    walk(target)
    return target
