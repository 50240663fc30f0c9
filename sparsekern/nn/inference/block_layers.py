"""Block-sparse inference layers: :class:`BlockSparseLinear` and :class:`BlockSparseConv2d` hold
only the stored ``bm x bk`` blocks of their weight (a :class:`BlockSparseMatrix`) and run the
block-sparse Triton kernels on CUDA, torch's BSR product (MKL) on the CPU, and the dense vendor op
above ``dense_above`` rows (see ``sparsekern.nn.csr_layers.DenseFallback``)."""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.formats.block_sparse import BlockSparseMatrix, block_size_pair
from sparsekern.nn.csr_layers import DenseFallback, check_dense_above, plain_cpu_call
from sparsekern.nn.sparse_conv2d import symmetric_zero_padding
from sparsekern.ops._checks import nonfinite_conv, nonfinite_rows
from sparsekern.ops._dispatch import use_kernels
from sparsekern.ops._launch import as_rows
from sparsekern.ops._mask_cache import cached_on_mask, tensor_key
from sparsekern.ops.block_sparse_conv2d import (
    block_sparse_conv2d,
    conv_weight_from_gemm,
    conv_weight_to_gemm,
)
from sparsekern.ops.block_sparse_linear import block_sparse_linear

__all__ = ["DEFAULT_BLOCK", "BlockSparseConv2d", "BlockSparseLinear"]

DEFAULT_BLOCK = (32, 32)
_MKL_DTYPES = (torch.float32, torch.float64)


def _bsr_cpu_forward(x: torch.Tensor, layer, bias) -> torch.Tensor:
    """``x [..., in] -> [..., out]`` through torch's BSR product (MKL) on ``layer``'s stored
    blocks: ``W_pad @ x_pad^T`` (x padded to whole blocks where the matrix is), cropped,
    transposed back (contiguous), plus the bias."""
    x2 = as_rows(x)
    rows, cols = layer.out_features, layer.in_features
    bsr = layer._torch_bsr()
    pad_k = bsr.shape[1] - cols
    if pad_k:
        x2 = F.pad(x2, (0, pad_k))
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], rows))
    y = torch.mm(bsr, x2.t())[:rows].t()
    y = y + bias if bias is not None else y.contiguous()
    return y.reshape(*x.shape[:-1], rows)


class _TorchBSRLinear(torch.autograd.Function):
    """``BlockSparseLinear`` on the CPU through torch's BSR product (MKL); the backward recomputes
    the reference (``F.linear`` on the densified blocks) and differentiates that."""

    @staticmethod
    def forward(ctx, x, values, bias, layer):
        ctx.save_for_backward(x, values, bias)
        ctx.layer = layer
        return _bsr_cpu_forward(x, layer, bias)

    @staticmethod
    def backward(ctx, dy):
        x, values, bias = ctx.saved_tensors
        layer = ctx.layer
        with torch.enable_grad():
            xs = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip((x, values, bias), ctx.needs_input_grad[:3])]  # fmt: skip
            m = BlockSparseMatrix(
                xs[1], layer.row_ptr, layer.col_idx, layer._matrix_shape, layer.block_size,
                validate=False,
            )  # fmt: skip
            y = F.linear(xs[0], m.to_dense(), xs[2])
            wanted = [t for t in xs if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(y, wanted, dy)) if wanted else iter(())
        out = [next(grads) if t is not None and t.requires_grad else None for t in xs]
        return out[0], out[1], out[2], None


