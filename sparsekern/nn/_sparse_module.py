"""What SparseLinear and SparseConv2d share: the ``mask`` buffer, ``density``, ``set_mask``, the
block mode's ``block_size``, state-dict loading that accepts dense checkpoints, and the guard that
keeps the mask invariant when the mask buffer is edited in place.

The mask invariant (pruned weights are exactly zero) is what lets the forward and dX run the
vendor kernels on the weight with no mask at all. It is kept by ``set_mask`` (weights, grads and
optimizer state), by the masked weight gradient, by ``load_state_dict``, and by this guard: every
forward compares the mask buffer (object and version counter) with the one it last saw; after an
in-place edit (``layer.mask[3] = False``, ``layer.mask &= m``) or a new buffer
(``layer.mask = m``), it zeroes the weight (and its ``.grad``) where the mask is now False
before running. A forward with an all-True mask runs the dense op, whose dW is not masked; the
mask it ran under is recorded, and after any change of it the next forward zeroes weight and
``.grad`` again. A change between that forward and its backward (``set_mask(layer, m, opt)``,
an in-place edit) is caught in the backward by a hook on the weight (:class:`_LateMaskChange`):
dW is masked with the new mask before it reaches ``.grad``, ``torch.autograd.grad``'s result or
the optimizer (not for a mask that FSDP2 shards). Where the dense op saved the weight for dX
(``F.conv2d`` always, ``F.linear`` when its input needs a gradient), ``set_mask`` there makes
that backward raise autograd's in-place error instead. The guard cannot reach an optimizer: to
zero momentum and Adam moments too, change masks with ``set_mask(layer, mask, optimizer)``
(between steps, as the pruners do).

What no guard can see (writes that bypass version counters), and ``sparsekern.check_masks(model)``
finds afterwards: writes through ``.data`` or ``.numpy()`` (of the weight or of the mask),
``nn.init`` on the weight, a weight tied to another module, optimizer state that is not
parameter-shaped (flat shards).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from sparsekern.formats.block_sparse import block_size_pair
from sparsekern.nn.execution_plan import _kept_of
from sparsekern.nn.masks import (
    ensure_every_gradient_hook,
    note_mask_synced,
    register_weight_user,
)
from sparsekern.nn.masks import set_mask as install_mask
from sparsekern.ops._mask_pass import zero_pruned
from sparsekern.ops.masked_weight import check_mask


class SparseModuleMixin:
    """Mixin for a dense ``nn`` layer with a ``weight``: adds a persistent bool buffer ``mask`` of
    the weight's shape (True keeps a weight; all True at construction).

    Put it first in the bases (``class SparseLinear(SparseModuleMixin, nn.Linear)``) and call
    :meth:`_init_mask` at the end of ``__init__``.

    State dict: keys are the dense layer's (``weight``, ``bias``) plus ``mask``. A dense state dict
    (a ``weight`` but no ``mask``) loads with ``strict=True`` and makes the mask all True: the
    weights it brings are dense. Loading a ``mask`` also zeroes the weight where it is False, so the
    invariant "pruned weights are exactly zero" holds after any load.
    """

    mask: torch.Tensor
    block_size: tuple[int, int] | None

    def _init_mask(self) -> None:
        # Same device as the weight (meta included); persistent so it is saved and loaded.
        self.register_buffer(
            "mask", torch.ones_like(self.weight, dtype=torch.bool), persistent=True
        )
        note_mask_synced(self)

    def checked_mask(self) -> torch.Tensor:
        """The mask buffer, after restoring the invariant if it changed since the last call (an
        in-place edit bumps its version counter; a new buffer is another object). About 0.3 us
        when nothing changed."""
        mask = self._buffers["mask"]
        if torch.compiler.is_compiling():
            # A compiled graph cannot see version counters (an in-place mask edit would be
            # ignored: outputs off eager's by 0.14-0.42 and pruned weights drifting, measured).
            # So a compiled forward re-applies the mask every call: one fused pass over the
            # weight and mask (~5 bytes per fp32 weight), correct for any edit.
            with torch.no_grad():
                self.weight.masked_fill_(~mask, 0)
            return mask
        if "_mask_every_gradient" in self.__dict__:
            ensure_every_gradient_hook(self)
        synced = self.__dict__.get("_mask_synced")
        # After an all-True forward, whose dW is not masked, also a mask change that was noted as
        # synced (set_mask, a load) resyncs: that dW may land after the change (set_mask between
        # a forward and its backward), so weight and .grad are zeroed again at the next forward.
        unmasked = self.__dict__.get("_unmasked_forward")
        if (
            synced is None
            or synced[0] is not mask
            or synced[1] != mask._version
            or (unmasked is not None and (unmasked[0] is not mask or unmasked[1] != mask._version))
        ):
            if mask.dtype != torch.bool:
                raise TypeError(f"{type(self).__name__}: expected the mask buffer as torch.bool, "
                                f"got {mask.dtype} (install masks with set_mask)")  # fmt: skip
            # Checked here, once per mask change, so the masked path need not check per call.
            check_mask(mask, self.weight, f"{type(self).__name__}: the mask buffer")
            with torch.no_grad():
                pruned = ~mask
                self.weight.masked_fill_(pruned, 0)
                if self.weight.grad is not None:
                    self.weight.grad.masked_fill_(pruned, 0)
            note_mask_synced(self)
            self.__dict__.pop("_unmasked_forward", None)
        return mask

    def _note_unmasked_forward(self, mask: torch.Tensor) -> None:
        """Record that this forward runs the dense op on an all-True ``mask`` (no masked dW), so
        that any later change of the mask makes :meth:`checked_mask` resync, and (when a weight
        gradient will be computed) that its backward must mask dW if the mask changes before it
        runs (:class:`_LateMaskChange`, registered here once per weight Parameter: again after a
        deepcopy, an unpickling or a new Parameter, which drop tensor hooks)."""
        d = self.__dict__
        d["_unmasked_forward"] = (mask, mask._version)
        weight = self._parameters.get("weight")
        if weight is None or not weight.requires_grad or not torch.is_grad_enabled():
            return
        if "_sk_dmask" in d:
            # FSDP2 with a sharded mask, all-gathered for this forward: a new mask object every
            # forward, and the sharded one in the backward (see _LateMaskChange); not covered.
            return
        d["_dense_dw"] = (mask, mask._version)
        hooks, hid = weight._backward_hooks, d.get("_dense_dw_hook")
        hook = hooks.get(hid) if hooks and hid is not None else None
        if type(hook) is not _LateMaskChange or hook.module() is not self:
            d["_dense_dw_hook"] = weight.register_hook(_LateMaskChange(self)).id

    @property
    def density(self) -> float:
        """Kept fraction of the weight, ``mask.sum() / mask.numel()``, in [0, 1]."""
        nnz = self.mask.count_nonzero()
        if type(nnz).__name__ == "DTensor":  # an FSDP2-sharded mask: this rank's count, summed
            nnz = nnz.full_tensor()
        return int(nnz) / self.mask.numel()

    def set_mask(self, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Install ``mask`` (bool, the weight's shape and device) and keep the mask invariant;
        see :func:`sparsekern.nn.set_mask`."""
        install_mask(self, mask, optimizer)

    def set_block_size(self, block_size: int | tuple[int, int] | None) -> None:
        """Switch to block mode with ``(bm, bk)`` blocks (an int means square), or back to the
        unstructured kernels with None. Changes no weight and no mask."""
        self.block_size = None if block_size is None else block_size_pair(block_size)

    def extra_repr(self) -> str:
        bs = getattr(self, "block_size", None)  # None for modules pickled before block mode
        return f"{super().extra_repr()}, density={self.density:.4f}" + (
            "" if bs is None else f", block_size={bs}"
        )

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # Re-initialising must not bring pruned weights back. The dense __init__ calls this before
        # the mask exists, hence the check.
        mask = self._buffers.get("mask")
        if mask is not None:
            with torch.no_grad():
                self.weight.masked_fill_(~mask, 0)

    def _apply(self, fn, recurse=True):
        # `module.type(torch.float16)` and similar casts reach bool buffers too; the mask must stay
        # bool (the ops require it), and 0/1 -> bool is lossless.
        result = super()._apply(fn, recurse)
        mask = self._buffers.get("mask")
        if mask is not None and mask.dtype != torch.bool:
            self._buffers["mask"] = mask != 0
        return result

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "mask"
        orig, pmask = prefix + "weight_orig", prefix + "weight_mask"
        if orig in state_dict and pmask in state_dict and (prefix + "weight") not in state_dict:
            # A torch.nn.utils.prune checkpoint: weight = weight_orig * weight_mask, the mask its
            # own (as sparsify does for a module pruned that way)
            state_dict = dict(state_dict)
            m = state_dict.pop(pmask)
            state_dict[prefix + "weight"] = state_dict.pop(orig) * m
            state_dict[key] = m != 0
        has_mask = key in state_dict
        dense_weight = not has_mask and (prefix + "weight") in state_dict
        if has_mask and isinstance(state_dict[key], torch.Tensor):
            got = state_dict[key].dtype
            if got != torch.bool:
                # copy_ would silently turn e.g. a float mask into bool(nonzero); refuse instead.
                error_msgs.append(
                    f"While loading {key!r}: expected a mask of dtype torch.bool, got {got}."
                )
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if dense_weight:
            # A dense checkpoint: the mask is implied all True, not missing.
            if key in missing_keys:
                missing_keys.remove(key)
            self.mask.fill_(True)
        elif has_mask:
            with torch.no_grad():
                self.weight.masked_fill_(~self.mask, 0)
                if self.weight.grad is not None:  # a live model: stale grads must not revive
                    self.weight.grad.masked_fill_(~self.mask, 0)
        note_mask_synced(self)


