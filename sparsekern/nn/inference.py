"""Inference export: ``to_inference`` turns a pruned model into one whose every layer holds the
representation that is fastest on its device (the rule: sparsity never costs).

Per layer (``SparseLinear`` / ``SparseConv2d``; with ``dense_too`` also plain ``nn.Linear`` /
``nn.Conv2d``) it picks one of:

* ``"dense"``: a plain ``nn.Linear`` / ``nn.Conv2d`` holding the masked weight (what runs when the
  density is too high for a sparse format to win: the vendor GEMM, exactly);
* ``"csr"``: :class:`~sparsekern.nn.csr_layers.CSRLinear` / ``CSRConv2d``, the kept weights as
  CSR with int16 column indices (unstructured masks, Han et al.'s): torch's CSR product (MKL on
  the CPU, cuSPARSE) and the Triton decode kernel on CUDA for 1..32 rows;
* ``"bsr"``: :class:`BlockSparseLinear` / :class:`BlockSparseConv2d`, the kept blocks (block
  masks): the block-sparse Triton kernels on CUDA, torch's BSR product (MKL) on the CPU.

How it picks (``format="auto"``, the default): the candidates are dense, CSR (anything pruned)
and BSR (at most :data:`BSR_MAX_BLOCK_DENSITY` of the blocks hold a kept weight: an unstructured
10% mask fills every 32x32 block, a block mask does not). With ``calibrate=True`` each candidate
is built and timed on the layer's device, interleaved with the dense layer (medians of per-repeat
ratios), at each of ``batch_sizes`` (default :data:`DEFAULT_BATCH_SIZES`: 1 and 64 rows on the
CPU; 1, 8, 32 and 64 on CUDA). A sparse format wins a batch size when it takes at most ``margin``
(0.9) of the dense time there; the layer takes the format that wins the most consecutive batch
sizes from the smallest (then the best geometric-mean speedup); if it stops winning at a larger
one, the layer runs dense above the last batch it won (``dense_above``). No win: dense. Conv
layers need ``example_input`` to be timed (their input size is not in the layer); without it,
and with ``calibrate=False``, the static rule :data:`STATIC_RULE` decides (the kept-fraction
crossovers measured by ``benchmarks/bench_inference.py``).

Every converted layer carries its :class:`LayerChoice` (``inference_choices(model)``): the
format, why, and the measured ratios. ``inference_report`` times a whole model, exported against
dense, at batch sizes (what the main job prints). The exported model saves and reloads through its
``state_dict`` (tensors and plain extra state only: ``torch.load(weights_only=True)`` reads it);
``load_inference(fresh_model, state_dict)`` rebuilds the layers the state dict names and loads it
(the model passed in is not touched, so a refused load leaves it as it was).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.formats.block_sparse import BlockSparseMatrix, block_size_pair
from sparsekern.nn.csr_layers import (
    CSRConv2d,
    CSRLinear,
    DenseFallback,
    check_dense_above,
    plain_cpu_call,
)
from sparsekern.nn.sparse_conv2d import SparseConv2d, symmetric_zero_padding
from sparsekern.nn.sparse_linear import SparseLinear
from sparsekern.ops._dispatch import use_kernels
from sparsekern.ops._launch import as_rows
from sparsekern.ops.block_sparse_conv2d import (
    block_sparse_conv2d,
    conv_weight_from_gemm,
    conv_weight_to_gemm,
)
from sparsekern.ops.block_sparse_linear import block_sparse_linear
from sparsekern.ops.csr_linear import KERNEL_MAX_ROWS

__all__ = [
    "BSR_MAX_BLOCK_DENSITY",
    "BlockSparseConv2d",
    "BlockSparseLinear",
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_BLOCK",
    "DEFAULT_MARGIN",
    "FORMATS",
    "STATIC_RULE",
    "LayerChoice",
    "format_choices",
    "format_report",
    "static_limit",
    "inference_choices",
    "inference_plan",
    "inference_report",
    "interleaved_times",
    "load_inference",
    "to_inference",
]

DEFAULT_BLOCK = (32, 32)
FORMATS = ("dense", "csr", "bsr")
# Calibration batch sizes by device type (rows of x for Linear layers, images for conv layers):
# the batch 1 and 64 on the CPU; on CUDA also 8 and 32, the decode kernel's range.
DEFAULT_BATCH_SIZES = {"cpu": (1, 64), "cuda": (1, 8, 32, 64)}
# A sparse format must take at most this fraction of the dense time to be chosen at a batch size:
# the 2-core machine's repeat-to-repeat spread of a ratio is ~5% under load, so a 10% margin keeps
# a noisy tie dense.
DEFAULT_MARGIN = 0.9
# BSR is a candidate when at most this fraction of the blocks hold a kept weight (a block kept for
# one weight costs bm*bk multiply-adds).
BSR_MAX_BLOCK_DENSITY = 0.5
_MKL_DTYPES = (torch.float32, torch.float64)

# The static rule (``calibrate=False``, and conv layers timed without an example input): per
# (device type, layer kind, format), ``(min weights, largest kept fraction)`` rows, the first row
# whose size the layer reaches applies; for BSR the fraction is of blocks stored. A format absent
# here is never chosen by the rule. CPU rows: where CSR (MKL) still took <= 0.9 of the dense time
# at both batch 1 and 64, measured on the 2-core machine (``bench_inference.py --crossover``,
# fp32, load < 0.7): 4096 x 4096 wins up to 20% kept (1.40x at batch 64; 0.78x at 30%), 784 x 300
# up to 5% (1.48x; 1.04x at 10%: per-call overhead of ~7 us); CSR conv via unfold never won
# (0.25-0.99x on LeNet-5 conv2 and a VGG conv5 layer); torch's BSR lost to CSR on block masks too
# (4096 x 4096, 32x32 blocks: 2.0x vs 2.4x at 10% of blocks, 0.78x vs 0.96x at 25%, batch 64).
# CUDA rows: expectations from the bytes moved (no GPU measured): CSR reads itemsize + 2 bytes per
# kept bf16 weight against 2 dense, so it can win below ~50% and is taken below 25%; the block
# kernels skip whole blocks.
STATIC_RULE = {
    ("cpu", "linear", "csr"): ((1_000_000, 0.2), (0, 0.05)),
    ("cpu", "linear", "bsr"): ((1_000_000, 0.1),),
    ("cuda", "linear", "csr"): ((0, 0.25),),
    ("cuda", "linear", "bsr"): ((0, 0.5),),
    ("cuda", "conv2d", "bsr"): ((0, 0.5),),
}


def static_limit(device_type: str, kind: str, fmt: str, weights: int) -> float | None:
    """The largest kept fraction at which :data:`STATIC_RULE` takes ``fmt`` for a layer of
    ``weights`` weights (None: never)."""
    for min_weights, limit in STATIC_RULE.get((device_type, kind, fmt), ()):
        if weights >= min_weights:
            return limit
    return None


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
            self._matrix = None
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
        if input.shape[-1] == self.in_features:
            if plain_cpu_call(input, self.values, self.bias):
                return _bsr_cpu_forward(input, self, self.bias)
            if (
                input.dtype in _MKL_DTYPES
                and input.dtype == self.values.dtype
                and input.device.type == "cpu"
                and not use_kernels(input)
                and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled("cpu")
            ):
                return _TorchBSRLinear.apply(input, self.values, self.bias, self)
        return block_sparse_linear(input, self.weight, self.bias)

    def _torch_bsr(self) -> torch.Tensor:
        """torch's BSR tensor of the stored blocks (padded size, int32 indices, values aliased),
        cached until the values or the layout change."""
        v = self.values
        key = (id(v), v._version, v.data_ptr(), id(self.row_ptr), self.row_ptr._version,
               id(self.col_idx), self.col_idx._version)  # fmt: skip
        hit = self.__dict__.get("_bsr_cache")
        if hit is not None and hit[0] == key:
            return hit[1]
        b = self.weight.to_sparse_bsr()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            t = torch.sparse_bsr_tensor(
                b.crow_indices().int(), b.col_indices().int(), b.values(), b.shape,
                check_invariants=False,
            )  # fmt: skip
        self.__dict__["_bsr_cache"] = (key, t)
        return t

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


# =============================================================================================
# The per-layer choice
# =============================================================================================
@dataclasses.dataclass
class LayerChoice:
    """What ``to_inference`` chose for one layer, and why.

    ``format``: ``"dense"``, ``"csr"``, ``"bsr"`` or ``"keep"`` (left as it was); ``source``:
    ``"calibrated"`` (timed), ``"static"`` (:data:`STATIC_RULE`) or ``"forced"`` (a ``format``
    argument). ``ratios[fmt][batch]``: dense time / ``fmt`` time (> 1: faster than dense) and
    ``times_us[fmt][batch]`` the median time, for every timed candidate (dense included)."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    density: float
    format: str
    source: str
    reason: str
    block_size: tuple[int, int] | None = None
    dense_above: int | None = None
    ratios: dict = dataclasses.field(default_factory=dict)
    times_us: dict = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready (batch sizes as strings)."""
        d = dataclasses.asdict(self)
        for key in ("ratios", "times_us"):
            d[key] = {f: {str(b): v for b, v in per.items()} for f, per in d[key].items()}
        return d


def _kind(m: nn.Module) -> str:
    return "conv2d" if isinstance(m, nn.Conv2d) else "linear"


def _kept(m: nn.Module) -> torch.Tensor:
    mask = m._buffers.get("mask")
    return mask if mask is not None else m.weight.detach() != 0


def _density(m: nn.Module) -> float:
    k = _kept(m)
    return int(k.count_nonzero()) / max(k.numel(), 1)


def _dense_copy(m: nn.Module) -> nn.Module:
    """A plain ``nn.Linear`` / ``nn.Conv2d`` computing what ``m`` computes, holding its masked
    weight (a copy: the exported model shares nothing with the pruned one)."""
    w = m.weight.detach()
    mask = m._buffers.get("mask")
    if mask is not None:
        w = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
    kw = {"device": "meta", "dtype": w.dtype}
    if isinstance(m, nn.Conv2d):
        new = nn.Conv2d(
            m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
            dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
            padding_mode=m.padding_mode, **kw,
        )  # fmt: skip
    else:
        new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, **kw)
    new.weight = nn.Parameter(w.clone(), requires_grad=m.weight.requires_grad)
    if m.bias is not None:
        new.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
    new.train(m.training)
    return new


def _bsr_block(m: nn.Module, block_size) -> tuple[int, int]:
    return block_size_pair(block_size or getattr(m, "block_size", None) or DEFAULT_BLOCK)


def _cannot(m: nn.Module, fmt: str) -> str | None:
    """Why ``m`` cannot take ``fmt`` (None: it can)."""
    if fmt == "csr" and isinstance(m, nn.Conv2d) and m.groups != 1:
        return f"csr needs groups=1, got groups={m.groups}"
    if fmt == "bsr" and isinstance(m, nn.Conv2d):
        if m.groups != 1:
            return f"bsr needs groups=1, got groups={m.groups}"
        if symmetric_zero_padding(m) is None:
            return f"bsr needs symmetric zero padding, got {m.padding!r} ({m.padding_mode})"
    return None


def _build(m: nn.Module, fmt: str, block_size=None, dense_above=None, empty: bool = False):
    """``m`` converted to ``fmt`` (``empty``: nothing stored, for a state-dict load)."""
    conv = isinstance(m, nn.Conv2d)
    if fmt == "dense":
        return _dense_copy(m)
    if fmt == "csr":
        cls = CSRConv2d if conv else CSRLinear
        new = cls.empty_like(m) if empty else cls.from_sparse(m)
    elif fmt == "bsr":
        cls = BlockSparseConv2d if conv else BlockSparseLinear
        block = _bsr_block(m, block_size)
        new = cls.empty_like(m, block) if empty else cls.from_sparse(m, block)
    else:
        raise ValueError(f"to_inference: expected a format in {FORMATS}, got {fmt!r}")
    new.dense_above = check_dense_above(dense_above)
    if empty:
        new.values.requires_grad_(m.weight.requires_grad)
        new.train(m.training)
    return new


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    repeats: int = 15,
    budget_s: float = 2.0,
    device: torch.device | None = None,
    min_repeats: int = 5,
) -> dict[str, tuple[float, float]]:
    """Time the callables against each other: every repeat runs each of them (order rotated)
    once untimed, then ``inner`` calls timed (about a millisecond or more, set per callable):
    steady-state calls, not the cold one that follows another callable's sweep through memory
    (a 4096 x 4096 CSR layer at 4% kept fits the cache, a dense one does not). A ratio is taken
    per repeat against the first callable's time of that repeat, and the medians are returned:
    ``{name: (median seconds per call, median of first / name)}``. Stops after ``repeats``
    repeats or ``budget_s`` seconds (at least ``min_repeats``). CUDA is synchronised around each
    timed run."""
    names = list(fns)
    sync = (
        torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    )
    inner = {}
    for n, f in fns.items():  # warm-up (caches, autotuning, lazy builds), then one timed call
        f()
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        once = max(time.perf_counter() - t0, 1e-6)
        inner[n] = max(1, min(200, math.ceil(1e-3 / once)))
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(max(repeats, min_repeats)):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            f, k = fns[n], inner[n]
            f()
            sync()
            t = time.perf_counter()
            for _ in range(k):
                f()
            sync()
            times[n].append((time.perf_counter() - t) / k)
        if r + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    base = times[names[0]]
    return {
        n: (statistics.median(ts), statistics.median(b / t for b, t in zip(base, ts)))
        for n, ts in times.items()
    }


def _measure(modules: dict[str, nn.Module], make_input, batch_sizes, device) -> dict:
    """``{fmt: {batch: (median us, dense time / fmt time)}}`` for ``modules`` (``"dense"``
    first), timed interleaved under ``torch.no_grad`` at each batch size."""
    out: dict = {f: {} for f in modules}
    with torch.no_grad():
        for b in batch_sizes:
            x = make_input(b)
            fns = {f: (lambda m=m, x=x: m(x)) for f, m in modules.items()}
            for f, (sec, ratio) in interleaved_times(fns, device=device).items():
                out[f][b] = (sec * 1e6, ratio)
    return out


def _choose(ratios: dict, batch_sizes, margin: float):
    """``(format, dense_above, reason)`` from ``ratios[fmt][batch]`` (dense / fmt time)."""
    best = None
    for fmt, per in ratios.items():
        if fmt == "dense":
            continue
        wins = 0
        for b in batch_sizes:
            if per[b] * margin < 1.0:
                break
            wins += 1
        if wins == 0:
            continue
        gm = math.exp(sum(math.log(per[b]) for b in batch_sizes[:wins]) / wins)
        if best is None or (wins, gm) > best[:2]:
            best = (wins, gm, fmt)
    shown = "; ".join(
        f"{fmt} " + ", ".join(f"{per[b]:.2f}x" for b in batch_sizes)
        for fmt, per in ratios.items()
        if fmt != "dense"
    )
    at = "batch " + "/".join(str(b) for b in batch_sizes)
    if best is None:
        return (
            "dense",
            None,
            (
                f"dense kept: no sparse format took <= {margin:.2f} of the dense time at batch "
                f"{batch_sizes[0]} ({shown} faster than dense at {at})"
            ),
        )
    wins, _, fmt = best
    if wins == len(batch_sizes):
        return fmt, None, f"{fmt}: {shown} faster than dense at {at}"
    return (
        fmt,
        batch_sizes[wins - 1],
        (
            f"{fmt} up to batch {batch_sizes[wins - 1]}, dense above (it stops winning at batch "
            f"{batch_sizes[wins]}); {shown} faster than dense at {at}"
        ),
    )


def _static(m: nn.Module, device_type: str, density: float, block_density, why: str):
    kind = _kind(m)
    for fmt, frac in (("csr", density), ("bsr", block_density)):
        limit = static_limit(device_type, kind, fmt, m.weight.numel())
        if frac is None or limit is None or _cannot(m, fmt):
            continue
        if frac <= limit:
            dense_above = KERNEL_MAX_ROWS if (fmt, kind, device_type) == (
                "csr", "linear", "cuda") else None  # fmt: skip
            what = "kept" if fmt == "csr" else "of blocks stored"
            return (
                fmt,
                dense_above,
                (
                    f"{fmt} by the static rule ({why}): {frac:.1%} {what} <= {limit:.0%} "
                    f"({device_type} {kind})"
                ),
            )
    return (
        "dense",
        None,
        (
            f"dense by the static rule ({why}): {density:.1%} kept is above the "
            f"{device_type} {kind} crossovers"
        ),
    )


def _auto(name, m, *, block_size, batch_sizes, sample_shape, calibrate, margin):
    """Convert ``m`` to the format chosen for it; returns ``(module, LayerChoice)``."""
    kind, dev = _kind(m), m.weight.device
    density = _density(m)
    choice = LayerChoice(name, kind, tuple(m.weight.shape), density, "dense", "calibrated", "")
    built: dict[str, nn.Module] = {"dense": _dense_copy(m)}
    notes = []
    if density >= 1.0:
        notes.append("csr: nothing pruned")
    elif _cannot(m, "csr"):
        notes.append(_cannot(m, "csr"))
    else:
        built["csr"] = _build(m, "csr")
    block_density = None
    if _cannot(m, "bsr"):
        notes.append(_cannot(m, "bsr"))
    else:
        bsr = _build(m, "bsr", block_size)
        block_density = float(bsr.density)
        if block_density <= BSR_MAX_BLOCK_DENSITY:
            built["bsr"] = bsr
            choice.block_size = bsr.block_size
        else:
            notes.append(
                f"bsr: {block_density:.0%} of {bsr.block_size[0]}x{bsr.block_size[1]} blocks "
                f"hold a kept weight (> {BSR_MAX_BLOCK_DENSITY:.0%})"
            )
    note = f" [{'; '.join(notes)}]" if notes else ""
    if len(built) == 1:
        choice.reason = "dense: no sparse candidate" + note
        choice.source = "static"
        return built["dense"], choice
    if not calibrate or sample_shape is None:
        why = "calibrate=False" if not calibrate else "no example_input to time a conv layer"
        fmt, dense_above, reason = _static(m, dev.type, density, block_density, why)
        choice.source = "static"
    else:
        dtype = m.weight.dtype
        make = lambda b: torch.randn(b, *sample_shape, dtype=dtype, device=dev)  # noqa: E731
        measured = _measure(built, make, batch_sizes, dev)
        choice.times_us = {f: {b: v[0] for b, v in per.items()} for f, per in measured.items()}
        choice.ratios = {f: {b: v[1] for b, v in per.items()} for f, per in measured.items()}
        fmt, dense_above, reason = _choose(choice.ratios, batch_sizes, margin)
    choice.format, choice.dense_above, choice.reason = fmt, dense_above, reason + note
    if fmt != "bsr":
        choice.block_size = None
    new = built[fmt]
    if fmt != "dense":
        new.dense_above = dense_above
    return new, choice


def _forced(name, m, fmt, block_size, empty):
    kind = _kind(m)
    choice = LayerChoice(name, kind, tuple(m.weight.shape), _density(m), fmt, "forced", "")
    if fmt == "keep":
        choice.reason = "kept as it is (format 'keep')"
        return m, choice
    why = _cannot(m, fmt)
    if why:
        choice.format, choice.reason = "keep", f"kept as it is: {why}"
        return m, choice
    new = _build(m, fmt, block_size, empty=empty)
    choice.reason = f"format {fmt!r} asked for"
    if fmt == "bsr":
        choice.block_size = new.block_size
    return new, choice


def _input_shapes(model: nn.Module, example_input, names: dict[int, str]) -> dict[str, tuple]:
    """Per-sample input shape of the layers ``names`` (id -> name) on ``example_input`` (one
    forward in eval mode, under no_grad; training flags restored)."""
    shapes: dict[str, tuple] = {}
    hooks = []
    for mod in model.modules():
        if id(mod) in names:

            def hook(module, args, name=names[id(mod)]):  # noqa: B008 (bound per layer)
                if args and isinstance(args[0], torch.Tensor) and name not in shapes:
                    shapes[name] = tuple(args[0].shape[1:])

            hooks.append(mod.register_forward_pre_hook(hook))
    modes = {mod: mod.training for mod in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*args)
    finally:
        for h in hooks:
            h.remove()
        for mod, mode in modes.items():
            mod.training = mode
    return shapes


def _warn_if_loaded(format, calibrate: bool) -> None:
    """Calibrating on a CPU whose other processes take the cores our threads need times noise:
    on the 2-core machine at load 2-4, torch's 2-thread MKL calls stall for 8 ms and a
    9216 x 4096 layer that is 3.8x faster as CSR measured 1.0x. Say so."""
    auto = format == "auto" or (isinstance(format, dict) and "auto" in format.values())
    if not (auto and calibrate and hasattr(os, "getloadavg")):
        return
    idle = (os.cpu_count() or 1) - os.getloadavg()[0]
    if idle < torch.get_num_threads() - 0.5:
        warnings.warn(
            f"to_inference: calibrating with {torch.get_num_threads()} threads while the 1-minute "
            f"load average leaves {max(idle, 0):.1f} of {os.cpu_count()} cores idle; the timings "
            "(and so the choices) may be noise. Export on a quiet machine, or pass "
            "calibrate=False for the static rule.",
            stacklevel=3,
        )


def _convertible(m: nn.Module, dense_too: bool, conv: bool) -> bool:
    if isinstance(m, SparseLinear) or (dense_too and type(m) is nn.Linear):
        return True
    convish = isinstance(m, SparseConv2d) or (dense_too and type(m) is nn.Conv2d)
    return conv and convish


def _check_batch_sizes(batch_sizes) -> tuple[int, ...]:
    try:
        bs = tuple(sorted({int(b) for b in batch_sizes}))
        ok = (
            bs
            and all(b >= 1 for b in bs)
            and all(isinstance(b, int) and not isinstance(b, bool) for b in batch_sizes)
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"batch_sizes: expected a non-empty list of ints >= 1, got {batch_sizes!r}"
        )
    return bs


def to_inference(
    model: nn.Module,
    format="auto",
    *,
    batch_sizes=None,
    example_input=None,
    calibrate: bool = True,
    margin: float = DEFAULT_MARGIN,
    block_size=None,
    inplace: bool = False,
    dense_too: bool = False,
    conv: bool = True,
    verbose: bool = False,
    _empty: bool = False,
    _blocks: dict | None = None,
) -> nn.Module:
    """A model for inference whose every sparse layer holds the representation that is fastest
    on its device: dense, CSR or BSR (module docstring: how it picks). Outputs equal the masked
    model's (the same weights, summed in another order: within float tolerance).

    Args:
        model: a model with sparse layers (``SparseLinear`` / ``SparseConv2d``, e.g. after
            ``sparsify`` and pruning), or one such layer.
        format: ``"auto"`` (choose per layer), ``"dense"``, ``"csr"``, ``"bsr"``, or a dict
            ``{layer name: format}`` (names as in ``model.named_modules()``; ``"keep"`` and
            unlisted layers stay as they are). A layer that cannot take a forced format (BSR for
            a grouped conv) stays as it is.
        batch_sizes: calibration batch sizes (rows of x for Linear layers, images for conv
            layers); default :data:`DEFAULT_BATCH_SIZES` for the layer's device.
        example_input: a batch (or a tuple of arguments) the model runs on, so that conv layers
            can be timed at their real input size (one forward pass, eval mode).
        calibrate: time the candidates (default); False: :data:`STATIC_RULE`.
        margin: a sparse format must take at most this fraction of the dense time to win a
            batch size (default 0.9).
        block_size: the BSR block ``(bm, bk)``; default each layer's own block size in block
            mode, else :data:`DEFAULT_BLOCK`. Given with ``format="auto"`` it means ``"bsr"``
            for every convertible layer, as this function did before it chose per layer.
        inplace: convert ``model`` itself instead of a deep copy.
        dense_too: also convert plain ``nn.Linear`` / ``nn.Conv2d`` layers (their zeros count as
            pruned).
        conv: convert conv layers (False: only Linear layers).
        verbose: print one line per layer (:func:`format_choices`).
    Returns:
        The converted model (``model`` itself when ``inplace``; if ``model`` is a single layer,
        the new layer). Each converted layer has an ``inference_choice`` (:class:`LayerChoice`);
        :func:`inference_choices` collects them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_inference: expected an nn.Module, got {type(model).__name__}")
    if block_size is not None:
        block_size = block_size_pair(block_size)  # fail before anything is converted
    allowed = ("auto", "keep", *FORMATS)
    if isinstance(format, str):
        if format not in allowed:
            raise ValueError(
                f"to_inference: expected format in {allowed} or a dict, got {format!r}"
            )
        if format == "auto" and block_size is not None:
            format = "bsr"
    elif isinstance(format, dict):
        bad = {k: v for k, v in format.items() if v not in allowed}
        if bad:
            raise ValueError(f"to_inference: expected formats in {allowed}, got {bad}")
    else:
        raise TypeError(f"to_inference: expected format as a str or a dict, got {format!r}")
    if not (isinstance(margin, (int, float)) and 0 < margin <= 1):
        raise ValueError(f"margin: expected a number in (0, 1], got {margin!r}")
    fixed_sizes = None if batch_sizes is None else _check_batch_sizes(batch_sizes)
    _warn_if_loaded(format, calibrate)

    target = model if inplace else copy.deepcopy(model)
    # (parent, attribute, name, module) for every convertible layer, outermost first
    found: list[tuple[nn.Module | None, str, str, nn.Module]] = []

    def walk(parent: nn.Module, prefix: str) -> None:
        for attr, child in parent._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            if _convertible(child, dense_too, conv):
                found.append((parent, attr, name, child))
            else:
                walk(child, name)

    if _convertible(target, dense_too, conv):
        found.append((None, "", "", target))
    else:
        walk(target, "")
    first_name: dict[int, str] = {}
    for _, _, name, child in found:
        first_name.setdefault(id(child), name)
    shapes = {}
    needs_shapes = format == "auto" or (isinstance(format, dict) and "auto" in format.values())
    if example_input is not None and needs_shapes and calibrate:
        shapes = _input_shapes(target, example_input, first_name)
    done: dict[int, nn.Module] = {}
    for parent, attr, name, child in found:
        if id(child) not in done:
            fmt = format if isinstance(format, str) else format.get(name, "keep")
            if fmt == "auto":
                sizes = fixed_sizes or DEFAULT_BATCH_SIZES.get(
                    child.weight.device.type, DEFAULT_BATCH_SIZES["cpu"]
                )
                sample = shapes.get(name)
                if sample is None and not isinstance(child, nn.Conv2d):
                    sample = (child.in_features,)
                new, choice = _auto(
                    name, child, block_size=block_size, batch_sizes=sizes, sample_shape=sample,
                    calibrate=calibrate, margin=margin,
                )  # fmt: skip
            else:
                block = (_blocks or {}).get(name, block_size)
                new, choice = _forced(name, child, fmt, block, _empty)
            new.inference_choice = choice
            done[id(child)] = new
        if parent is None:
            target = done[id(child)]
        else:
            setattr(parent, attr, done[id(child)])
    if verbose:
        print(format_choices(inference_choices(target)))
    return target


