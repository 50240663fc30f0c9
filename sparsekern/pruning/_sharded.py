"""Pruners on FSDP2-sharded models: the one-process decision, on every rank.

Under ``fully_shard`` each rank holds a row shard of every weight (a DTensor) and of its mask
(:mod:`sparsekern.nn._dtensor`). A pruner's method that decides masks (``prune``, ``step`` on an
update step, ``compute_masks``, ``update``, ...) runs inside a *gathered view*: every pruned
layer's weight, ``.grad`` and mask are all-gathered into full tensors and put in the module in
place of the shards, the method runs unchanged (so every rank computes, from the same full
tensors, the same masks as one process, ties included: ``torch.topk`` sees the same input), and
on the way out each rank writes its own rows back: weight, grad and mask, and the optimizer state
(momentum, Adam moments: DTensors of the same placement) zeroed where a mask pruned or regrew.

Memory: inside the view every rank holds the pruned layers' full weights, grads and masks (9
bytes per fp32 weight), only while a mask decision runs (not at the steps between): what one
process holds for the decision, on every rank. It is exact by construction (the k-th value and
its ties are those one process sees); a decision that never holds a whole layer (per-shard top-k
candidates merged to an exact global k-th value) is not implemented.

A closure passed to such a method runs with the view suspended (the sharded model, through
FSDP's hooks); the dense gradient (RigL, SNIP, Taylor) is ``loss.backward()`` through FSDP with
all-True masks: FSDP's reduce-scatter averages it over the ranks, i.e. the gradient of the mean
loss over the global batch when each rank's closure averages over an equal share.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from sparsekern.nn._dtensor import is_dtensor, local_like, shard_mask, sharded_weight
from sparsekern.nn.masks import note_mask_synced, zero_optimizer_state

__all__ = ["dense_weight_grads", "gathered", "handles", "is_sharded", "shard_state", "wrap_sharded"]

#: the views open now, innermost last (methods calling methods: only the outermost gathers)
_VIEWS: list[_View] = []

#: pruner methods that decide or install masks: run in a gathered view when sharded
_DECIDING = ("prune", "step", "compute_masks", "update", "_apply", "finalize")
#: pruner attributes ``{layer: tensor of the weight's shape}`` kept sharded like the weights
#: (the latent values of pruned weights of SR-STE, Gibbs and SCL, SCL's mask scores, the
#: per-level masks of OmniSparsity, N:M mask decay's factors, applied to each rank's shards of
#: the weight and gradient by its optimizer hooks: DTensors of the weight's placement): whole
#: inside a decision and in the pruner's state dict, each rank's rows written back after
_SHARDED_STATE = ("latent", "scores", "masks", "factor")
#: methods that move the pruner's state: run with the :data:`_SHARDED_STATE` whole
_STATEFUL = ("state_dict", "load_state_dict", "level_sparsity")
#: methods that read masks only: run with the masks gathered (a DTensor's count_nonzero is
#: this rank's count, not the global one)
_READING = ("kept_fractions", "current_sparsity")


def is_sharded(layers: dict[str, nn.Module]) -> bool:
    return any(is_dtensor(m._parameters.get("weight")) for m in layers.values())


class _View:
    def __init__(
        self, layers: dict[str, nn.Module], optimizers, model: nn.Module | None, weights=True
    ):
        self.layers, self.optimizers, self.model = layers, optimizers, model
        self.weights = weights  # False: the masks only (methods that count)
        self.entries: dict = {}

    @torch.no_grad()
    def enter(self) -> None:
        for n, m in self.layers.items():
            sw = m._parameters.get("weight")
            if not is_dtensor(sw):
                continue
            shard_mask(m)
            dmask = m._buffers["mask"]
            full_m = dmask.full_tensor()
            if self.weights:
                full_w = nn.Parameter(sw.full_tensor(), requires_grad=sw.requires_grad)
                if sw.grad is not None:
                    full_w.grad = sw.grad.full_tensor()
                m._parameters["weight"] = full_w
            else:
                full_w = sw
            if full_w is not sw:  # the optimizer's Parameter, for its param group (param_lr)
                full_w.__dict__["_sk_shard"] = sw
            self.entries[n] = (m, sw, dmask, full_w, full_m.clone())
            m._buffers["mask"] = full_m
            note_mask_synced(m)

    @torch.no_grad()
    def exit(self) -> None:
        from sparsekern.pruning._optim import optimizers_holding

        for m, sw, dmask, _full_w, old in self.entries.values():
            w_now, mask_now = m._parameters["weight"], m._buffers["mask"]
            m._parameters["weight"], m._buffers["mask"] = sw, dmask
            if (
                isinstance(mask_now, torch.Tensor)
                and not is_dtensor(mask_now)
                and mask_now.dtype == torch.bool
                and mask_now.shape == old.shape
            ):
                reset = ~mask_now | (mask_now != old)
                dmask.to_local().copy_(local_like(mask_now, dmask).to_local())
                if w_now is not sw and w_now is not None and w_now.shape == sw.shape:
                    sw.to_local().copy_(local_like(w_now.detach(), sw).to_local())
                    if w_now.grad is None:
                        sw.grad = None
                    elif sw.grad is not None:
                        sw.grad.to_local().copy_(local_like(w_now.grad, sw).to_local())
                if bool(reset.any()):
                    dreset = local_like(reset, sw)
                    opts = [o for o in self.optimizers if o is not None]
                    opts += [o for o in optimizers_holding([sw]) if o not in opts]
                    for opt in opts:
                        zero_optimizer_state(opt, sw, dreset)
            note_mask_synced(m)
        self.entries = {}


class gathered:
    """Context: ``layers``' weights, grads and masks full on every rank (see the module doc);
    each rank's rows written back on exit. Nested views are no-ops."""

    def __init__(self, layers, optimizers=(), model=None, weights=True):
        self.view = _View(dict(layers), list(optimizers), model, weights)
        self.outer = False

    def __enter__(self):
        if not _VIEWS:
            self.outer = True
            _VIEWS.append(self.view)
            try:
                self.view.enter()
            except BaseException:
                self.view.exit()
                _VIEWS.pop()
                raise
        return self

    def __exit__(self, *exc):
        if self.outer:
            try:
                self.view.exit()
            finally:
                _VIEWS.pop()
        return False