class _LateMaskChange:
    """Tensor hook on a sparse module's weight: masks a dW that an all-True (dense, unmasked)
    forward produced when the mask changed between that forward and the backward (``set_mask``,
    an in-place edit or a new buffer), so ``.grad`` and what the optimizer steps on are exactly
    zero at the newly pruned entries: ``torch.where(mask, grad, 0)`` with the mask of now,
    before the gradient is accumulated (``torch.autograd.grad`` returns it masked too; DDP
    reduces it masked). Otherwise it returns None: one Python call per backward per layer, on
    the layers that ran an all-True forward needing a weight gradient (it is registered there).

    Holds its module by a weak reference (no cycle, nothing for ``deepcopy`` or ``torch.save``
    to follow; a Parameter's copies and pickles drop tensor hooks, and the next all-True forward
    registers one again). After a change it keeps masking every backward until a forward has
    run under the new mask (graphs recorded before the change may still be pending), then masks
    that one's backward once more and stops. Not covered: two graphs recorded before a change
    whose backwards run separately after a forward under the new mask (the later one is not
    masked; ``sparsekern.check_masks`` finds it), and a mask FSDP2 shards (a DTensor: its full
    mask is an all-gather away, a collective no hook may issue). A compiled forward does not
    count as one under the new mask (it re-applies the mask without resyncing), so after such a
    change a compiled loop pays this mask pass per backward until an eager forward.
    """

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = weakref.ref(module)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor | None:
        module = self.module()
        if module is None:
            return None
        d = module.__dict__
        recorded = d.get("_dense_dw")
        if recorded is None:
            return None
        mask = module._buffers.get("mask")
        if recorded[0] is mask and recorded[1] == mask._version:
            return None  # the mask the all-True forward ran under: nothing to mask
        if "_unmasked_forward" not in d:  # a forward under the new mask has run (and resynced)
            del d["_dense_dw"]
        if type(mask).__name__ == "DTensor":
            # Sharded since that forward (FSDP2): its full mask is an all-gather away, a
            # collective this hook must not issue; not covered (see the class docstring).
            d.pop("_dense_dw", None)
            return None
        check_mask(mask, grad, f"{type(module).__name__}: the mask buffer (in backward)")
        if _kept_of(mask) == 1.0:  # still all True (an edit that pruned nothing)
            return None
        return zero_pruned(grad, mask)