def inference_choices(model: nn.Module) -> dict[str, LayerChoice]:
    """``{layer name: LayerChoice}`` of the layers ``to_inference`` converted in ``model``."""
    return {
        n: m.inference_choice
        for n, m in model.named_modules()
        if isinstance(getattr(m, "inference_choice", None), LayerChoice)
    }


def format_choices(choices: dict[str, LayerChoice]) -> str:
    """One line per layer: name, shape, kept fraction, format, reason."""
    lines = []
    for name, c in choices.items():
        shape = "x".join(str(s) for s in c.weight_shape)
        fmt = c.format + ("" if c.dense_above is None else f" (dense above {c.dense_above})")
        lines.append(f"{name or '<model>'}: {c.kind} {shape}, {c.density:.1%} kept -> {fmt}: "
                     f"{c.reason}")  # fmt: skip
    return "\n".join(lines)


# =============================================================================================
# Reloading
# =============================================================================================
def inference_plan(state_dict: dict) -> dict[str, str]:
    """``{layer name: format}`` of an exported model's state dict: ``"csr"`` / ``"bsr"`` (from
    the extra state; a BSR state dict from before the per-layer choice has no format entry),
    ``"dense"`` (a weight and no mask) or ``"keep"`` (a sparse layer with its mask)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"inference_plan: expected a state dict, got {type(state_dict).__name__}")
    plan: dict[str, str] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == "values":
            extra = state_dict.get(f"{prefix}._extra_state" if prefix else "_extra_state")
            fmt = extra.get("format") if isinstance(extra, dict) else None
            if fmt is None:
                fmt = "bsr" if isinstance(value, torch.Tensor) and value.dim() == 3 else "csr"
            plan[prefix] = fmt
        elif leaf == "weight" and prefix not in plan:
            has_mask = (f"{prefix}.mask" if prefix else "mask") in state_dict
            plan[prefix] = "keep" if has_mask else "dense"
    return plan


def load_inference(model: nn.Module, state_dict: dict, strict: bool = True) -> nn.Module:
    """An exported model rebuilt from ``model`` (the architecture: e.g. a freshly built,
    sparsified model) and ``state_dict`` (an exported model's, e.g. read with
    ``torch.load(path, weights_only=True)``): every layer takes the format the state dict holds
    (:func:`inference_plan`), then the state dict is loaded. ``model`` itself is not touched, so
    a refused load (``RuntimeError`` naming expected vs got) leaves it as it was."""
    plan = inference_plan(state_dict)
    blocks = {}
    for name, fmt in plan.items():
        extra = state_dict.get(f"{name}._extra_state" if name else "_extra_state")
        if fmt == "bsr" and isinstance(extra, dict) and "block_size" in extra:
            blocks[name] = block_size_pair(tuple(extra["block_size"]))
    new = to_inference(model, format=plan, dense_too=True, _empty=True, _blocks=blocks)
    new.load_state_dict(state_dict, strict=strict)
    return new


# =============================================================================================
# Whole-model report (the main job's "exported inference time")
# =============================================================================================
def inference_report(
    model: nn.Module,
    example_input: torch.Tensor,
    batch_sizes=(1, 64),
    exported: nn.Module | None = None,
    repeats: int = 30,
    budget_s: float = 5.0,
    **export_kwargs,
) -> dict:
    """Export ``model`` (unless ``exported`` is given) and time it against the dense model with
    the same weights (``to_inference(model, format="dense")``), interleaved in one process at
    each batch size (inputs ``randn(batch, *example_input.shape[1:])``, ``torch.no_grad``, eval
    mode). Returns a JSON-ready dict: ``layers`` (each :class:`LayerChoice` as a dict),
    ``model`` (per batch size: ``dense_ms``, ``exported_ms``, ``speedup`` = dense / exported,
    medians of per-repeat ratios), ``max_abs_diff`` of the logits, threads, device, torch
    version and the 1-minute load average when it was measured."""
    sizes = _check_batch_sizes(batch_sizes)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise TypeError(
            f"inference_report: expected example_input as a batched tensor, got "
            f"{type(example_input).__name__}"
        )
    src = copy.deepcopy(model).eval()
    if exported is None:
        export_kwargs.setdefault("batch_sizes", sizes)
        exported = to_inference(src, example_input=example_input[:1], **export_kwargs)
    exported = exported.eval()
    dense = to_inference(src, format="dense").eval()
    device = next(src.parameters()).device
    rows, diff = [], 0.0
    with torch.no_grad():
        for b in sizes:
            x = torch.randn(b, *example_input.shape[1:], dtype=example_input.dtype,
                            device=device)  # fmt: skip
            diff = max(diff, float((exported(x) - dense(x)).abs().max()))
            res = interleaved_times(
                {"dense": lambda x=x: dense(x), "exported": lambda x=x: exported(x)},
                repeats=repeats, budget_s=budget_s, device=device,
            )  # fmt: skip
            rows.append({
                "batch": b,
                "dense_ms": res["dense"][0] * 1e3,
                "exported_ms": res["exported"][0] * 1e3,
                "speedup": res["exported"][1],
            })  # fmt: skip
    return {
        "layers": [c.as_dict() for c in inference_choices(exported).values()],
        "model": rows,
        "max_abs_diff": diff,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def format_report(report: dict) -> str:
    """The report as text: one line per layer, then one per batch size."""
    lines = []
    for c in report["layers"]:
        shape = "x".join(str(s) for s in c["weight_shape"])
        fmt = c["format"] + (
            "" if c["dense_above"] is None else f" (dense above {c['dense_above']})"
        )
        lines.append(f"  {c['name'] or '<model>'} {c['kind']} {shape}: {c['density']:.1%} kept -> "
                     f"{fmt}")  # fmt: skip
    for r in report["model"]:
        lines.append(
            f"  batch {r['batch']}: dense {r['dense_ms']:.3f} ms, exported "
            f"{r['exported_ms']:.3f} ms ({r['speedup']:.2f}x)"
        )
    load = report.get("load_average_1min")
    lines.append(f"  ({report['threads']} threads on {report['device']}, load average "
                 f"{'n/a' if load is None else f'{load:.2f}'}, max |logit diff| "
                 f"{report['max_abs_diff']:.1e})")  # fmt: skip
    return "\n".join(lines)