class _state_gathered:
    """Context: the pruner's sharded state (:data:`_SHARDED_STATE`: dicts ``{layer: tensor}``,
    or ``{key: {layer: tensor}}``) whole on every rank (an all-gather per tensor). On exit every
    tensor of those attributes, now whole (updated in place or replaced by the method), becomes
    a DTensor sharded like its layer's weight again (each rank keeps its rows; nothing is
    communicated). A no-op when nothing of it is sharded (one process, or already gathered by
    an outer call)."""

    def __init__(self, pruner):
        self.pruner, self.attrs = pruner, []

    def __enter__(self):
        for attr in _SHARDED_STATE:
            d = self.pruner.__dict__.get(attr)
            if isinstance(d, dict) and _gather_dict(d):
                self.attrs.append(attr)
        return self

    @torch.no_grad()
    def __exit__(self, *exc):
        layers = self.pruner.__dict__.get("layers") or {}
        for attr in self.attrs:
            d = self.pruner.__dict__.get(attr)
            if isinstance(d, dict):
                _shard_dict(d, layers)
        self.attrs = []
        return False


def _gather_dict(d: dict) -> bool:
    found = False
    for k, v in list(d.items()):
        if is_dtensor(v):
            d[k], found = v.full_tensor(), True
        elif isinstance(v, dict):
            found = _gather_dict(v) or found
    return found


def _shard_dict(d: dict, layers: dict) -> None:
    for k, v in list(d.items()):
        if isinstance(v, dict):
            _shard_dict(v, layers)
        elif isinstance(v, torch.Tensor) and not is_dtensor(v) and k in layers:
            sw = sharded_weight(layers[k])
            if sw is not None and v.shape == sw.shape:
                d[k] = local_like(v, sw)


def shard_state(d: dict, layers: dict[str, nn.Module]) -> None:
    """Make every whole tensor of ``d`` (``{layer: tensor of its weight's shape}``) a DTensor
    sharded like its layer's weight, each rank keeping its rows (nothing communicated): for
    state a method creates (not gathered on the way in, so not re-sharded on the way out). A
    no-op for layers FSDP does not shard."""
    _shard_dict(d, layers)


def _stateful(fn):
    @functools.wraps(fn)
    def method(self, *args, **kwargs):
        with _state_gathered(self):
            return fn(self, *args, **kwargs)

    method.__dict__["_sk_sharded"] = True
    return method


class _suspended:
    """Context inside a view: the sharded model back (written back first), re-gathered after."""

    def __enter__(self):
        self.view = _VIEWS.pop() if _VIEWS else None
        if self.view is not None:
            self.view.exit()
        return self

    def __exit__(self, *exc):
        if self.view is not None:
            _VIEWS.append(self.view)
            self.view.enter()
        return False


def _wrap_closure(closure):
    if not callable(closure):
        return closure

    @functools.wraps(closure)
    def run():
        with _suspended():
            return closure()

    run.__dict__["_sk_sharded_closure"] = closure
    return run


