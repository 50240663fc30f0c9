"""Which path each sparse layer runs, and why: the one place a layer's forward chooses.

Protocol (every sparse module implements it; ``SparseLinear`` and ``SparseConv2d`` do):

    module.execution_path(input_shape=None, *, training=None) -> PathChoice(path, kept, why)

* ``input_shape``: the shape of the input the forward is about to see (``x.shape``). None means
  the shape of the last input the layer saw (modules record it), or a nominal one if it never ran.
* ``training``: whether a weight gradient will be needed (default: ``torch.is_grad_enabled()``
  and the weight requires grad).
* ``path`` (a string), one of:

  - ``"dense"``:  ``F.linear`` / ``F.conv2d`` on the weight, no mask work: no weight gradient
    needed (``no_grad``, a frozen weight; the mask invariant makes it exact), or a mask that is
    all True (nothing to zero in dW: exactly what ``nn.Linear`` / ``nn.Conv2d`` run, with no
    autograd node and no mask pass; decided on the mask's version counter, so an in-place edit
    that prunes an entry switches the next forward back to ``"masked"``);
  - ``"masked"``: the vendor GEMM/conv on the weight for forward and dX, dW masked afterwards
    (today's default: the dense work, every pruned zero included);
  - ``"block"``:  the block-sparse kernels (``block_size`` set): skip all-pruned blocks;
  - ``"sparse"``: kernels that touch kept weights only (CSR forward, transposed dX, SDDMM dW:
    ``sparsekern.ops.sparse_train``);
  - ``"reference"``: the plain-PyTorch twin (double backward, ``create_graph=True``).

* ``kept``: the kept fraction of the weight, in [0, 1].
* ``why``: one sentence naming the figures behind the choice (density vs the threshold for this
  shape and batch, the device, the dtype, ...).

The forward calls ``execution_path(x.shape)`` and runs what it says, so the plan reported is the
path that runs. Choices are static rules fitted to measured crossovers (``docs/kernels.md``);
no timing taken at run time decides.

``execution_plan(model)`` lists one :class:`PlanEntry` per sparse module (``named_modules``
order).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from sparsekern.ops._ext import ext_disabled
from sparsekern.ops._mask_cache import cached_on_mask
from sparsekern.ops.sparse_train import _kernels
from sparsekern.ops.sparse_train.rule import sparse_pays

__all__ = ["PATHS", "PathChoice", "PlanEntry", "execution_plan", "linear_path"]

PATHS = ("dense", "masked", "block", "sparse", "reference")


class PathChoice(NamedTuple):
    """What one layer runs for one input shape: ``path`` (one of :data:`PATHS`), ``kept``
    fraction in [0, 1], ``why`` (one sentence)."""

    path: str
    kept: float
    why: str


class PlanEntry(NamedTuple):
    """One row of :func:`execution_plan`: module ``name`` (as in ``named_modules``), its class
    ``layer``, ``path``, ``kept`` fraction, ``why``, and the ``input_shape`` it was decided for
    (None: a nominal shape, the layer never ran)."""

    name: str
    layer: str
    path: str
    kept: float
    why: str
    input_shape: tuple[int, ...] | None


def execution_plan(model: nn.Module, *, training: bool | None = None) -> list[PlanEntry]:
    """Per sparse layer of ``model``: the path its next forward runs, for the input shape it saw
    last (or a nominal one), and why.

    Args:
        model: any ``nn.Module``; layers without ``execution_path`` are not listed.
        training: as in the protocol (None: decided per layer from its weight's ``requires_grad``
            and ``torch.is_grad_enabled()``).

    Raises ``TypeError`` when ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"execution_plan: expected an nn.Module, got {type(model).__name__}")
    plan = []
    for name, module in model.named_modules():
        fn = getattr(module, "execution_path", None)
        if not callable(fn):
            continue
        shape = module.__dict__.get("_last_input_shape")
        choice = fn(shape, training=training)
        plan.append(
            PlanEntry(name, type(module).__name__, choice.path, choice.kept, choice.why, shape)
        )
    return plan


def _kept(module: nn.Module) -> float:
    # Cached on the mask until it changes: the forward asks on every call (~1 us on a hit
    # instead of a pass over the mask: ~4 ms for a 9216 x 4096 mask on this CPU).
    mask = _mask_of(module)
    if type(mask).__name__ == "DTensor":  # FSDP2, outside the forward: the global count
        return int(mask.count_nonzero().full_tensor()) / mask.numel() if mask.numel() else 0.0
    return _kept_of(mask)


def _needs_weight_grad(module: nn.Module, training: bool | None, weight=None) -> bool:
    if training is not None:
        return bool(training)
    weight = _weight_of(module) if weight is None else weight
    return weight.requires_grad and torch.is_grad_enabled()


