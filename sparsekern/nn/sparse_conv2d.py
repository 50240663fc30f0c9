"""SparseConv2d: ``nn.Conv2d`` with a bool mask applied to its weight (``sparsekern.ops``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from sparsekern.nn._sparse_module import SparseModuleMixin, adopt_parameters, check_convertible
from sparsekern.ops.masked_conv2d import masked_conv2d

__all__ = ["SparseConv2d"]


class SparseConv2d(SparseModuleMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight is masked: ``y = conv2d(x, weight * mask) + bias``.

    Takes every ``nn.Conv2d`` argument (``padding`` as int, pair, ``'same'`` or ``'valid'``;
    ``padding_mode`` ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``, handled as
    ``nn.Conv2d`` does: non-zero modes pad the input explicitly, then convolve unpadded).

    Shapes: ``weight [out_channels, in_channels / groups, kH, kW]``, ``mask`` bool of the same
    shape (persistent buffer, all True at construction), ``bias [out_channels]``; ``forward`` maps
    ``[N, in_channels, H, W]`` (or unbatched ``[in_channels, H, W]``) to
    ``[N, out_channels, H_out, W_out]`` through :func:`sparsekern.ops.masked_conv2d.masked_conv2d`,
    whose ``weight.grad`` is exactly zero where the mask is False.

    Change the mask with :meth:`set_mask`; state dict, deepcopy and pickle behave as for
    :class:`sparsekern.nn.SparseLinear` (keys ``weight``, ``bias``, ``mask``; a dense
    ``nn.Conv2d`` state dict loads with ``strict=True`` and sets the mask all True).
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

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        # Mirrors nn.Conv2d._conv_forward with masked_conv2d in place of F.conv2d.
        if self.padding_mode != "zeros":
            padded = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return masked_conv2d(
                padded, weight, self.mask, bias, self.stride, _pair(0), self.dilation, self.groups
            )
        return masked_conv2d(
            input, weight, self.mask, bias, self.stride, self.padding, self.dilation, self.groups
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``[N, in_channels, H, W] -> [N, out_channels, H_out, W_out]`` (batch dim optional)."""
        return self._conv_forward(input, self.weight, self.bias)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None) -> SparseConv2d:
        """A SparseConv2d computing what ``conv`` computes, SHARING its parameters.

        Same contract as :meth:`sparsekern.nn.SparseLinear.from_dense`: the very same ``weight`` /
        ``bias`` Parameter objects (device, dtype, ``requires_grad`` unchanged; existing optimizers
        keep working), all conv arguments and the training mode copied, hooks not.

        Args:
            conv: an initialised ``nn.Conv2d`` (a SparseConv2d's mask is copied along).
            mask: optional bool ``[out_channels, in_channels / groups, kH, kW]`` on the weight's
                device, installed with :meth:`set_mask` (zeroing the shared weight where False).
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
        return adopt_parameters(sparse, conv, mask)