def dense_weight_grads(layers: dict[str, nn.Module], closure) -> dict[str, torch.Tensor]:
    """:func:`sparsekern.pruning._common.dense_weight_grads` for sharded layers: full dense
    gradients (every rank the same), by ``loss.backward()`` through FSDP with all-True masks;
    every ``.grad`` of the model is saved before and restored after."""
    closure = closure.__dict__.get("_sk_sharded_closure", closure)
    with _suspended() as s:
        model = s.view.model if s.view is not None else None
        params = list(model.parameters()) if model is not None else []
        for m in layers.values():
            shard_mask(m)
            params += [p for p in m.parameters() if all(p is not q for q in params)]
        saved_grads = [p.grad for p in params]
        saved_masks = {n: m._buffers["mask"] for n, m in layers.items()}
        names = [n for n, m in layers.items() if m.weight.requires_grad]
        try:
            for p in params:
                p.grad = None
            for m in layers.values():
                m._buffers["mask"] = torch.ones_like(m._buffers["mask"])
            with torch.enable_grad():
                loss = closure()
                if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
                    raise TypeError(
                        "dense_weight_grads: expected the closure to return a 0-d loss tensor, "
                        f"got {type(loss).__name__}"
                    )
                loss.backward()
            grads = {}
            for n in names:
                w = layers[n].weight
                g = w.grad
                if g is None:
                    grads[n] = torch.zeros(w.shape, dtype=w.dtype, device=w.device)
                else:
                    grads[n] = g.full_tensor() if is_dtensor(g) else g.detach().clone()
        finally:
            for n, m in layers.items():
                m._buffers["mask"] = saved_masks[n]
                note_mask_synced(m)
            for p, g in zip(params, saved_grads):
                p.grad = g
    return grads


def _needs_view(pruner, name: str) -> bool:
    """Whether this call of ``name`` can change a mask (``step`` on steps that do not update
    runs on the shards, with no all-gather)."""
    if name != "step":
        return True
    from sparsekern.pruning.base import BasePruner

    owner = next(k for k in type(pruner).__mro__ if "step" in k.__dict__)
    if owner is BasePruner:
        s = pruner.schedule
        return s is not None and s.clock == "step" and s.is_update(pruner.steps + 1)
    probe = getattr(pruner, "is_update_step", None)
    return probe() if callable(probe) else True


