"""Inference layers for unstructured masks: ``CSRLinear`` and ``CSRConv2d`` hold only the kept
weights, as a :class:`~sparsekern.formats.csr.CSRMatrix` (values, int32 row pointers, int16 column
indices), and run :func:`sparsekern.ops.csr_linear` (MKL / cuSPARSE, the Triton decode kernel on
CUDA for 1..32 rows).

Both take ``dense_above``: above that many rows (Linear: rows of x, all leading dimensions;
conv: images) the forward runs the dense vendor op instead, on a dense copy of the weight built on
first use and kept (``to_inference`` sets it where its calibration measured dense faster at the
larger batch sizes; on CUDA it defaults to the kernel's 32-row limit). That copy costs the dense
weight's memory, and only once a batch that large arrives.

Memory and the state dict: ``values [nnz]`` + ``col_idx [nnz]`` (int16 up to 32768 columns) +
``row_ptr [rows + 1]`` (int32): ``nnz * (itemsize + 2) + 4 * (rows + 1)`` bytes against
``rows * cols * itemsize`` dense, i.e. 1.5x the kept fraction in fp32 (0.15 of dense at 10%).
The CPU path also caches an int32 copy of the column indices for MKL (4 bytes per entry).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.formats.csr import CSRFormatError, CSRMatrix
from sparsekern.nn.sparse_conv2d import symmetric_zero_padding
from sparsekern.ops._checks import check_bias, nonfinite_conv, nonfinite_rows
from sparsekern.ops._dispatch import use_kernels
from sparsekern.ops._mask_cache import cached_on_mask, tensor_key
from sparsekern.ops.csr_linear import csr_linear, torch_csr, torch_csr_product

__all__ = ["CSRConv2d", "CSRLinear", "DenseFallback", "check_dense_above", "plain_cpu_call"]

_MKL_DTYPES = (torch.float32, torch.float64)


def plain_cpu_call(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """True when a layer call on ``x`` may skip autograd and the op checks and run torch's
    sparse product directly: a float32/float64 CPU tensor of the parameters' dtype, no gradient
    wanted, no autocast, no interpreter, not under torch.compile. That saves ~20 us a call, as
    much as a whole batch-1 LeNet layer takes."""
    if not x.is_cpu or x.dtype not in _MKL_DTYPES:
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or any(p is not None and p.requires_grad for p in params)
    ):
        return False
    for p in params:
        if p is not None and p.dtype != x.dtype:
            return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    return not use_kernels(x)


def check_dense_above(value) -> int | None:
    """``value`` as the ``dense_above`` threshold (None or an int >= 0); raises ``ValueError``
    naming what it got."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"dense_above: expected None or an int >= 0, got {value!r}")
    return value


class DenseFallback:
    """What the sparse inference layers share: ``dense_above`` and the dense weight cached for
    the batches above it. Subclasses define ``values`` (a Parameter) and ``to_dense()``."""

    dense_above: int | None
    values: nn.Parameter

    def _init_storage(self, weight, bias, out: int, dense_above) -> None:
        """Copies of ``weight``'s ``values`` (the Parameter) and ``row_ptr`` / ``col_idx``
        (buffers), of ``bias`` ``[out]`` (a Parameter, or None), and ``dense_above``."""
        self.values = nn.Parameter(weight.values.detach().clone())
        self.register_buffer("row_ptr", weight.row_ptr.clone())
        self.register_buffer("col_idx", weight.col_idx.clone())
        if bias is not None:
            check_bias(type(self).__name__, bias, out)
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("bias", None)
        self.dense_above = check_dense_above(dense_above)
        self._matrix = None  # assembled from the Parameter and buffers on first use

    def _above(self, rows: int) -> bool:
        """True when ``rows`` (rows of x, or images) run dense."""
        return self.dense_above is not None and rows > self.dense_above

    def _dense_weight(self) -> torch.Tensor:
        """The dense weight: differentiable (rebuilt) when a gradient is wanted or under
        ``torch.compile``, else built once and cached until ``values`` changes."""
        if (torch.is_grad_enabled() and self.values.requires_grad) or (
            torch.compiler.is_compiling()
        ):
            return self.to_dense()
        v, rp, ci = self._parameters["values"], self._buffers["row_ptr"], self._buffers["col_idx"]
        layer = weakref.ref(self)  # not self: the cache entry would keep the layer alive

        def compute(_v, _index=(rp, ci)):  # _index keeps tensor_key's ids those tensors'
            with torch.no_grad():
                return layer().to_dense()

        key = (v.data_ptr(), v.dtype, v.device) + tensor_key(rp, ci)
        return cached_on_mask(v, "dense_weight", compute, key)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_matrix"] = None
        return state


