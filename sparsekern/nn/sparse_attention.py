"""Sparse layers whose weights are read by code other than a ``forward`` of their own:
``nn.MultiheadAttention`` (its forward reads ``in_proj_weight`` and ``out_proj.weight``
directly) and HF transformers' GPT-2 ``Conv1D`` (``x @ W + b`` with ``W [in, out]``).

``SparseMultiheadAttention`` keeps ``nn.MultiheadAttention``'s API, parameters and state-dict
keys, and adds a mask per projection weight: ``in_proj`` (a :class:`ParameterMask` over
``in_proj_weight [3E, E]``, or ``q_proj`` / ``k_proj`` / ``v_proj`` when kdim / vdim differ) and
``out_proj`` (a ``SparseLinear``). Each is a sparse layer to the pruners and ``set_mask``. In
training its forward hands ``nn.MultiheadAttention.forward`` the masked weights
(``masked_weight``, so the weight gradients are exactly zero at pruned entries); without a weight
gradient (inference, where torch may take its fused fast path) it runs the parent's forward as it
is, the pruned weights being exactly zero.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from sparsekern.nn._sparse_module import SparseModuleMixin, check_convertible
from sparsekern.nn.masks import register_weight_user
from sparsekern.nn.sparse_linear import SparseLinear
from sparsekern.ops.masked_weight import masked_weight

__all__ = ["ParameterMask", "SparseConv1D", "SparseMultiheadAttention", "is_hf_conv1d"]


class ParameterMask(SparseModuleMixin, nn.Module):
    """The mask of a weight Parameter that another module (its owner) holds and reads: a sparse
    layer for the pruners and ``set_mask`` (``.weight`` is the owner's Parameter, ``.mask`` a
    bool buffer of its shape, all True at start). It has no forward: the owner applies it.

    State dict: only ``mask`` (the weight stays under the owner's own key). A state dict with no
    mask (a dense checkpoint of the owner) loads with the mask all True.
    """

    block_size = None

    def __init__(self, owner: nn.Module, name: str) -> None:
        super().__init__()
        # Not a registered submodule (the owner holds this one: a cycle would loop named_modules)
        object.__setattr__(self, "_owner", owner)
        self._param_name = name
        self._init_mask()

    @property
    def weight(self) -> nn.Parameter:
        return self._owner._parameters[self._param_name]

    def reset_parameters(self) -> None:  # the owner initialises its own parameters
        pass

    def extra_repr(self) -> str:
        return f"{self._param_name} {list(self.weight.shape)}, density={self.density:.4f}"

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "mask"
        if key not in state_dict:
            # a dense checkpoint of the owner: the mask is implied all True, not missing
            self.mask.fill_(True)
            nn.Module._load_from_state_dict(
                self, state_dict, prefix, local_metadata, False, [], unexpected_keys, error_msgs
            )
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        with torch.no_grad():
            self.weight.masked_fill_(~self.mask, 0)


class SparseMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with masked projection weights (module docstring). Build one with
    :meth:`from_dense` (``sparsekern.sparsify`` does) or like ``nn.MultiheadAttention``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._add_masks()

    def _add_masks(self) -> None:
        names = (
            ["in_proj_weight"]
            if self._qkv_same_embed_dim
            else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        )
        for name in names:
            self.add_module(
                name.removesuffix("_weight"), ParameterMask(self, name).train(self.training)
            )
        if not isinstance(self.out_proj, SparseLinear):
            self.out_proj = SparseLinear.from_dense(self.out_proj)

    def _masked(self) -> list[tuple[nn.Module, str, torch.Tensor]]:
        views = [
            (self, m._param_name, m.checked_mask())
            for m in self.children()
            if isinstance(m, ParameterMask)
        ]
        return [*views, (self.out_proj, "weight", self.out_proj.checked_mask())]

    def forward(self, query, key, value, *args, **kwargs):
        masked = self._masked()
        training = torch.is_grad_enabled() and any(
            owner._parameters[name].requires_grad for owner, name, _ in masked
        )
        if not training:  # pruned weights are exactly zero: the parent's forward (and fast path)
            return super().forward(query, key, value, *args, **kwargs)
        shadowed = []
        try:
            for owner, name, mask in masked:
                # The parent reads the weights as attributes: an instance attribute shadows the
                # Parameter for this call only (the Parameter itself stays registered).
                owner.__dict__[name] = masked_weight(
                    owner._parameters[name], mask, assume_pruned_zero=True
                )
                shadowed.append((owner, name))
            return super().forward(query, key, value, *args, **kwargs)
        finally:
            for owner, name in shadowed:
                del owner.__dict__[name]

    @classmethod
    def from_dense(cls, mha: nn.MultiheadAttention) -> SparseMultiheadAttention:
        """A SparseMultiheadAttention SHARING ``mha``'s parameters (the same Parameter objects:
        optimizers keep working), buffers, settings and training mode; masks all True."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(
                f"SparseMultiheadAttention.from_dense: expected an nn.MultiheadAttention, got "
                f"{type(mha).__name__}"
            )
        new = cls.__new__(cls)
        new.__dict__.update(mha.__dict__)
        # Own containers (the same entries): registering in one module must not change the other
        for attr in ("_parameters", "_buffers", "_modules"):
            new.__dict__[attr] = OrderedDict(mha.__dict__[attr])
        new._add_masks()
        return new


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for HF transformers' ``Conv1D`` (GPT-2's projections), recognised without importing
    transformers: class name, defining module, and a ``weight [nx, nf]``."""
    t = type(module)
    return (
        t.__name__ == "Conv1D"
        and t.__module__.startswith("transformers")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and tuple(module.weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))
    )


class SparseConv1D(SparseModuleMixin, nn.Module):
    """HF transformers' GPT-2 ``Conv1D`` (``y = x @ W + b``, ``weight [in, out]``) with a bool
    mask of the weight's shape: the same parameters, state-dict keys and forward
    (``torch.addmm``), the weight gradient exactly zero at pruned entries.

    The weight is ``[in_features, out_features]``, transposed against ``nn.Linear``: pruners that
    work along the input dimension (N:M) read it through ``weight_layout = "in_out"``.
    """

    weight_layout = "in_out"
    block_size = None

    def __init__(self, nf: int, nx: int, device=None, dtype=None) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(nf, device=device, dtype=dtype))
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=0.02)
        self._init_mask()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)
        with torch.no_grad():
            self.weight.masked_fill_(~self.mask, 0)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, density={self.density:.4f}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., nx] -> [..., nf]``."""
        mask = self.checked_mask()
        w = self.weight
        if w.requires_grad and torch.is_grad_enabled():
            w = masked_weight(w, mask, assume_pruned_zero=True, inplace_grad=True)
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), w)
        return out.view(*x.shape[:-1], self.nf)

    @classmethod
    def from_dense(cls, conv1d: nn.Module) -> SparseConv1D:
        """A SparseConv1D SHARING ``conv1d``'s Parameter objects (HF ``Conv1D``)."""
        if not is_hf_conv1d(conv1d):
            raise TypeError(
                f"SparseConv1D.from_dense: expected HF transformers' Conv1D, got "
                f"{type(conv1d).__name__}"
            )
        check_convertible(conv1d, nn.Module, "SparseConv1D.from_dense")
        new = cls(conv1d.nf, conv1d.nx, device="meta", dtype=conv1d.weight.dtype)
        new.weight = conv1d.weight
        new.bias = conv1d.bias
        new.mask = torch.ones_like(conv1d.weight, dtype=torch.bool)
        new.train(conv1d.training)
        register_weight_user(new)
        return new
