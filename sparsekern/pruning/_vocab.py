"""The one keyword vocabulary of ``sparsekern.pruning`` and the deprecation path of the old names.

Every pruner and mask function spells a concept one way (:data:`VOCABULARY`, the table in
``docs/pruning.md``). The names used before (:data:`RENAMED`) keep working for one release with a
``DeprecationWarning``: :func:`translate` rewrites them into the new keywords. Every ``BasePruner``
subclass gets this on its constructor automatically (``BasePruner.__init_subclass__``); public
functions get it with :func:`renamed_keywords`. A name the wrapped function itself declares is
never rewritten (a user pruner may well have its own ``seed``).
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch

__all__ = ["RENAMED", "VOCABULARY", "renamed_keywords", "translate"]

#: ``(name, meaning, default)`` of every shared keyword; ``docs/pruning.md`` shows this table and
#: ``tests/pruning/test_vocabulary.py`` checks that the two agree.
VOCABULARY: tuple[tuple[str, str, str], ...] = (
    ("model", "the model whose sparse layers (`sparsify`) are pruned; first positional", "-"),
    (
        "optimizer",
        "the optimizer training the model, second positional; its state is zeroed wherever a "
        "mask changes (None: the pruner finds the optimizers holding the weights' state)",
        "None",
    ),
    (
        "sparsity",
        "target pruned fraction in [0, 1]: a number, or `{layer | 'conv' | 'fc' | '*': s}` "
        "for per-layer pruners",
        "None",
    ),
    ("density", "kept fraction, `1 - sparsity`: the mask functions' argument", "-"),
    ("schedule", "a `Schedule` giving the target on the step or round clock", "None"),
    ("layers", "names of the sparse layers to prune", "None (all)"),
    (
        "regularization",
        "`'none'`, `'l2'` or `'l1'`: what `regularization_loss()` returns",
        "'none' (Han: 'l2')",
    ),
    ("reg_strength", "its coefficient (Caffe's weight-decay scaling)", "0.0 (Han: 5e-4)"),
    (
        "min_density",
        "floor on each layer's kept fraction; None: `min(0.01, (1 - sparsity) / 2)` and at "
        "least one weight (block); 0: no floor (an emptied layer is warned about)",
        "None",
    ),
    (
        "scope",
        "`'layer'` (each layer to the target) or `'global'` (all layers ranked together)",
        "the method's",
    ),
    ("importance", "an `Importance` object scoring weights (higher is kept)", "the method's"),
    (
        "block_size",
        "block pruning: `(bm, bk)` (or one int) of a mask block; SparseGPT: the lazy-update "
        "column block",
        "None (the layer's) / 128",
    ),
    (
        "n_m",
        "`(n, m)`: keep N of every M consecutive weights along the input dimension",
        "(2, 4) / None",
    ),
    ("generator", "a `torch.Generator` for every random choice (None: the global RNG)", "None"),
    ("process_group", "the ranks that must agree on the masks under DDP", "None"),
    ("closure", "no-argument callable returning the loss on the current batch", "None"),
)


def _n_m(kwargs: dict) -> tuple[int, int]:
    return (kwargs.pop("n", 2), kwargs.pop("m", 4))


def _scope(kwargs: dict) -> str:
    return "global" if kwargs.pop("global_pruning") else "layer"


def _generator(kwargs: dict):
    seed = kwargs.pop("seed")
    return None if seed is None else torch.Generator().manual_seed(int(seed))


#: old keyword -> (new keyword, how the new value is made from the kwargs, the old names it takes)
RENAMED: dict[str, tuple[str, object, tuple[str, ...]]] = {
    "blocksize": ("block_size", lambda kw: kw.pop("blocksize"), ("blocksize",)),
    "n": ("n_m", _n_m, ("n", "m")),
    "m": ("n_m", _n_m, ("n", "m")),
    "global_pruning": ("scope", _scope, ("global_pruning",)),
    "seed": ("generator", _generator, ("seed",)),
}


def translate(who: str, kwargs: dict, declared: frozenset[str] = frozenset()) -> dict:
    """``kwargs`` with every old name (:data:`RENAMED`, unless in ``declared``) replaced by its new
    keyword, one ``DeprecationWarning`` per old name. Both an old and its new name: TypeError."""
    old = [k for k in kwargs if k in RENAMED and k not in declared]
    if not old:
        return kwargs
    kwargs = dict(kwargs)
    done = set()
    for k in old:
        new, make, names = RENAMED[k]
        if new in done:
            continue  # n and m make one n_m
        if new in kwargs:
            raise TypeError(f"{who}: expected {new}= or the deprecated {k}=, got both")
        given = ", ".join(f"{n}=" for n in names if n in kwargs)
        kwargs[new] = make(kwargs)
        done.add(new)
        warnings.warn(
            f"{who}: {given} is deprecated (one keyword vocabulary, docs/pruning.md); use "
            f"{new}={kwargs[new]!r}; the old name goes in the next release",
            DeprecationWarning,
            stacklevel=3,
        )
    return kwargs


def declared_names(fn) -> frozenset[str]:
    return frozenset(
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    )


def renamed_keywords(fn):
    """Decorator: ``fn`` accepts the old keyword names (:data:`RENAMED`) with a warning."""
    declared = declared_names(fn)
    who = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **translate(who, kwargs, declared))

    return wrapper


def wrap_init(cls) -> None:
    """Make ``cls.__init__`` (if the class defines one) accept the old keyword names."""
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "_vocab_wrapped", False):
        return
    declared = declared_names(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **translate(cls.__name__, kwargs, declared))

    __init__._vocab_wrapped = True
    cls.__init__ = __init__


def n_m_pair(n_m, who: str) -> tuple[int, int]:
    """``(n, m)`` as ints with ``1 <= n <= m``, or ValueError naming what was expected."""
    ok = (
        isinstance(n_m, (tuple, list))
        and len(n_m) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in n_m)
        and 1 <= n_m[0] <= n_m[1]
    )
    if not ok:
        raise ValueError(f"{who}: expected n_m = (n, m) with integers 1 <= n <= m, got {n_m!r}")
    return int(n_m[0]), int(n_m[1])


def n_m_positional(n_m, rest: tuple, who: str) -> tuple[int, int]:
    """``f(w, n_m)`` or the deprecated ``f(w, n, m)``: the ``(n, m)`` pair."""
    if isinstance(n_m, int) and not isinstance(n_m, bool):
        if len(rest) > 1:
            raise TypeError(f"{who}: expected (weight, n_m), got {2 + len(rest)} arguments")
        m = rest[0] if rest else 4
        warnings.warn(
            f"{who}(x, n, m) is deprecated (one keyword vocabulary, docs/pruning.md); use "
            f"{who}(x, ({n_m}, {m})); the old form goes in the next release",
            DeprecationWarning,
            stacklevel=4,  # n_m_positional < nm_mask / check_nm < renamed_keywords < the caller
        )
        n_m = (n_m, m)
    elif rest:
        raise TypeError(f"{who}: expected (weight, n_m), got {2 + len(rest)} arguments")
    return n_m_pair(n_m, who)
