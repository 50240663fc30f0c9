"""SparseConv2d: ``nn.Conv2d`` with a bool mask applied to its weight (``sparsekern.ops``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from sparsekern.nn._sparse_module import SparseModuleMixin, adopt_parameters, check_convertible
from sparsekern.nn.execution_plan import (
    _ALL_KEPT_WHY,
    PathChoice,
    _cached_choice,
    _kept,
    _mask_of,
    _needs_weight_grad,
    _weight_of,
)
from sparsekern.ops._conv import resolve_padding
from sparsekern.ops.block_sparse_conv2d import block_masked_conv2d
from sparsekern.ops.masked_conv2d import masked_conv2d_trusted
from sparsekern.ops.sparse_train import conv2d as sparse_conv_op

__all__ = ["SPARSE_CONV_MAX_KEPT", "SparseConv2d", "conv_path", "symmetric_zero_padding"]

# The unstructured sparse training path (``sparsekern.ops.sparse_train.conv2d``) runs when the
# kept fraction is at most this, scaled by the batch's share of its 16-lane padding (N / 16k).
# Fitted to measured crossovers (docs/kernels.md; 2 threads, loaded machine, step time over
# nn.Conv2d's): at batch 32 the sparse step matched dense at kept 0.33 (layer3 3x3 256, 14x14),
# 0.38 (layer4 3x3 512, 7x7), 0.30 (3x3 s2 128->256, 28x28), ~0.5 (1x1 256, 14x14); at kept 0.2
# it measured 0.64-0.74 (batch 32) and 0.69-0.71 (batch 16), at kept 0.1 with batch 8 0.68-0.75.
SPARSE_CONV_MAX_KEPT = 0.2
# Below these sizes the layout passes and index work are not repaid (a 3-channel stem conv).
_MIN_CHANNELS = 16


def symmetric_zero_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """``conv``'s padding as a symmetric pair of zero paddings (what the block-sparse conv
    kernels take), or None when it is not one: a ``padding_mode`` other than ``'zeros'``, or a
    ``'same'`` padding whose total is odd."""
    w = conv.weight
    return _symmetric_pad(conv.padding_mode, conv.padding, w, conv.stride, conv.dilation)


def _symmetric_pad(padding_mode, padding, weight, stride, dilation) -> tuple[int, int] | None:
    # ``weight``: anything with the weight's ``shape`` (a meta tensor will do)
    if padding_mode != "zeros":
        return None
    pad, extra = resolve_padding(padding, weight, stride, dilation)
    return None if extra is not None else pad


class SparseConv2d(SparseModuleMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight is masked: ``y = conv2d(x, weight * mask) + bias``.

    Takes every ``nn.Conv2d`` argument (``padding`` as int, pair, ``'same'`` or ``'valid'``;
    ``padding_mode`` ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``, handled as
    ``nn.Conv2d`` does: non-zero modes pad the input explicitly, then convolve unpadded).

    Shapes: ``weight [out_channels, in_channels / groups, kH, kW]``, ``mask`` bool of the same
    shape (persistent buffer, all True at construction), ``bias [out_channels]``; ``forward`` maps
    ``[N, in_channels, H, W]`` (or unbatched ``[in_channels, H, W]``) to
    ``[N, out_channels, H_out, W_out]``. As for :class:`sparsekern.nn.SparseLinear`, the forward
    and dX are ``F.conv2d``'s own (cuDNN, oneDNN) on the weight, whose pruned entries are exactly
    zero, and ``weight.grad`` is exactly zero where the mask is False
    (:func:`sparsekern.ops.masked_conv2d`).

    Change the mask with :meth:`set_mask`; state dict, deepcopy and pickle behave as for
    :class:`sparsekern.nn.SparseLinear` (keys ``weight``, ``bias``, ``mask``; a dense
    ``nn.Conv2d`` state dict loads with ``strict=True`` and sets the mask all True).

    Unstructured sparse path (automatic, CPU, groups=1): when a weight gradient is needed and
    the kept fraction is low enough for the batch (:func:`conv_path`: at most
    :data:`SPARSE_CONV_MAX_KEPT` x N / (N rounded up to 16)), forward, dX and dW run on the kept
    weights only (:func:`sparsekern.ops.sparse_train.conv2d.sparse_conv2d`, C++/OpenMP); else the
    vendor path above. :meth:`execution_path` (and ``sparsekern.nn.execution_plan``) says which
    path runs and why. Same results (fp32 rounding aside) and gradients, double backward included.

    Block mode (``block_size=(bm, bk)``, groups=1 only): the block-sparse kernels
    (``sparsekern.ops.block_sparse_conv2d``) skip every all-pruned block of the weight's tap-major
    view (``bm`` output x ``bk`` input channels of one kernel tap); prune whole blocks with
    ``sparsekern.pruning.block.prune_blocks_``. Same results and gradients as the default mode.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        block_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_mask()
        self.set_block_size(block_size)

    def set_block_size(self, block_size: int | tuple[int, int] | None) -> None:
        """Switch to block mode with ``(bm, bk)`` blocks (groups=1 only), or back with None."""
        if block_size is not None and self.groups != 1:
            raise ValueError(f"SparseConv2d: block mode needs groups=1, got groups={self.groups}")
        super().set_block_size(block_size)

    def execution_path(
        self, input_shape: tuple[int, ...] | None = None, *, training: bool | None = None
    ) -> PathChoice:
        """The path the forward runs for an input of ``input_shape`` (see
        ``sparsekern.nn.execution_plan`` for the protocol; :func:`conv_path` for the rule)."""
        return conv_path(self, input_shape, training)

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        # Mirrors nn.Conv2d._conv_forward with the chosen path in place of F.conv2d.
        x, padding = input, self.padding
        if self.padding_mode != "zeros":
            x = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = _pair(0)
        mask = self.checked_mask()
        self.__dict__["_last_input_shape"] = tuple(input.shape)
        path, kept, _ = self.execution_path(tuple(input.shape))
        if path == "dense" and kept == 1.0:  # no masked dW: a later mask change must resync
            self._note_unmasked_forward(mask)
        bs = getattr(self, "block_size", None)  # None for modules pickled before block mode
        if path == "sparse":
            unbatched = x.dim() == 3
            x = x.unsqueeze(0) if unbatched else x
            pad = (0, 0) if self.padding_mode != "zeros" else symmetric_zero_padding(self)
            y = sparse_conv_op.sparse_conv2d(
                x, weight, mask, bias, _pair(self.stride), pad, _pair(self.dilation)
            )
            return y.squeeze(0) if unbatched else y
        if bs is not None:
            pad = (0, 0) if self.padding_mode != "zeros" else symmetric_zero_padding(self)
            if pad is not None:  # else an asymmetric 'same': the vendor conv handles it
                unbatched = x.dim() == 3
                x = x.unsqueeze(0) if unbatched else x
                y = block_masked_conv2d(
                    x, weight, mask, bias, self.stride, pad, self.dilation, bs,
                    assume_pruned_zero=True,
                )  # fmt: skip
                return y.squeeze(0) if unbatched else y
        if path == "masked":
            return masked_conv2d_trusted(
                x, weight, mask, bias, self.stride, padding, self.dilation, self.groups
            )
        return F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``[N, in_channels, H, W] -> [N, out_channels, H_out, W_out]`` (batch dim optional)."""
        return self._conv_forward(input, self.weight, self.bias)

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        mask: torch.Tensor | None = None,
        block_size: int | tuple[int, int] | None = None,
    ) -> SparseConv2d:
        """A SparseConv2d computing what ``conv`` computes, SHARING its parameters.

        Same contract as :meth:`sparsekern.nn.SparseLinear.from_dense`: the very same ``weight`` /
        ``bias`` Parameter objects (device, dtype, ``requires_grad`` unchanged; existing optimizers
        keep working), all conv arguments and the training mode copied, hooks not.

        Args:
            conv: an initialised ``nn.Conv2d`` (a SparseConv2d's mask is copied along).
            mask: optional bool ``[out_channels, in_channels / groups, kH, kW]`` on the weight's
                device, installed with :meth:`set_mask` (zeroing the shared weight where False).
            block_size: block mode (groups=1); default: off, or ``conv``'s own block size.
        """
        check_convertible(conv, nn.Conv2d, f"{cls.__name__}.from_dense")
        sparse = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",  # no memory or random init for a weight about to be replaced
            dtype=conv.weight.dtype,
        )
        return adopt_parameters(sparse, conv, mask, block_size)