def _reshard(model) -> bool:
    """Reshard every FSDP2 module of ``model`` that holds its gathered weights (FSDP keeps the
    root's gathered after a forward with no backward, e.g. an evaluation): the pruner must see
    the sharded Parameters the optimizer holds. Returns whether ``model`` uses FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    found = False
    if isinstance(model, nn.Module):
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
                found = True
    return found


def _base_init(init):
    @functools.wraps(init)
    def __init__(self, model, *args, **kwargs):
        if isinstance(model, nn.Module):
            compact = [n for n, m in model.named_modules() if m.__dict__.get("_sk_fsdp")]
            if compact:  # refused before the pruner touches anything
                raise NotImplementedError(
                    f"{type(self).__name__}: expected sparse layers whose masks can change, got "
                    f"compact-storage layers sharded by FSDP2 {compact[:4]}: their mask is fixed "
                    "while sharded (a new mask resizes the sharded values). Prune dense storage "
                    "(SparseLinear) under FSDP and compact after, or prune an unsharded copy "
                    "(full_state_dict) and shard it again (docs/distributed.md)"
                )
        fsdp = _reshard(model)
        init(self, model, *args, **kwargs)
        self.__dict__["_sk_fsdp"] = fsdp

    __init__.__dict__["_sk_sharded"] = True
    return __init__


def _run(fn, name: str):
    @functools.wraps(fn)
    def method(self, *args, **kwargs):
        if self.__dict__.get("_sk_fsdp") and not _VIEWS:
            _reshard(self.__dict__.get("model"))
        layers = self.__dict__.get("layers")
        if _VIEWS or not isinstance(layers, dict) or not is_sharded(layers):
            return fn(self, *args, **kwargs)
        for m in layers.values():
            shard_mask(m)
        if name in _READING:
            with gathered(layers, weights=False):
                return fn(self, *args, **kwargs)
        if not _needs_view(self, name):
            return fn(self, *args, **kwargs)
        args = tuple(_wrap_closure(a) if callable(a) else a for a in args)
        kwargs = {k: (_wrap_closure(v) if k == "closure" else v) for k, v in kwargs.items()}
        opts = [getattr(self, "optimizer", None)]
        with gathered(layers, opts, getattr(self, "model", None)), _state_gathered(self):
            return fn(self, *args, **kwargs)

    method.__dict__["_sk_sharded"] = True
    return method


def _regularization(fn):
    @functools.wraps(fn)
    def method(self, *args, **kwargs):
        out = fn(self, *args, **kwargs)
        # a penalty over sharded weights is a DTensor (partial sums): the full 0-d value,
        # differentiable, so it adds to the task loss and its gradient reaches each shard
        return out.full_tensor() if is_dtensor(out) else out

    method.__dict__["_sk_sharded"] = True
    return method


#: pruners that cannot run on sharded weights yet, and why: refused at construction
UNSUPPORTED = {
    "OneShotPruner": "it swaps dense layers for sparse ones at construction and runs its "
    "calibration forward passes layer by layer inside the mask decision, where FSDP would swap "
    "the gathered weights back; prune an unsharded copy (full_state_dict) and load the result "
    "with load_full_into_sharded",
}


def _refuse_sharded(init, name: str):
    @functools.wraps(init)
    def __init__(self, model=None, *args, **kwargs):
        m = model if model is not None else kwargs.get("model")
        if isinstance(m, nn.Module) and any(is_dtensor(p) for p in m.parameters()):
            raise NotImplementedError(
                f"{name}: expected a model whose weights are not sharded (one process or DDP), "
                f"got FSDP2-sharded (DTensor) weights: not supported yet, because "
                f"{UNSUPPORTED[name]} (docs/distributed.md)"
            )
        return init(self, model, *args, **kwargs)

    __init__.__dict__["_sk_sharded"] = True
    return __init__


def _sync_generators(pruner) -> None:
    """Every rank draws rank 0's random numbers: a pruner's CPU ``torch.Generator`` (Gibbs's
    samples, RigL's ties, ...) gets rank 0's state (one broadcast). The decisions run on the
    same full tensors on every rank; with the same draws they are the same decisions, and
    those of one process seeded as rank 0 (the default generator is seeded from the global
    RNG, which ranks may have seeded differently)."""
    import torch.distributed as dist

    gens = [(k, g) for k, g in vars(pruner).items() if isinstance(g, torch.Generator)]
    if not gens or not (dist.is_available() and dist.is_initialized()):
        return
    states = [[g.get_state() for _, g in gens]]
    dist.broadcast_object_list(states, src=0)
    for (_, g), st in zip(gens, states[0]):
        g.set_state(st)


def _sharded_init(init, owner):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        # the most derived class's __init__ only, once all of the pruner is built
        if getattr(type(self).__init__, "_sk_owner", None) is owner and self.__dict__.get(
            "_sk_fsdp"
        ):
            layers = self.__dict__.get("layers")
            if isinstance(layers, dict) and is_sharded(layers):
                _sync_generators(self)

    __init__.__dict__.update(_sk_sharded=True, _sk_owner=owner)
    return __init__


def wrap_sharded(cls) -> None:
    """Make ``cls``'s own mask-deciding methods run in a gathered view when the pruner's layers
    are sharded (one ``is_dtensor`` check per call otherwise); refuse the :data:`UNSUPPORTED`
    ones on a sharded model."""
    init = cls.__dict__.get("__init__")
    if cls.__name__ == "BasePruner" and callable(init) and not init.__dict__.get("_sk_sharded"):
        cls.__init__ = init = _base_init(init)
    if cls.__name__ in UNSUPPORTED and callable(init) and not init.__dict__.get("_sk_sharded"):
        cls.__init__ = _refuse_sharded(init, cls.__name__)
    elif callable(init) and not init.__dict__.get("_sk_sharded"):
        cls.__init__ = _sharded_init(init, cls)
    for name in _DECIDING + _READING:
        fn = cls.__dict__.get(name)
        if callable(fn) and not fn.__dict__.get("_sk_sharded"):
            setattr(cls, name, _run(fn, name))
    for name in _STATEFUL:
        fn = cls.__dict__.get(name)
        if callable(fn) and not fn.__dict__.get("_sk_sharded"):
            setattr(cls, name, _stateful(fn))
    fn = cls.__dict__.get("regularization_loss")
    if callable(fn) and not fn.__dict__.get("_sk_sharded"):
        cls.regularization_loss = _regularization(fn)


def handles(layers: dict[str, nn.Module]) -> bool:
    """Whether ``layers`` are sharded, or gathered by an open view (their closures and dense
    gradients must then go through FSDP)."""
    if is_sharded(layers):
        return True
    return any(any(e[0] is m for e in v.entries.values()) for v in _VIEWS for m in layers.values())
