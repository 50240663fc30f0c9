"""Block-sparse inference: ``BlockSparseLinear`` / ``BlockSparseConv2d`` (layers that store only
their kept blocks) and ``to_inference`` (a pruned model -> one whose weights are
``BlockSparseMatrix``).

Memory and the state dict fall with density: a ``BlockSparseLinear`` holds ``values [nnz, bm, bk]``
plus ``row_ptr`` (int32, one per block-row + 1) and ``col_idx`` (int32, one per stored block), i.e.
``nnz*bm*bk*itemsize + 4*(R + 1 + nnz)`` bytes against ``out*in*itemsize`` dense. At 32x32 fp32
blocks the metadata is 4 bytes per 4096 of values (0.1%).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sparsekern.formats.block_sparse import BlockSparseMatrix, block_size_pair
from sparsekern.nn.sparse_conv2d import SparseConv2d, symmetric_zero_padding
from sparsekern.nn.sparse_linear import SparseLinear
from sparsekern.ops.block_sparse_conv2d import (
    block_sparse_conv2d,
    conv_weight_from_gemm,
    conv_weight_to_gemm,
)
from sparsekern.ops.block_sparse_linear import block_sparse_linear

__all__ = ["BlockSparseConv2d", "BlockSparseLinear", "DEFAULT_BLOCK", "to_inference"]

DEFAULT_BLOCK = (32, 32)


class _BlockSparseLayer(nn.Module):
    """What the block-sparse layers share: ``values [nnz, bm, bk]`` (a Parameter), ``row_ptr`` /
    ``col_idx`` buffers (int32), the ``weight`` BlockSparseMatrix assembled from them, and a
    state-dict load that accepts any number of blocks. Subclasses set ``_matrix_shape``."""

    _matrix_shape: tuple[int, int]

    def _init_blocks(self, weight: BlockSparseMatrix, bias: torch.Tensor | None, out: int):
        self.block_size = weight.block_size
        self.values = nn.Parameter(weight.values.detach().clone())
        self.register_buffer("row_ptr", weight.row_ptr.clone())
        self.register_buffer("col_idx", weight.col_idx.clone())
        if bias is not None:
            if tuple(bias.shape) != (out,):
                raise ValueError(
                    f"{type(self).__name__}: bias must have shape ({out},), got {tuple(bias.shape)}"
                )
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("bias", None)
        self._matrix: BlockSparseMatrix | None = None

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
                self._matrix_shape,
                self.block_size,
                validate=False,
            )
            self._matrix = m
        return m

    @property
    def density(self) -> float:
        """Stored fraction of the block grid."""
        return self.weight.density

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_matrix"] = None  # derived; rebuilt on first use
        return state

    def _extra_expected(self) -> dict:
        """Extra-state entries a loaded state dict must match (besides the block size)."""
        return {}

    def _extra_error(self, state) -> str | None:
        if not isinstance(state, dict):
            return f"expected a dict as extra state, got {type(state).__name__}"
        for key, want in self._extra_expected().items():
            if key not in state:
                return f"expected {key!r} in the extra state, got keys {sorted(state)}"
            got = tuple(state[key]) if isinstance(state[key], (list, tuple)) else state[key]
            if got != want:
                return f"expected {key} {want}, got {got}"
        return None

    def set_extra_state(self, state) -> None:
        err = self._extra_error(state)  # checked before anything was loaded; kept for direct use
        if err:
            raise ValueError(f"{type(self).__name__}: {err}")

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # The stored layout may have any number of blocks: validate the whole matrix, replace the
        # tensors (then the shapes match and the default load below copies them).
        keys = [prefix + k for k in ("values", "row_ptr", "col_idx")]
        extra = state_dict.get(prefix + "_extra_state")
        err = None if extra is None else self._extra_error(extra)
        if err:  # before anything is replaced: a refused load leaves the layer as it was
            error_msgs.append(f"While loading {prefix!r}: {type(self).__name__}: {err}")
            return
        if all(k in state_dict for k in keys):
            block = self.block_size
            if isinstance(extra, dict) and "block_size" in extra:
                block = tuple(extra["block_size"])
            try:
                m = BlockSparseMatrix(
                    state_dict[keys[0]],
                    state_dict[keys[1]],
                    state_dict[keys[2]],
                    self._matrix_shape,
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
            self._matrix = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class BlockSparseLinear(_BlockSparseLayer):
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
        self._matrix_shape = weight.shape
        self._init_blocks(weight, bias, self.out_features)

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
            w = BlockSparseMatrix.from_dense(
                layer.weight.detach(), block_size_pair(block_size), mask=mask
            )
        new = cls(w, None if layer.bias is None else layer.bias.detach())
        new.values.requires_grad_(layer.weight.requires_grad)
        new.train(layer.training)
        return new

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

    def _extra_expected(self) -> dict:
        return {"shape": (self.out_features, self.in_features)}


class BlockSparseConv2d(_BlockSparseLayer):
    """A groups=1 ``Conv2d`` whose weight is stored as the kept blocks of its tap-major GEMM view
    ``[C_out, kH*kW*C_in_pad]`` (see ``sparsekern.ops.block_sparse_conv2d``): ``values [nnz, bm,
    bk]``, ``row_ptr``, ``col_idx``, ``bias``; geometry in the extra state.

    ``forward``: ``[N, C_in, H, W]`` (or ``[C_in, H, W]``) -> ``[N, C_out, OH, OW]``.
    """

    def __init__(
        self,
        weight: BlockSparseMatrix,
        weight_shape,
        bias: torch.Tensor | None = None,
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
    ) -> None:
        super().__init__()
        if not isinstance(weight, BlockSparseMatrix):
            raise TypeError(
                f"BlockSparseConv2d: weight must be a BlockSparseMatrix, got "
                f"{type(weight).__name__}"
            )
        c_out, c_in, kh, kw = (int(s) for s in weight_shape)
        bk = weight.block_size[1]
        want = (c_out, kh * kw * -(-c_in // bk) * bk)
        if weight.shape != want:
            raise ValueError(
                f"BlockSparseConv2d: expected the tap-major matrix of shape {want} for "
                f"weight_shape {tuple(weight_shape)}, got {weight.shape}"
            )
        self.in_channels, self.out_channels = c_in, c_out
        self.kernel_size = (kh, kw)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self._matrix_shape = want
        self._init_blocks(weight, bias, c_out)

    @classmethod
    def from_sparse(cls, conv: nn.Conv2d, block_size=None) -> BlockSparseConv2d:
        """From a ``SparseConv2d`` (or ``nn.Conv2d``) with groups=1 and zero padding."""
        if (
            not isinstance(conv, nn.Conv2d)
            or conv.groups != 1
            or symmetric_zero_padding(conv) is None
        ):
            raise TypeError(
                "BlockSparseConv2d.from_sparse: expected an nn.Conv2d / SparseConv2d with "
                f"groups=1 and symmetric zero padding, got {conv!r}"
            )
        if block_size is None:
            block_size = getattr(conv, "block_size", None) or DEFAULT_BLOCK
        bm, bk = block_size_pair(block_size)
        mask = conv._buffers.get("mask")
        with torch.no_grad():
            w = conv.weight.detach()
            g = conv_weight_to_gemm(w if mask is None else w * mask, bk)
            gm = None if mask is None else conv_weight_to_gemm(mask, bk)
            W = BlockSparseMatrix.from_dense(g, (bm, bk), mask=gm)
        new = cls(
            W, tuple(w.shape), None if conv.bias is None else conv.bias.detach(),
            conv.stride, symmetric_zero_padding(conv), conv.dilation,
        )  # fmt: skip
        new.values.requires_grad_(conv.weight.requires_grad)
        new.train(conv.training)
        return new

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        unbatched = input.dim() == 3
        x = input.unsqueeze(0) if unbatched else input
        y = block_sparse_conv2d(
            x, self.weight, self.weight_shape, self.bias, self.stride, self.padding, self.dilation
        )
        return y.squeeze(0) if unbatched else y

    def to_dense(self) -> torch.Tensor:
        """``[C_out, C_in, kH, kW]``: the dense weight (zeros outside stored blocks)."""
        return conv_weight_from_gemm(self.weight.to_dense(), self.weight_shape, self.block_size[1])

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}, block_size={self.block_size}, "
            f"nnz_blocks={self.values.shape[0]}, density={self.density:.4f}"
        )

    def get_extra_state(self):
        return {
            "weight_shape": list(self.weight_shape),
            "block_size": list(self.block_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
        }

    def _extra_expected(self) -> dict:
        return {
            "weight_shape": self.weight_shape,
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
        }


def to_inference(
    model: nn.Module,
    block_size=None,
    inplace: bool = False,
    dense_too: bool = False,
    conv: bool = True,
) -> nn.Module:
    """A model whose sparse layers hold only their kept blocks: ``SparseLinear`` ->
    :class:`BlockSparseLinear`, and (``conv=True``) ``SparseConv2d`` with groups=1 and zero
    padding -> :class:`BlockSparseConv2d` (blocks of its tap-major view). With ``dense_too``, plain
    ``nn.Linear`` / ``nn.Conv2d`` layers are converted too (blocks holding any nonzero).

    Outputs equal the masked model's (the same weights, summed in another order: within float
    tolerance). Everything else (grouped or reflect-padded convs included) is kept as it is.

    Args:
        model: a model with sparse layers (e.g. after ``sparsify`` and pruning).
        block_size: ``(bm, bk)`` for every converted layer; default each layer's own block size in
            block mode, else :data:`DEFAULT_BLOCK` (32x32).
        inplace: convert ``model`` itself instead of a deep copy.
        dense_too: also convert plain ``nn.Linear`` / ``nn.Conv2d`` layers.
        conv: convert conv layers (False: only Linear layers).
    Returns:
        The converted model (``model`` itself when ``inplace``; if ``model`` is a single layer,
        the new layer).
    """
    if block_size is not None:
        block_size = block_size_pair(block_size)  # fail before anything is converted
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_inference: expected an nn.Module, got {type(model).__name__}")

    def converter(m: nn.Module):
        if isinstance(m, SparseLinear) or (dense_too and type(m) is nn.Linear):
            return BlockSparseLinear.from_sparse
        convish = isinstance(m, SparseConv2d) or (dense_too and type(m) is nn.Conv2d)
        if conv and convish and m.groups == 1 and symmetric_zero_padding(m) is not None:
            return BlockSparseConv2d.from_sparse
        return None

    target = model if inplace else copy.deepcopy(model)
    if converter(target) is not None:
        return converter(target)(target, block_size)
    done: dict[int, nn.Module] = {}

    def walk(parent: nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            convert = converter(child)
            if convert is not None:
                if id(child) not in done:
                    done[id(child)] = convert(child, block_size)
                setattr(parent, name, done[id(child)])
            else:
                walk(child)

    walk(target)
    return target