def conv_path(module: SparseConv2d, input_shape, training: bool | None) -> PathChoice:
    """:meth:`SparseConv2d.execution_path`'s rule: ``block`` in block mode (symmetric zero
    padding); ``dense`` when no weight gradient is needed or the mask is all True; ``sparse`` on
    the CPU, groups=1, no autocast, the C++ extension loaded, at least 16 channels each side, and
    a kept fraction at most ``SPARSE_CONV_MAX_KEPT * N / ceil16(N)`` (the kernels vectorise over
    the batch in 16 lanes); ``masked`` (vendor conv, masked dW) otherwise; under
    ``torch.compile`` the vendor paths. The forward runs what this returns."""
    bs = module.__dict__.get("block_size")
    if torch.compiler.is_compiling():
        # The mask's nnz is data-dependent (no graph guard on it) and the C++ kernels are opaque
        # to the compiler: a compiled forward runs the traceable vendor/block paths, and the kept
        # fraction is not computed (nan).
        pad = (0, 0) if module.padding_mode != "zeros" else symmetric_zero_padding(module)
        if bs is not None and pad is not None:
            return PathChoice("block", float("nan"), "block mode under torch.compile")
        grad = _needs_weight_grad(module, training)
        return PathChoice("masked" if grad else "dense", float("nan"), "torch.compile: vendor conv")
    weight, mask = _weight_of(module), _mask_of(module)
    needs = _needs_weight_grad(module, training, weight)
    n = 1 if input_shape is None or len(input_shape) == 3 else int(input_shape[0])
    geometry = (module.padding_mode, module.padding, module.stride, module.dilation, module.groups)
    args = (n, bs, needs, geometry, tuple(weight.shape), weight.device, weight.dtype)
    args += (torch.is_autocast_enabled("cpu"),)
    if type(mask).__name__ == "DTensor":
        return _conv_choice(_kept(module), *args, ext=True)
    return _cached_choice(mask, "conv_path", _conv_choice, args)  # the rule costs ~10-20 us a call