def _weight_of(module: nn.Module) -> torch.Tensor:
    # The forward asks on every call: nn.Module.__getattr__ costs ~0.5-1.7 us per attribute
    # (measured, loaded 2-core machine), the dict lookup ~0.1 us. `weight` is a registered
    # Parameter (FSDP2 swaps it there too); anything else takes the slow lookup.
    w = module._parameters.get("weight")
    return module.weight if w is None else w


def _mask_of(module: nn.Module) -> torch.Tensor:
    m = module._buffers.get("mask")
    return module.mask if m is None else m


def linear_path(module: nn.Module, input_shape, training: bool | None) -> PathChoice:
    """:meth:`SparseLinear.execution_path`'s rule (see the module doc for the protocol)."""
    if torch.compiler.is_compiling():
        # Inside a graph: no host reads (the kept count is a device value) and no opaque C++
        # calls; the vendor path, which compiles. execution_plan() itself runs eagerly.
        if module.__dict__.get("block_size") is not None:
            return PathChoice("block", float("nan"), "torch.compile: block mode")
        path = "masked" if _needs_weight_grad(module, training) else "dense"
        return PathChoice(path, float("nan"), "torch.compile: vendor path (traceable)")
    weight, mask = _weight_of(module), _mask_of(module)
    needs = _needs_weight_grad(module, training, weight)
    rows = None
    if input_shape is not None:
        rows = math.prod(input_shape[:-1]) if len(input_shape) > 1 else 1
    block = module.__dict__.get("block_size")
    args = (rows, module.out_features, module.in_features, weight.device, weight.dtype)
    args += (block, needs)
    if type(mask).__name__ == "DTensor":
        return _linear_choice(_kept(module), *args, ext=True)
    return _cached_choice(mask, "linear_path", _linear_choice, args)


def _cached_choice(mask: torch.Tensor, tag: str, decide, args: tuple) -> PathChoice:
    """``decide(kept, *args)``, cached on ``mask`` under ``tag`` with ``args`` as the key.

    The forward asks on every call (~2 us on a hit; deciding and wording it took ~0.4 ms, 11% of
    a LeNet-300-100 step). ``decide`` returns None where the answer depends on whether the C++
    extension is disabled (an environment read, ~1-2 us): only those layers key on it, in a
    second entry, ``decide(kept, *args, ext=True)``. The closures hold no module: an entry must
    not keep its mask alive."""
    choice = cached_on_mask(mask, tag, lambda m: decide(_kept_of(m), *args), args)
    if choice is not None:
        return choice
    key = (*args, ext_disabled())
    return cached_on_mask(mask, f"{tag}_ext", lambda m: decide(_kept_of(m), *args, ext=True), key)


#: Why an all-True mask runs the dense op in training: its masked dW would equal the dense dW.
#: (``kept == 1.0`` exactly iff every entry is kept: ``nnz / numel`` rounds to 1.0 only at
#: ``nnz == numel`` below 2**53 weights.)
_ALL_KEPT_WHY = (
    "mask all True (kept 1.000): nothing to zero in dW, so {op} as {twin} runs it (no mask pass)"
)


def _kept_of(mask: torch.Tensor) -> float:
    nnz = cached_on_mask(mask, "nnz", lambda m: int(m.count_nonzero()))
    return nnz / mask.numel() if mask.numel() else 0.0


def _linear_choice(kept, rows, n, k, device, dtype, block, needs, ext=None) -> PathChoice | None:
    """The choice; None when it depends on the C++ extension's state and ``ext`` is None (the
    caller then asks again with ``ext=True``, keyed on that state)."""
    if block is not None:
        return PathChoice("block", kept, f"block mode {block}: all-pruned blocks are skipped")
    if not needs:
        return PathChoice(
            "dense", kept, "no weight gradient needed: F.linear on the weight (pruned entries 0)"
        )
    if kept == 1.0:
        return PathChoice("dense", kept, _ALL_KEPT_WHY.format(op="F.linear", twin="nn.Linear"))
    args = (rows, n, k, kept, device, dtype)
    pays, why = sparse_pays(*args)
    if pays and ext is None:
        return None
    if pays and _kernels_backend() != "cpp":
        # Asked only now, so a layer that stays dense never triggers the extension's build.
        pays, why = sparse_pays(*args, extension=False)
    if pays:
        return PathChoice("sparse", kept, "CSR kernels on kept weights only: " + why)
    return PathChoice("masked", kept, "vendor GEMM, masked dW: " + why)


def _kernels_backend() -> str:
    # Whether the C++ extension is there (built on first call; None -> torch.sparse fallback).
    return _kernels.backend(torch.zeros(0))
