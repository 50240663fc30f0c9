"""Which optimizers keep the mask invariant, and which optimizers hold a model's weights.

A pruned weight stays exactly zero under an optimizer whose update of an entry depends only on
that entry's gradient and state (elementwise): the masked kernels give it a zero gradient and
``set_mask`` zeroes its state. LBFGS (a step along a direction built from whole-vector history)
and Muon (an orthogonalised matrix update) move every entry, pruned ones included, at the first
step: the pruners refuse them.

A pruner built without its optimizer cannot zero that optimizer's momentum or Adam moments at the
entries it prunes, and the next steps revive them (a resnet18: all 10.5M pruned weights within 3
SGD-momentum steps). So every optimizer that steps is recorded here (a global step hook, weakly
referenced, installed when ``sparsekern.pruning`` is imported), and a pruner zeroes the state of
every recorded optimizer that holds its weights, not only the one it was given.
"""

from __future__ import annotations

import gc
import warnings
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["ELEMENTWISE", "NOT_ELEMENTWISE", "check_elementwise", "optimizers_holding"]

#: torch.optim optimizers whose update is elementwise (a zero gradient and zero state at an entry
#: leave a zero weight there, weight decay included)
ELEMENTWISE = tuple(
    getattr(torch.optim, n)
    for n in (
        "SGD",
        "Adam",
        "AdamW",
        "Adamax",
        "NAdam",
        "RAdam",
        "RMSprop",
        "Adagrad",
        "Adadelta",
        "ASGD",
        "Rprop",
        "SparseAdam",
        "Adafactor",
    )  # fmt: skip
    if hasattr(torch.optim, n)
)
#: class names of optimizers whose update is not elementwise (torch's and look-alikes)
NOT_ELEMENTWISE = ("LBFGS", "Muon", "Shampoo", "SOAP", "KFAC")

_tracked: weakref.WeakSet = weakref.WeakSet()


def _track(optimizer, args, kwargs) -> None:
    _tracked.add(optimizer)


_handle = register_optimizer_step_post_hook(_track)


def check_elementwise(optimizer: torch.optim.Optimizer, who: str) -> None:
    """ValueError for an optimizer whose update is not elementwise (LBFGS, Muon, ...): pruned
    weights would move off zero at its first step."""
    names = {c.__name__ for c in type(optimizer).__mro__}
    bad = sorted(names & set(NOT_ELEMENTWISE))
    if bad and not isinstance(optimizer, ELEMENTWISE):
        raise ValueError(
            f"{who}: expected an optimizer with an elementwise update (SGD, Adam, AdamW, RMSprop, "
            f"Adagrad, ...), got {type(optimizer).__name__} ({bad[0]} mixes entries: pruned "
            "weights become non-zero at its first step; see docs/pruning.md, 'Optimizers')"
        )


def _holds_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> bool:
    state = optimizer.state
    return any(state.get(p) for p in params)


def _is_optimizer(obj) -> bool:
    # gc.get_objects() also yields weakref proxies, and isinstance on a dead one raises
    try:
        return isinstance(obj, torch.optim.Optimizer)
    except ReferenceError:
        return False


def optimizers_holding(params: list[torch.Tensor], scan: bool = False) -> list:
    """The optimizers that hold per-parameter state for any of ``params``: those seen stepping
    since ``sparsekern.pruning`` was imported, and, with ``scan``, any other live optimizer
    (a garbage-collector scan, ~0.1 s per 100k objects: only when nothing tracked matched)."""
    found = [o for o in list(_tracked) if _holds_state(o, params)]
    if found or not scan:
        return found
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on lazy modules warns (torch.distributed)
        live = [o for o in gc.get_objects() if _is_optimizer(o)]
    for o in live:
        if _holds_state(o, params):
            _tracked.add(o)
            found.append(o)
    return found