def is_sparse_module(module: nn.Module) -> bool:
    """True for SparseLinear, SparseConv2d and anything else built on :class:`SparseModuleMixin`."""
    return isinstance(module, SparseModuleMixin)


def check_convertible(dense: nn.Module, expected: type[nn.Module], who: str) -> None:
    """Raise unless ``dense`` is an initialised, unparametrised ``expected`` whose parameters can
    be taken over as they are."""
    if not isinstance(dense, expected):
        raise TypeError(f"{who}: expected an nn.{expected.__name__}, got {type(dense).__name__}")
    if torch.nn.utils.parametrize.is_parametrized(dense):
        # `weight` is then computed on every access, not a Parameter that can be shared.
        raise TypeError(
            f"{who}: expected a module without parametrizations, got a parametrized one"
        )
    if torch.nn.parameter.is_lazy(dense.weight):
        raise ValueError(
            f"{who}: expected an initialised weight, got an uninitialised (lazy) one; "
            "run a forward pass first"
        )


def adopt_parameters(
    sparse: SparseModuleMixin, dense: nn.Module, mask: torch.Tensor | None, block_size=None
):
    """Make ``sparse`` (built on the meta device) use ``dense``'s Parameter objects, its training
    mode, its mask and its block size (if it has them), then install ``mask`` and ``block_size``
    if given. Returns ``sparse``."""
    if block_size is None:
        block_size = getattr(dense, "block_size", None)
    sparse.set_block_size(block_size)
    sparse.weight = dense.weight  # the same Parameter object: optimizers keep working
    sparse.bias = dense.bias
    old = dense._buffers.get("mask")
    if isinstance(old, torch.Tensor):
        sparse.mask = old.clone()
    else:
        sparse.mask = torch.ones_like(dense.weight, dtype=torch.bool)
    sparse.train(dense.training)
    register_weight_user(sparse)
    if mask is not None:
        sparse.set_mask(mask)
    return sparse