class _CSRLayer(DenseFallback, nn.Module):
    """``values [nnz]`` (a Parameter), ``row_ptr`` / ``col_idx`` buffers, the ``weight``
    CSRMatrix assembled from them, ``bias``, and a state-dict load that accepts any nnz.
    Subclasses set ``_matrix_shape`` and ``_extra()``."""

    _matrix_shape: tuple[int, int]

    def _init_csr(self, weight: CSRMatrix, bias, out: int, dense_above) -> None:
        if not isinstance(weight, CSRMatrix):
            raise TypeError(
                f"{type(self).__name__}: weight must be a CSRMatrix, got {type(weight).__name__}"
            )
        self._init_storage(weight, bias, out, dense_above)

    @property
    def weight(self) -> CSRMatrix:
        """The layer's :class:`CSRMatrix`; its ``values`` is the ``values`` Parameter."""
        m = self.__dict__.get("_matrix")
        if (
            m is None
            or m.values is not self.values
            or m.row_ptr is not self.row_ptr
            or m.col_idx is not self.col_idx
        ):
            # Rebuilt after .to(), a load or a cast.
            m = CSRMatrix(
                self.values, self.row_ptr, self.col_idx, self._matrix_shape, validate=False
            )
            self.__dict__["_matrix"] = m
        return m

    def _torch_csr(self) -> torch.Tensor:
        """torch's ``sparse_csr`` of the stored entries (int32 indices: an int32 copy of
        ``col_idx``, 4 bytes per entry), cached on ``values`` until a tensor is replaced or
        changed in place (``ops.csr_linear.torch_csr``)."""
        v, rp, ci = self._parameters["values"], self._buffers["row_ptr"], self._buffers["col_idx"]
        return torch_csr(v, rp, ci, *self._matrix_shape)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        """Stored fraction of the weight."""
        return self.weight.density

    # -- state dict ----------------------------------------------------------------------------
    def _extra(self) -> dict:
        """Extra-state entries a loaded state dict must match, besides the format."""
        raise NotImplementedError

    def get_extra_state(self):
        return {"format": "csr", **self._extra(), "dense_above": self.dense_above}

    def _extra_error(self, state) -> str | None:
        if not isinstance(state, dict):
            return f"expected a dict as extra state, got {type(state).__name__}"
        if state.get("format", "csr") != "csr":
            return f"expected format 'csr' in the extra state, got {state.get('format')!r}"
        for key, want in self._extra().items():
            if key not in state:
                return f"expected {key!r} in the extra state, got keys {sorted(state)}"
            got = state[key]
            got = tuple(got) if isinstance(got, (list, tuple)) else got
            want = tuple(want) if isinstance(want, (list, tuple)) else want
            if got != want:
                return f"expected {key} {want}, got {got}"
        try:
            check_dense_above(state.get("dense_above"))
        except ValueError as e:
            return str(e)
        return None

    def set_extra_state(self, state) -> None:
        err = self._extra_error(state)
        if err:
            raise ValueError(f"{type(self).__name__}: {err}")
        self.dense_above = state.get("dense_above")

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Any nnz: validate the stored matrix first, then replace the tensors (shapes then match
        # and the default load below copies them). A refused load leaves the layer as it was.
        extra = state_dict.get(prefix + "_extra_state")
        err = None if extra is None else self._extra_error(extra)
        if err:
            error_msgs.append(f"While loading {prefix!r}: {type(self).__name__}: {err}")
            return
        keys = [prefix + k for k in ("values", "row_ptr", "col_idx")]
        if all(k in state_dict for k in keys):
            try:
                m = CSRMatrix(*(state_dict[k] for k in keys), self._matrix_shape)
            except CSRFormatError as e:
                error_msgs.append(f"While loading {prefix!r}: {type(self).__name__}: {e}")
                return
            dev = self.values.device
            with torch.no_grad():
                self.values = nn.Parameter(
                    m.values.to(dev, self.values.dtype), self.values.requires_grad
                )
            self.row_ptr = m.row_ptr.to(dev)
            self.col_idx = m.col_idx.to(dev)
            self.__dict__["_matrix"] = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class CSRLinear(_CSRLayer):
    """``y = x @ W^T + b`` with ``W`` a :class:`CSRMatrix` ``(out_features, in_features)``: only
    the kept weights exist, in memory and in the state dict.

    Parameters: ``values [nnz]`` (trainable at a fixed pattern: gradients reach stored entries
    only) and ``bias [out_features]`` or None. Buffers: ``row_ptr [out_features + 1]`` (int32),
    ``col_idx [nnz]`` (int16 up to 32768 inputs, else int32). Extra state: format, shape,
    ``dense_above``. Loading a state dict replaces the pattern (any nnz), validated.

    ``forward``: ``[..., in_features] -> [..., out_features]``; above ``dense_above`` rows the
    dense GEMM (module docstring).
    """

    def __init__(
        self, weight: CSRMatrix, bias: torch.Tensor | None = None, dense_above: int | None = None
    ) -> None:
        super().__init__()
        if not isinstance(weight, CSRMatrix):
            raise TypeError(f"CSRLinear: weight must be a CSRMatrix, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        self._matrix_shape = weight.shape
        self._init_csr(weight, bias, self.out_features, dense_above)

    @classmethod
    def from_sparse(cls, layer: nn.Linear, dense_above: int | None = None) -> CSRLinear:
        """From a ``SparseLinear`` (its kept weights, by the mask) or a plain ``nn.Linear`` (its
        nonzero weights)."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(
                f"CSRLinear.from_sparse: expected an nn.Linear / SparseLinear, got "
                f"{type(layer).__name__}"
            )
        mask = layer._buffers.get("mask")
        with torch.no_grad():
            w = CSRMatrix.from_dense(layer.weight.detach(), mask=mask)
        new = cls(w, None if layer.bias is None else layer.bias.detach(), dense_above)
        new.values.requires_grad_(layer.weight.requires_grad)
        new.train(layer.training)
        return new

    @classmethod
    def empty_like(cls, layer: nn.Linear) -> CSRLinear:
        """A layer of ``layer``'s shape, dtype and device with nothing stored: what a state-dict
        load then fills."""
        w = layer.weight
        m = CSRMatrix.from_dense(torch.zeros(w.shape, dtype=w.dtype, device=w.device))
        return cls(m, None if layer.bias is None else layer.bias.detach())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``[..., in_features] -> [..., out_features]``."""
        k, params = self.in_features, self._parameters
        bias = params["bias"]
        if self.dense_above is not None and input.numel() // max(k, 1) > self.dense_above:
            return F.linear(input, self._dense_weight(), bias)
        if input.shape[-1] == k and plain_cpu_call(input, params["values"], bias):
            if input.dim() == 2:
                return nonfinite_rows(input, torch_csr_product(self._torch_csr(), input, bias))
            x2 = input.reshape(-1, k)
            y = nonfinite_rows(x2, torch_csr_product(self._torch_csr(), x2, bias))
            return y.reshape(*input.shape[:-1], self.out_features)
        y = csr_linear(input, self.weight, self.bias)
        if input.shape[-1] != k or input.dim() == 0:
            return y
        return nonfinite_rows(input.reshape(-1, k), y.reshape(-1, self.out_features)).view_as(y)

    def to_dense(self) -> torch.Tensor:
        """``[out_features, in_features]``: the dense weight (zeros where nothing is stored)."""
        return self.weight.to_dense()

    def _extra(self) -> dict:
        return {"shape": [self.out_features, self.in_features]}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nnz={self.nnz}, density={self.density:.4f}, "
            f"dense_above={self.dense_above}"
        )


def conv_geometry(conv: nn.Conv2d) -> dict:
    """What ``F.unfold`` needs of ``conv``: ``padding`` (symmetric pair) and, where the conv pads
    otherwise (reflect/replicate/circular modes, an odd ``'same'``), ``input_pad`` (F.pad's
    4-tuple, applied first) and ``pad_mode``; plus ``stride`` and ``dilation``."""
    sym = symmetric_zero_padding(conv)
    if sym is not None:
        return {
            "stride": tuple(conv.stride), "padding": tuple(sym), "dilation": tuple(conv.dilation),
            "input_pad": None, "pad_mode": "constant",
        }  # fmt: skip
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return {
        "stride": tuple(conv.stride), "padding": (0, 0), "dilation": tuple(conv.dilation),
        "input_pad": tuple(int(p) for p in conv._reversed_padding_repeated_twice),
        "pad_mode": mode,
    }  # fmt: skip


class CSRConv2d(_CSRLayer):
    """A groups=1 ``Conv2d`` whose weight is the :class:`CSRMatrix` of its GEMM view
    ``[C_out, C_in*kH*kW]`` (``weight.reshape(C_out, -1)``: F.unfold's column order).

    ``forward``: ``[N, C_in, H, W]`` (or ``[C_in, H, W]``) -> ``[N, C_out, OH, OW]``
    (contiguous): the input unfolded to patches ``[N*OH*OW, C_in*kH*kW]`` (one im2col copy and
    one transpose copy), the sparse product on the patches (torch's CSR product on the CPU,
    ``csr_linear`` elsewhere), then one copy of the output into NCHW order (none at one image).
    Above ``dense_above`` images: ``F.conv2d`` on the dense weight.
    """

    def __init__(
        self,
        weight: CSRMatrix,
        weight_shape,
        bias: torch.Tensor | None = None,
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        input_pad: tuple[int, int, int, int] | None = None,
        pad_mode: str = "constant",
        dense_above: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(weight, CSRMatrix):
            raise TypeError(f"CSRConv2d: weight must be a CSRMatrix, got {type(weight).__name__}")
        c_out, c_in, kh, kw = (int(s) for s in weight_shape)
        if weight.shape != (c_out, c_in * kh * kw):
            raise ValueError(
                f"CSRConv2d: expected the GEMM view of shape {(c_out, c_in * kh * kw)} for "
                f"weight_shape {tuple(weight_shape)}, got {weight.shape}"
            )
        self.in_channels, self.out_channels, self.kernel_size = c_in, c_out, (kh, kw)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.input_pad = None if input_pad is None else tuple(int(p) for p in input_pad)
        self.pad_mode = pad_mode
        self._matrix_shape = weight.shape
        self._init_csr(weight, bias, c_out, dense_above)

    @classmethod
    def from_sparse(cls, conv: nn.Conv2d, dense_above: int | None = None) -> CSRConv2d:
        """From a ``SparseConv2d`` (kept weights, by the mask) or an ``nn.Conv2d`` (nonzero
        weights), groups=1, any padding mode."""
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise TypeError(
                f"CSRConv2d.from_sparse: expected an nn.Conv2d / SparseConv2d with groups=1, got "
                f"{conv!r}"
            )
        mask = conv._buffers.get("mask")
        c_out = conv.out_channels
        with torch.no_grad():
            w = conv.weight.detach().reshape(c_out, -1)
            m = CSRMatrix.from_dense(w, mask=None if mask is None else mask.reshape(c_out, -1))
        bias = None if conv.bias is None else conv.bias.detach()
        new = cls(m, tuple(conv.weight.shape), bias, dense_above=dense_above, **conv_geometry(conv))
        new.values.requires_grad_(conv.weight.requires_grad)
        new.train(conv.training)
        return new

    @classmethod
    def empty_like(cls, conv: nn.Conv2d) -> CSRConv2d:
        """A layer of ``conv``'s geometry, dtype and device with nothing stored."""
        w = conv.weight
        m = CSRMatrix.from_dense(
            torch.zeros(w.shape[0], w[0].numel(), dtype=w.dtype, device=w.device)
        )
        bias = None if conv.bias is None else conv.bias.detach()
        return cls(m, tuple(w.shape), bias, **conv_geometry(conv))

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def to_dense(self) -> torch.Tensor:
        """``[C_out, C_in, kH, kW]``: the dense weight (zeros where nothing is stored)."""
        return self.weight.to_dense().reshape(self.weight_shape)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        unbatched = input.dim() == 3
        x = input.unsqueeze(0) if unbatched else input
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"CSRConv2d: expected input [N, {self.in_channels}, H, W] or "
                f"[{self.in_channels}, H, W], got {list(input.shape)}"
            )
        if x.dtype != self.values.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"CSRConv2d: expected input of the weight's dtype {self.values.dtype}, got "
                f"{x.dtype}"
            )
        if self.input_pad is not None:
            x = F.pad(x, self.input_pad, mode=self.pad_mode)
        if self._above(x.shape[0]):
            y = F.conv2d(
                x, self._dense_weight(), self.bias, self.stride, self.padding, self.dilation
            )
        else:
            y = self._sparse_forward(x)
        return y.squeeze(0) if unbatched else y

    def _sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            self.kernel_size, self.stride, self.padding, self.dilation
        )  # fmt: skip
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if oh <= 0 or ow <= 0:
            raise ValueError(
                f"CSRConv2d: input {list(x.shape)} is smaller than the (dilated) kernel "
                f"{self.kernel_size} with padding {self.padding}"
            )
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        rows = patches.transpose(1, 2).reshape(n * oh * ow, patches.shape[1])
        if plain_cpu_call(rows, self.values, self.bias):
            y = torch_csr_product(self._torch_csr(), rows, self.bias)
        else:
            y = csr_linear(rows, self.weight, self.bias)
        c = self.out_channels  # y: [N*OH*OW, C_out], column-major from torch's CSR product
        if y.t().is_contiguous():  # [C_out, N, OH, OW] in memory
            out = y.t().view(c, n, oh, ow).permute(1, 0, 2, 3)
        else:  # row-major: channels_last in memory
            out = y.reshape(n, oh, ow, c).permute(0, 3, 1, 2)
        out = nonfinite_conv(x, out, self.kernel_size, self.stride, self.padding, self.dilation)
        return out.contiguous()

    def _extra(self) -> dict:
        return {
            "weight_shape": list(self.weight_shape),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "input_pad": None if self.input_pad is None else list(self.input_pad),
            "pad_mode": self.pad_mode,
        }

    def extra_repr(self) -> str:
        pad = "" if self.input_pad is None else f", input_pad={self.input_pad} ({self.pad_mode})"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}{pad}, "
            f"bias={self.bias is not None}, nnz={self.nnz}, density={self.density:.4f}, "
            f"dense_above={self.dense_above}"
        )