def _conv_choice(
    kept, n, bs, needs, geometry, wshape, device, dtype, autocast, ext=None
) -> PathChoice | None:
    """The choice for these arguments; None when it depends on the C++ extension and ``ext`` is
    None (the caller asks again with ``ext=True``, keyed on the extension's state)."""
    padding_mode, padding, stride, dilation, groups = geometry
    # A non-zero padding mode pads the input explicitly, then convolves unpadded
    pad = (0, 0)
    if padding_mode == "zeros":
        shape = torch.empty(wshape, device="meta")  # resolve_padding reads the kernel size
        pad = _symmetric_pad(padding_mode, padding, shape, stride, dilation)
    if bs is not None and pad is not None:
        return PathChoice("block", kept, f"block mode {bs}: all-pruned blocks are skipped")
    if not needs:
        return PathChoice(
            "dense", kept, "no weight gradient needed: F.conv2d on the weight (pruned entries 0)"
        )
    if kept == 1.0:
        return PathChoice("dense", kept, _ALL_KEPT_WHY.format(op="F.conv2d", twin="nn.Conv2d"))
    c_out, c_in = wshape[0], wshape[1] * groups
    why_not = _sparse_blocker(device, groups, pad, dtype, autocast, c_in, c_out)
    if why_not is None:
        if ext is None:
            return None
        if not sparse_conv_op.extension_available():
            why_not = "the C++ extension is unavailable"
    if why_not is None:
        lanes = -(-n // 16) * 16
        limit = SPARSE_CONV_MAX_KEPT * n / lanes
        if kept <= limit:
            return PathChoice(
                "sparse",
                kept,
                f"kept {kept:.3f} <= {limit:.3f} (= {SPARSE_CONV_MAX_KEPT} x batch {n} / "
                f"{lanes} lanes): C++ kernels on the kept weights only",
            )
        why_not = (
            f"kept {kept:.3f} > {limit:.3f} (= {SPARSE_CONV_MAX_KEPT} x batch {n} / {lanes} "
            "lanes), where the sparse kernels stop paying"
        )
    return PathChoice(
        "masked", kept, f"vendor conv for forward and dX, weight gradient masked ({why_not})"
    )


def _sparse_blocker(device, groups, pad, dtype, autocast, c_in, c_out) -> str | None:
    """Why the sparse kernels cannot run this layer (the extension aside), or None."""
    if device.type != "cpu":
        return f"on {device.type}: the sparse kernels are CPU only, no GPU benchmark yet"
    if groups != 1:
        return f"groups={groups}: the sparse kernels take groups=1"
    if pad is None:
        return "asymmetric 'same' padding"
    if dtype not in sparse_conv_op._KERNEL_DTYPES:
        return f"dtype {dtype}: the sparse kernels compute in fp32"
    if autocast:
        return "autocast is on: the vendor path applies it"
    if min(c_in, c_out) < _MIN_CHANNELS:
        return f"fewer than {_MIN_CHANNELS} channels: layout passes not repaid"
    return None
