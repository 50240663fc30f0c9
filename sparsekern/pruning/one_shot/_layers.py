"""The layers one-shot pruning handles (``nn.Linear``, ``nn.Conv2d``, HF ``Conv1D`` and their
sparse versions): their kind, their GEMM view ``[outputs, inputs]`` of weights and inputs, and
which layers the default selection skips (the LM head, tied weights)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn._sparse_module import is_sparse_module
from sparsekern.nn.sparse_attention import SparseConv1D, is_hf_conv1d
from sparsekern.nn.sparse_conv2d import SparseConv2d, symmetric_zero_padding
from sparsekern.nn.sparse_linear import SparseLinear


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, SparseConv1D) or is_hf_conv1d(module):
        return "conv1d"
    if type(module) is nn.Linear or isinstance(module, SparseLinear):
        return "linear"
    if type(module) is nn.Conv2d or isinstance(module, SparseConv2d):
        return "conv2d"
    return None


def _unsupported(module: nn.Module, kind: str) -> str | None:
    """Why a layer of a supported type cannot be pruned here, or None."""
    if kind == "conv2d":
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}): not a single GEMM"
        if symmetric_zero_padding(module) is None:
            return (
                f"padding {module.padding!r} / padding_mode {module.padding_mode!r} is not a "
                "symmetric zero padding"
            )
    if getattr(module, "block_size", None) is not None:
        return "block-sparse layer (block_size set): its mask is block-structured"
    return None


def _to_2d(module: nn.Module, kind: str) -> torch.Tensor:
    """The weight as the GEMM's ``[rows (outputs), cols (inputs)]``."""
    w = module.weight.detach()
    if kind == "conv1d":
        return w.t()
    return w.reshape(w.shape[0], -1)


def _from_2d(t: torch.Tensor, module: nn.Module, kind: str) -> torch.Tensor:
    if kind == "conv1d":
        return t.t().contiguous()
    return t.reshape(module.weight.shape).contiguous()


def _inputs_2d(module: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's input ``x`` as the GEMM operand ``[tokens, cols]``."""
    if kind == "conv2d":
        if x.dim() == 3:
            x = x.unsqueeze(0)
        pad = symmetric_zero_padding(module)
        cols = F.unfold(x, module.kernel_size, module.dilation, pad, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _sparse_version(module: nn.Module, kind: str) -> nn.Module:
    if is_sparse_module(module):
        return module
    if kind == "linear":
        return SparseLinear.from_dense(module)
    if kind == "conv2d":
        return SparseConv2d.from_dense(module)
    return SparseConv1D.from_dense(module)


def _tied(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """The name of another module holding ``module``'s weight Parameter, or None."""
    w = module.weight
    for other_name, other in model.named_modules(remove_duplicate=False):
        if other is module:
            continue
        for p in other._parameters.values():
            if p is w:
                return other_name
    return None


def _is_head(name: str) -> bool:
    return name == "lm_head" or name.endswith(".lm_head")


# ---------------------------------------------------------------------------- calibration