class _BlockSparseLayer(DenseFallback, nn.Module):
    """What the block-sparse layers share: ``values [nnz, bm, bk]`` (a Parameter), ``row_ptr`` /
    ``col_idx`` buffers (int32), the ``weight`` BlockSparseMatrix assembled from them,
    ``dense_above`` (see ``sparsekern.nn.csr_layers``) and a state-dict load that accepts any
    number of blocks. Subclasses set ``_matrix_shape``."""

    _matrix_shape: tuple[int, int]

    def _init_blocks(
        self, weight: BlockSparseMatrix, bias: torch.Tensor | None, out: int, dense_above=None
    ):
        self.block_size = weight.block_size
        self._init_storage(weight, bias, out, dense_above)

    @property
    def weight(self) -> BlockSparseMatrix:
        """The layer's ``BlockSparseMatrix``; its ``values`` is the ``values`` Parameter.

        Cached on ``row_ptr`` (``_mask_cache``), rebuilt with its derived lists (a few small ops)
        after ``.to()``, a load or a cast, and after an in-place edit of ``row_ptr`` or
        ``col_idx`` (version counters), which identity alone would miss."""
        values = self._parameters["values"]
        rp, ci = self._buffers["row_ptr"], self._buffers["col_idx"]
        shape, block = self._matrix_shape, self.block_size
        key = (id(values), shape, block) + tensor_key(ci)  # the closure keeps both ids valid
        return cached_on_mask(
            rp,
            "block_layer.weight",
            lambda r: BlockSparseMatrix(values, r, ci, shape, block, validate=False),
            key,
        )

    @property
    def density(self) -> float:
        """Stored fraction of the block grid."""
        return self.weight.density

    def _extra_expected(self) -> dict:
        """Extra-state entries a loaded state dict must match (besides the block size)."""
        return {}

    def _extra_error(self, state) -> str | None:
        if not isinstance(state, dict):
            return f"expected a dict as extra state, got {type(state).__name__}"
        if state.get("format", "bsr") != "bsr":
            return f"expected format 'bsr' in the extra state, got {state.get('format')!r}"
        try:
            check_dense_above(state.get("dense_above"))
        except ValueError as e:
            return str(e)
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
        self.dense_above = state.get("dense_above")

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
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class BlockSparseLinear(_BlockSparseLayer):
    """``y = x @ W^T + b`` with ``W`` a :class:`BlockSparseMatrix` ``(out_features,
    in_features)``: only stored blocks exist, in memory and in the state dict.

    Parameters: ``values [nnz, bm, bk]`` (trainable at a fixed layout: its gradient covers stored
    blocks only) and ``bias [out_features]`` or None. Buffers: ``row_ptr [ceil(out/bm) + 1]``,
    ``col_idx [nnz]`` (int32). ``shape``, ``block_size`` and ``dense_above`` travel as extra
    state. Loading a state dict replaces the layout (any nnz), validated as a
    ``BlockSparseMatrix``.

    What runs: ``block_sparse_linear`` (the Triton kernels on CUDA); on the CPU in float32/64,
    torch's BSR product (MKL) on the stored blocks; above ``dense_above`` rows the dense GEMM.
    """

    def __init__(
        self,
        weight: BlockSparseMatrix,
        bias: torch.Tensor | None = None,
        dense_above: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(weight, BlockSparseMatrix):
            raise TypeError(
                f"BlockSparseLinear: weight must be a BlockSparseMatrix, got "
                f"{type(weight).__name__}"
            )
        self.out_features, self.in_features = weight.shape
        self._matrix_shape = weight.shape
        self._init_blocks(weight, bias, self.out_features, dense_above)

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

    @classmethod
    def empty_like(cls, layer: nn.Linear, block_size=None) -> BlockSparseLinear:
        """``layer``'s shape, dtype and device with no block stored (what a load fills)."""
        w = layer.weight
        m = BlockSparseMatrix.from_dense(
            torch.zeros(w.shape, dtype=w.dtype, device=w.device),
            block_size_pair(block_size or DEFAULT_BLOCK),
        )
        return cls(m, None if layer.bias is None else layer.bias.detach())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``[..., in_features] -> [..., out_features]``."""
        if self._above(input.numel() // max(self.in_features, 1)):
            return F.linear(input, self._dense_weight(), self.bias)
        k = self.in_features
        if input.shape[-1] != k or input.dim() == 0:
            return block_sparse_linear(input, self.weight, self.bias)  # its errors name the shapes
        if plain_cpu_call(input, self.values, self.bias):
            y = _bsr_cpu_forward(input, self, self.bias)
        elif (
            input.dtype in _MKL_DTYPES
            and input.dtype == self.values.dtype
            and input.device.type == "cpu"
            and not use_kernels(input)
            and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu")
        ):
            y = _TorchBSRLinear.apply(input, self.values, self.bias, self)
        else:
            y = block_sparse_linear(input, self.weight, self.bias)
        return nonfinite_rows(input.reshape(-1, k), y.reshape(-1, self.out_features)).view_as(y)

    def _torch_bsr(self) -> torch.Tensor:
        """torch's BSR tensor of the stored blocks (padded size, int32 indices, values aliased),
        cached on ``values`` until the values or the layout change."""
        v, rp, ci = self._parameters["values"], self._buffers["row_ptr"], self._buffers["col_idx"]
        layer = weakref.ref(self)  # not self: the cache entry would keep the layer alive

        def compute(_v, _index=(rp, ci)):  # _index keeps tensor_key's ids those tensors'
            b = layer().weight.to_sparse_bsr()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                return torch.sparse_bsr_tensor(
                    b.crow_indices().int(), b.col_indices().int(), b.values(), b.shape,
                    check_invariants=False,
                )  # fmt: skip

        return cached_on_mask(v, "torch_bsr", compute, (v.data_ptr(),) + tensor_key(rp, ci))

    def to_dense(self) -> torch.Tensor:
        """``[out_features, in_features]``: the dense weight (zeros outside stored blocks)."""
        return self.weight.to_dense()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, block_size={self.block_size}, "
            f"nnz_blocks={self.values.shape[0]}, density={self.density:.4f}, "
            f"dense_above={self.dense_above}"
        )

    def get_extra_state(self):
        return {
            "format": "bsr",
            "shape": [self.out_features, self.in_features],
            "block_size": list(self.block_size),
            "dense_above": self.dense_above,
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
        dense_above: int | None = None,
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
        self._init_blocks(weight, bias, c_out, dense_above)

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
            if mask is not None:  # where-semantics: inf / NaN at a pruned entry is stored as 0
                w = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
            g = conv_weight_to_gemm(w, bk)
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

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, block_size=None) -> BlockSparseConv2d:
        """``conv``'s geometry, dtype and device with no block stored (what a load fills)."""
        bm, bk = block_size_pair(block_size or DEFAULT_BLOCK)
        w = conv.weight
        g = conv_weight_to_gemm(torch.zeros(w.shape, dtype=w.dtype, device=w.device), bk)
        m = BlockSparseMatrix.from_dense(g, (bm, bk))
        bias = None if conv.bias is None else conv.bias.detach()
        pad = symmetric_zero_padding(conv)
        return cls(m, tuple(w.shape), bias, conv.stride, pad, conv.dilation)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``[N, C_in, H, W]`` (or ``[C_in, H, W]``) -> ``[N, C_out, OH, OW]``."""
        unbatched = input.dim() == 3
        x = input.unsqueeze(0) if unbatched else input
        if self._above(x.shape[0]):
            y = F.conv2d(
                x, self._dense_weight(), self.bias, self.stride, self.padding, self.dilation
            )
        else:
            y = block_sparse_conv2d(
                x, self.weight, self.weight_shape, self.bias, self.stride, self.padding,
                self.dilation,
            )  # fmt: skip
            y = nonfinite_conv(x, y, self.kernel_size, self.stride, self.padding, self.dilation)
        return y.squeeze(0) if unbatched else y

    def to_dense(self) -> torch.Tensor:
        """``[C_out, C_in, kH, kW]``: the dense weight (zeros outside stored blocks)."""
        return conv_weight_from_gemm(self.weight.to_dense(), self.weight_shape, self.block_size[1])

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}, block_size={self.block_size}, "
            f"nnz_blocks={self.values.shape[0]}, density={self.density:.4f}, "
            f"dense_above={self.dense_above}"
        )

    def get_extra_state(self):
        return {
            "format": "bsr",
            "dense_above": self.dense_above,
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
