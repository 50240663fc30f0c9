"""SparseLinear: ``nn.Linear`` with a bool mask; its execution plan picks the vendor GEMM (mask in
dW) or, at low density, kernels over the kept weights only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn._sparse_module import SparseModuleMixin, adopt_parameters, check_convertible
from sparsekern.nn.execution_plan import PathChoice, linear_path
from sparsekern.ops.block_sparse_linear import block_masked_linear
from sparsekern.ops.masked_linear import masked_linear_trusted
from sparsekern.ops.sparse_train import sparse_linear

__all__ = ["SparseLinear"]


class SparseLinear(SparseModuleMixin, nn.Linear):
    """``nn.Linear`` whose weight is masked: ``y = x @ (weight * mask).T + bias``.

    Shapes: ``weight [out_features, in_features]``, ``mask`` bool ``[out_features, in_features]``
    (a persistent buffer, all True at construction: the layer starts dense), ``bias
    [out_features]``; ``forward`` maps ``[..., in_features] -> [..., out_features]``.

    What runs is decided in one place, :meth:`execution_path` (reported by
    ``sparsekern.nn.execution_plan(model)``): on the CPU in fp32, when the kept fraction is low
    enough for the batch (a static rule, ``sparsekern.ops.sparse_train.rule``: kept <= 0.125 from
    64 rows), the ``"sparse"`` path runs forward, dX and dW on the kept weights only
    (``sparsekern.ops.sparse_train.sparse_linear``); ``weight.grad`` is still a dense tensor,
    exactly zero at pruned entries. Otherwise (``"masked"``, and always on CUDA until a GPU
    benchmark exists): pruned weights are exactly zero (the mask invariant), so ``x @ (W*M)^T`` is
    ``x @ W^T``: the forward and dX are ``F.linear``'s own (cuBLAS, MKL/oneDNN), with no mask and
    no copy, exactly what ``nn.Linear`` runs. Without a weight gradient to compute (``no_grad``,
    ``inference_mode``, a frozen weight) or with a mask that is all True (a fresh layer, RigL's
    dense-gradient pass) the forward is ``F.linear`` itself: nothing to mask, so the step is
    ``nn.Linear``'s (the all-True fact is keyed on the mask's version counter: an in-place edit
    that prunes an entry brings the masked dW back at the next forward). With one, the only
    addition is :func:`sparsekern.ops.masked_linear`'s masked dW: ``weight.grad`` is exactly zero
    where the mask is False (one pass over the gradient, or a fused Triton kernel where whole tiles
    are pruned). An in-place edit of the mask buffer is seen at the next forward, which zeroes the
    newly pruned weights first (see ``sparsekern.nn._sparse_module``).

    Change the mask with :meth:`set_mask` (or :func:`sparsekern.nn.set_mask`), which also zeroes
    pruned weights and their optimizer state. ``state_dict()`` keys: ``weight``, ``bias``,
    ``mask``; a dense ``nn.Linear`` state dict loads with ``strict=True`` and sets the mask all
    True. ``copy.deepcopy`` and ``pickle`` work.

    Block mode (``block_size=(bm, bk)``, each 16/32/64/128): the same layer and semantics, run by
    the block-sparse kernels (``sparsekern.ops.block_sparse_linear.block_masked_linear``), which
    skip every ``bm x bk`` block of the mask that is all False in the forward, dX and dW, so the
    step time falls with the fraction of blocks kept. Prune whole blocks
    (``sparsekern.pruning.prune_blocks_``) to make that fraction small; a mask with holes inside
    kept blocks is still exact (applied inside the blocks). ``sparsekern.nn.to_inference`` gives
    the layer the representation fastest on its device (dense, CSR or a ``BlockSparseLinear``
    storing only the kept blocks), timed at export.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        block_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_mask()
        self.set_block_size(block_size)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``[..., in_features] -> [..., out_features]``, by the path :meth:`execution_path`
        chooses for ``input.shape`` (the one place the choice is made)."""
        mask = self.checked_mask()
        weight = self.weight
        self.__dict__["_last_input_shape"] = tuple(input.shape)
        path, kept, _ = self.execution_path(tuple(input.shape))
        if path == "dense":
            if kept == 1.0:  # no masked dW: a later mask change must resync (checked_mask)
                self._note_unmasked_forward(mask)
            return F.linear(input, weight, self.bias)
        if path == "block":
            bs = self.block_size
            return block_masked_linear(input, weight, mask, self.bias, bs, assume_pruned_zero=True)
        if path == "masked":
            return masked_linear_trusted(input, weight, mask, self.bias)
        if path == "sparse":
            return sparse_linear(input, weight, mask, self.bias)
        return F.linear(input, weight, self.bias)  # "reference" is not chosen for this layer

    def execution_path(
        self, input_shape: tuple[int, ...] | None = None, *, training: bool | None = None
    ) -> PathChoice:
        """The path the forward runs for an input of ``input_shape`` (see
        ``sparsekern.nn.execution_plan`` for the protocol)."""
        return linear_path(self, input_shape, training)

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        mask: torch.Tensor | None = None,
        block_size: int | tuple[int, int] | None = None,
    ) -> SparseLinear:
        """A SparseLinear computing what ``linear`` computes, SHARING its parameters.

        The result holds the very same ``weight`` / ``bias`` Parameter objects (so same device,
        dtype and ``requires_grad``, and an optimizer built on ``linear.parameters()`` keeps
        training it); use it in place of ``linear`` rather than next to it, since a later
        ``set_mask`` zeroes the shared weight. The training mode is copied; hooks are not.

        Args:
            linear: an initialised ``nn.Linear`` (a SparseLinear's mask is copied along).
            mask: optional bool ``[out_features, in_features]`` on the weight's device, installed
                with :meth:`set_mask` (which zeroes ``linear.weight`` where it is False). Default:
                all True.
            block_size: block mode (see the class docstring); default: the unstructured kernels,
                or ``linear``'s own block size if it is a SparseLinear.
        """
        check_convertible(linear, nn.Linear, f"{cls.__name__}.from_dense")
        # Built on the meta device: no memory or random init for a weight about to be replaced.
        sparse = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
        )
        return adopt_parameters(sparse, linear, mask, block_size)
