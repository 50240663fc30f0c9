"""Compact storage for training: the trainable parameter holds the kept weights only.

``CompactSparseLinear`` (made by ``sparsify(model, storage="compact")``) trains ``values [nnz]``
(the kept weights in CSR order of the mask) instead of a dense ``weight [N, K]``, so the weight,
its gradient and every optimizer state (momentum, Adam moments) are ``nnz`` long. Its forward and
backward are ``sparsekern.ops.sparse_train.sparse_linear_values``: no dense weight and no dense
weight gradient exist at any time (on the path the execution plan picks for low densities; where
the rule says the sparse kernels would be slower than the GEMM, the dense weight is rebuilt per
step and the vendor GEMM runs, its gradient gathered back to ``[nnz]``).

Bytes per kept weight (fp32, Adam), with ``d`` the kept fraction:

* values + grad + 2 Adam moments: 16 (dense storage: ``16 / d``);
* the index (``MaskIndex``): 24 (int32 column, int32 transposed row, int64 flat position,
  int64 transpose permutation), plus ``4 (N + K)`` for the row pointers;
* the bool ``mask`` buffer: ``1 / d`` (kept so pruners read it as on ``SparseLinear``).

State dict: the keys are ``SparseLinear``'s (``weight`` dense ``[N, K]``, ``bias``, ``mask``), so
a checkpoint loads into either storage, and a dense ``nn.Linear`` state dict loads too (mask all
True). A mask change goes through :meth:`set_mask` (which ``sparsekern.nn.set_mask`` calls):
the values and the optimizer state are re-packed to the new mask, regrown and newly pruned
entries starting at zero (as on ``SparseLinear``). ``weight`` is a read-only dense copy
(``[N, K]``, no gradient) for code that reads magnitudes; writing to it changes nothing.

An in-place edit of the ``mask`` buffer (``layer.mask[i] = False``) is seen at the next forward
(its version counter), which re-packs the values; optimizer state cannot be reached from there:
use ``set_mask(layer, mask, optimizer)``. RigL's dense-gradient step needs a dense weight
(``sparsekern.pruning._common.dense_weight_grads``): use dense storage with RigL.

Under FSDP2 (``sparsekern.training.distributed.shard_model``) ``values`` is sharded on dim 0 (a
contiguous chunk of the kept weights per rank, all-gathered for the forward and backward); the
mask and its index stay whole on every rank. The mask is then fixed: ``set_mask``, an in-place
edit of the mask and a state-dict load with another mask raise ``RuntimeError`` (a new mask
would resize the sharded parameter); ``weight`` and ``state_dict`` all-gather the values (every
rank calls). See ``docs/distributed.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn.execution_plan import PathChoice
from sparsekern.ops.sparse_train import _kernels
from sparsekern.ops.sparse_train.index import MaskIndex, mask_index
from sparsekern.ops.sparse_train.linear import sparse_linear_values
from sparsekern.ops.sparse_train.rule import sparse_pays

__all__ = ["CompactSparseLinear"]


class CompactSparseLinear(nn.Module):
    """A linear layer storing its kept weights only; see the module doc.

    Shapes: ``values [nnz]``, ``bias [out_features]``, ``mask`` bool ``[out_features,
    in_features]``; ``forward``: ``[..., in_features] -> [..., out_features]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mask: torch.Tensor | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kw = {"device": device, "dtype": dtype}
        if mask is None:
            mask = torch.ones(out_features, in_features, dtype=torch.bool, device=device)
        _check_mask(mask, (out_features, in_features), "CompactSparseLinear: mask")
        self.register_buffer("mask", mask.clone(), persistent=False)  # saved as a dense key
        index = mask_index(self.mask)
        self.values = nn.Parameter(torch.empty(index.nnz, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        bound = 1 / math.sqrt(in_features) if in_features else 0.0
        with torch.no_grad():  # nn.Linear's init (kaiming_uniform(a=sqrt 5) = U(+-1/sqrt(K)))
            self.values.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)
        self._note_packed()

    # --- conversion --------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None):
        """A compact layer with ``linear``'s kept weights (a ``SparseLinear``'s own mask is used
        when ``mask`` is None) and a copy of its bias (new Parameters: build the optimizer after
        converting)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                "CompactSparseLinear.from_dense: expected an nn.Linear, got "
                f"{type(linear).__name__}"
            )
        w = linear.weight.detach()
        if mask is None:
            mask = linear._buffers.get("mask")
        if mask is None:
            mask = torch.ones_like(w, dtype=torch.bool)
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            mask,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            layer.values.copy_(layer.index.gather(w))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.values.requires_grad_(linear.weight.requires_grad)
        layer.train(linear.training)
        return layer

    # --- views -------------------------------------------------------------------------------
    @property
    def index(self) -> MaskIndex:
        """The mask's CSR index (cached on the mask until it changes)."""
        return mask_index(self.mask)

    @property
    def weight(self) -> torch.Tensor:
        """A dense ``[out_features, in_features]`` copy (no gradient), zero where pruned."""
        idx = self.__dict__["_packed"][2]
        v = self.values.detach()
        if _is_dtensor(v):  # FSDP2-sharded values: all-gathered (a collective)
            v = v.full_tensor()
        return idx.scatter(v)

    @property
    def density(self) -> float:
        n = self.mask.numel()
        return self.values.numel() / n if n else 0.0

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nnz={self.values.numel()}, density={self.density:.4f}"
        )

    # --- mask changes ------------------------------------------------------------------------
    def _refuse_sharded(self, what: str) -> None:
        if self.__dict__.get("_sk_fsdp"):
            raise RuntimeError(
                f"{what}: expected a CompactSparseLinear whose values are not sharded, got one "
                f"under FSDP2 (fully_shard; {self.values.numel()} kept weights): a mask change "
                "changes the number of kept weights, i.e. the size of the sharded parameter, "
                "which FSDP cannot re-register. Its mask is fixed while sharded. Decide masks on "
                "dense storage (SparseLinear, which prunes under FSDP) and compact after, or "
                "gather the model (training.distributed.full_state_dict), change the mask in "
                "one process and shard again"
            )

    def _note_packed(self) -> None:
        self.__dict__["_packed"] = (self.mask, self.mask._version, mask_index(self.mask))

    def _repack(self, old: MaskIndex, new: MaskIndex, reset_flat, optimizer=None) -> None:
        """Move ``values`` (and the optimizer's ``[nnz]`` state) from ``old``'s pattern to
        ``new``'s; entries flagged in ``reset_flat`` (bool ``[N*K]``) start at zero."""
        numel = old.shape[0] * old.shape[1]

        def move(t: torch.Tensor) -> torch.Tensor:
            dense = _kernels.scatter_dense(old.flat_idx, t.detach(), numel)
            dense.masked_fill_(reset_flat, 0)
            return dense[new.flat_idx]

        state = optimizer.state.get(self.values) if optimizer is not None else None
        if state:
            for key, value in list(state.items()):
                is_state = isinstance(value, torch.Tensor) and value.dim() > 0  # not `step`
                if is_state and value.shape == self.values.shape:
                    state[key] = move(value)
        with torch.no_grad():
            self.values.data = move(self.values)
            self.values.grad = None  # a gradient of the old pattern means nothing now

    def set_mask(self, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None = None):
        """Install ``mask``; see :meth:`repack_mask` (what ``sparsekern.nn.set_mask`` calls)."""
        self.repack_mask(mask, optimizer)

    @torch.no_grad()
    def repack_mask(self, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None = None):
        """Install ``mask`` (bool ``[out_features, in_features]``), re-packing the values and
        ``optimizer``'s state for ``values``: kept entries keep their value and state, regrown
        ones start at zero. Validates before changing anything."""
        _check_mask(mask, (self.out_features, self.in_features), "set_mask: mask")
        if mask.device != self.mask.device:
            raise ValueError(
                f"set_mask: mask: expected the layer's device {self.mask.device}, got {mask.device}"
            )
        self._refuse_sharded("set_mask")
        self._sync(None)  # an unnoticed in-place edit first
        new = mask.clone()
        old_index = self.__dict__["_packed"][2]
        reset = (~new) | (new != self.mask)
        self.mask.copy_(new)
        self._repack(old_index, mask_index(self.mask), reset.reshape(-1), optimizer)
        self._note_packed()

    def _sync(self, optimizer) -> None:
        mask, version, old_index = self.__dict__["_packed"]
        if mask is self.mask and version == self.mask._version:
            return
        # The buffer was edited in place (or replaced): keep the kept values, zero the rest.
        self._refuse_sharded("an in-place edit of the mask buffer")
        _check_mask(self.mask, (self.out_features, self.in_features), "mask buffer")
        new_index = mask_index(self.mask)
        reset = ~self.mask.reshape(-1)
        self._repack(old_index, new_index, reset, optimizer)
        self._note_packed()

    # --- forward -----------------------------------------------------------------------------
    def execution_path(self, input_shape=None, *, training=None) -> PathChoice:
        """The path the forward runs (``sparsekern.nn.execution_plan``'s protocol)."""
        kept = self.density
        rows = None
        if input_shape is not None:
            rows = math.prod(input_shape[:-1]) if len(input_shape) > 1 else 1
        v = self.values
        args = (rows, self.out_features, self.in_features, kept, v.device, v.dtype)
        pays, why = sparse_pays(*args, compact=True)
        if pays and _kernels.backend(torch.zeros(0)) != "cpp":
            pays, why = sparse_pays(*args, compact=True, extension=False)
        if pays:
            return PathChoice("sparse", kept, "compact storage, CSR kernels: " + why)
        return PathChoice("reference", kept, "compact storage, dense rebuild + GEMM: " + why)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._sync(None)
        index = self.__dict__["_packed"][2]
        self.__dict__["_last_input_shape"] = tuple(input.shape)
        if self.execution_path(tuple(input.shape)).path == "sparse":
            return sparse_linear_values(input, self.values, index, self.bias)
        n, k = index.shape
        w = self.values.new_zeros(n * k).index_put((index.flat_idx,), self.values)
        return F.linear(input, w.view(n, k), self.bias)

    # --- state dict: dense keys ----------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._sync(None)
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination[prefix + "mask"] = self.mask.clone()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        wkey, mkey, bkey = prefix + "weight", prefix + "mask", prefix + "bias"
        shape = (self.out_features, self.in_features)
        for key in (wkey, bkey) if self.bias is not None else (wkey,):
            if key not in state_dict:
                missing_keys.append(key)
        if self.bias is None and bkey in state_dict:
            unexpected_keys.append(bkey)
        if wkey not in state_dict:
            return
        w = state_dict[wkey]
        mask = state_dict.get(mkey)
        if tuple(w.shape) != shape:
            error_msgs.append(
                f"While loading {wkey!r}: expected shape {list(shape)}, got {list(w.shape)}"
            )
            return
        if mask is None:
            mask = torch.ones(shape, dtype=torch.bool)
        elif mask.dtype != torch.bool or tuple(mask.shape) != shape:
            error_msgs.append(
                f"While loading {mkey!r}: expected a torch.bool mask of shape {list(shape)}, got "
                f"{mask.dtype} {list(mask.shape)}"
            )
            return
        b = state_dict.get(bkey)
        if self.bias is not None and b is not None and tuple(b.shape) != (self.out_features,):
            error_msgs.append(
                f"While loading {bkey!r}: expected shape [{self.out_features}], got {list(b.shape)}"
            )
            return
        if self.__dict__.get("_sk_fsdp"):
            mask = mask.to(self.mask.device)
            if not torch.equal(mask, self.mask):
                error_msgs.append(
                    f"While loading {mkey!r}: expected the sharded compact layer's own mask "
                    f"({self.values.numel()} kept weights; its mask is fixed under FSDP2), got "
                    f"another ({int(mask.sum())} kept)"
                )
                return
            with torch.no_grad():  # each rank keeps its chunk of the values
                self._copy_into(self.values, self.index.gather(w.to(self.mask.device)))
                if self.bias is not None and b is not None:
                    self._copy_into(self.bias, b)
            return
        with torch.no_grad():
            self.mask.copy_(mask.to(self.mask.device))
            index = mask_index(self.mask)
            self.values.data = index.gather(w.to(self.values.device, self.values.dtype))
            self.values.grad = None
            if self.bias is not None and b is not None:
                self.bias.copy_(b)
        self._note_packed()

    @staticmethod
    def _copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
        if _is_dtensor(param):
            from sparsekern.nn._dtensor import local_like

            full = local_like(full.to(param.dtype), param)
        param.copy_(full)


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _check_mask(mask, shape, what: str) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.bool Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{what}: expected dtype torch.bool, got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{what}: expected shape {list(shape)}, got {list(mask.shape)}")
