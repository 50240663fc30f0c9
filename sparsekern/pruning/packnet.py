"""PackNet (Mallya and Lazebnik 2018): several tasks packed into one network by iterative pruning.

Train task 0 with every weight, prune 50% of each layer's weights (smallest ``|w|``), retrain
briefly, freeze the kept weights. Task 1 trains in the freed weights only (older tasks' weights
fixed), prunes 75% of *its* weights, retrains, freezes; and so on. An integer owner per weight says
which task holds it; task ``j`` runs with the weights of tasks ``0..j`` (later tasks' weights
masked out), so its outputs never change once it is done.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from sparsekern.nn.masks import note_mask_synced, zero_optimizer_state
from sparsekern.pruning.base import BasePruner

__all__ = ["FREE", "PackNet"]

#: the owner of a weight no task holds (pruned and not yet given to a new task)
FREE = -1


def _check_fraction(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"PackNet: expected {what} a fraction in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"PackNet: expected {what} in [0, 1], got {value}")
    return float(value)


class PackNet(BasePruner):
    """Iterative pruning to pack tasks into one network (Mallya and Lazebnik 2018).

    Lifecycle (per task ``j = 0, 1, ...``)::

        packnet = PackNet(trunk, opt, num_tasks=4)   # trunk = sparsify(shared layers)
        for j in range(4):
            packnet.start_task()                     # free weights -> task j; older ones frozen
            ... train task j (trunk + head j): opt.step(); packnet.step()
            packnet.prune()                          # 50% (j=0) / 75% (j>0) of task j's weights
            ... retrain briefly: opt.step(); packnet.step()
        with packnet.task(1):                        # run task 1: tasks 2, 3's weights masked
            logits = heads[1](trunk(x))
        net1 = packnet.model_for_task(1)             # or an independent copy at task 1

    Paper defaults: prune 50% of every layer after the first task, 75% of each later task's own
    weights after it (``prune_first``, ``prune_later``), the last task unpruned (``num_tasks``
    given: ``prune()`` after the last task removes nothing unless asked); pruning is per layer by
    ``|w|``; the freed weights start the next task at zero, as in the authors' code (they were
    zeroed by pruning); biases of the pruned layers and every BatchNorm (affine parameters and
    running statistics: BN runs in eval mode) are frozen after task 0, since they are shared and
    not masked. Heads are per task and stay the user's (give each task its own head; do not
    include them in ``layers``).

    Frozen weights: their gradients are zeroed by a hook on each weight (the paper), their
    optimizer state is zeroed when the task starts, and :meth:`step` copies their values back
    after each optimizer step, so that weight decay in the optimizer (which acts after the
    gradient) cannot move them either: older tasks stay bitwise unchanged. Every shared layer must
    be pruned by PackNet (or frozen by the user), or older tasks would change through it.

    Args:
        model: a model whose shared layers are sparse (``sparsify``).
        optimizer: as in :class:`BasePruner`.
        prune_first: fraction of each layer's weights pruned after task 0 (paper: 0.5).
        prune_later: fraction of a later task's own weights pruned after it (paper: 0.75).
        num_tasks: the number of tasks, if known: the last one is then left unpruned by
            default (paper). None: every task is pruned by default.
        layers, regularization, reg_strength: see :class:`BasePruner`. ``sparsity`` and
            ``schedule`` are refused: PackNet's targets are ``prune_first`` / ``prune_later``.

    Attributes:
        owner: ``{layer: int16 tensor of the weight's shape}``: ``j`` for task ``j``'s weights,
            :data:`FREE` (-1) for weights no task holds.
        current_task: the task being trained (-1 before :meth:`start_task`).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        prune_first: float = 0.5,
        prune_later: float = 0.75,
        num_tasks: int | None = None,
        **base,
    ) -> None:
        for k in ("sparsity", "schedule"):
            if base.get(k) is not None:
                raise ValueError(
                    f"PackNet: expected no {k} (its targets are prune_first / prune_later), "
                    f"got {base[k]!r}"
                )
        self.prune_first = _check_fraction(prune_first, "prune_first")
        self.prune_later = _check_fraction(prune_later, "prune_later")
        if num_tasks is not None and (
            isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1
        ):
            raise ValueError(
                f"PackNet: expected num_tasks an integer >= 1 or None, got {num_tasks}"
            )
        self.num_tasks = num_tasks
        super().__init__(model, optimizer, **base)
        self.owner = {
            n: torch.full(m.weight.shape, FREE, dtype=torch.int16, device=m.weight.device)
            for n, m in self.layers.items()
        }
        self.current_task = -1
        self._snapshot: dict[str, torch.Tensor] = {}
        self._bn_hooks: list = []
        for n, m in self.layers.items():
            m.weight.register_hook(self._grad_hook(n))

    # ------------------------------------------------------------------ lifecycle
    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if self.current_task < 0:
                return grad
            # only the current task's weights learn: older tasks are frozen, free ones unused
            own = self.owner[name] == self.current_task
            return torch.where(own, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))

        return hook

    @torch.no_grad()
    def start_task(self) -> int:
        """Begin the next task: every free weight (never used, or pruned from earlier tasks)
        goes to it, starting from zero; the earlier tasks' weights are frozen (after task 0, so
        are the pruned layers' biases and BatchNorm). Returns the new task's index."""
        if self.num_tasks is not None and self.current_task + 1 >= self.num_tasks:
            raise ValueError(
                f"PackNet.start_task: expected at most num_tasks={self.num_tasks} tasks, got "
                f"task {self.current_task + 1}"
            )
        t = self.current_task + 1
        masks = {}
        for n, m in self.layers.items():
            free = self.owner[n] == FREE
            if t > 0 and not bool(free.any()):
                raise ValueError(
                    f"PackNet.start_task: expected free weights for task {t} in {n}, got none "
                    f"(prune the previous task first)"
                )
            masks[n] = torch.ones_like(m.mask)
        for n in self.layers:
            self.owner[n][self.owner[n] == FREE] = t
        self.current_task = t
        # install: the freed weights become trainable, at zero with zero optimizer state
        self._apply(masks, event="start_task", task=t)
        self._freeze_old()
        return t

    @torch.no_grad()
    def _freeze_old(self) -> None:
        t = self.current_task
        self._snapshot = {}
        if t == 0:
            return
        for n, m in self.layers.items():
            frozen = (self.owner[n] >= 0) & (self.owner[n] < t)
            self._snapshot[n] = m.weight.detach().clone()
            for opt in [self.optimizer, *self._other_optimizers()]:
                if opt is not None:
                    zero_optimizer_state(opt, m.weight, frozen)
            if m.bias is not None:
                m.bias.requires_grad_(False)
                m.bias.grad = None
        if not self._bn_hooks:
            for mod in self.model.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    for p in mod.parameters(recurse=False):
                        p.requires_grad_(False)
                        p.grad = None
                    # running statistics frozen too: BN always in eval mode from now on
                    self._bn_hooks.append(mod.register_forward_pre_hook(_bn_eval))

    def step(self, closure=None) -> bool:
        """Call after every ``optimizer.step()``: counts the step and puts the frozen weights
        back where the optimizer's weight decay moved them (their gradient is already zero).
        Returns False (no mask changes here)."""
        self.steps += 1
        if self._snapshot:
            with torch.no_grad():
                for n, m in self.layers.items():
                    frozen = (self.owner[n] >= 0) & (self.owner[n] < self.current_task)
                    m.weight.copy_(torch.where(frozen, self._snapshot[n], m.weight))
        return False

    def default_fraction(self, task: int | None = None) -> float:
        """The fraction of ``task``'s own weights :meth:`prune` removes by default: 0.5 for
        task 0, 0.75 for later ones, 0 for the last one when ``num_tasks`` is given."""
        t = self.current_task if task is None else task
        if self.num_tasks is not None and t == self.num_tasks - 1 and t > 0:
            return 0.0
        return self.prune_first if t == 0 else self.prune_later

    def prune(self, sparsity: float | None = None, closure=None) -> dict:
        """Prune ``sparsity`` (default :meth:`default_fraction`) of the current task's own weights
        in every layer, smallest ``|w|`` first; the pruned weights become free for the next task.
        Returns ``{layer: kept fraction of all its weights}``."""
        if self.current_task < 0:
            raise ValueError("PackNet.prune: expected a task in progress (start_task() first)")
        s = self.default_fraction() if sparsity is None else _check_fraction(sparsity, "sparsity")
        masks = self.compute_masks(s, closure)
        self._apply(masks, event="prune", task=self.current_task, target=s)
        with torch.no_grad():
            for n, m in self.layers.items():
                self.owner[n][(self.owner[n] == self.current_task) & ~m.mask] = FREE
        return self.kept_fractions()

    @torch.no_grad()
    def compute_masks(self, sparsity, closure=None) -> dict[str, torch.Tensor]:
        """Per layer: keep the largest ``round((1 - sparsity) * n_j)`` of the current task's
        ``n_j`` weights by ``|w|``; other tasks' weights are untouched."""
        out = {}
        for n, m in self.layers.items():
            w = m.weight.detach()
            if not bool(torch.isfinite(w).all()):
                raise ValueError(f"PackNet.prune: expected finite weights, got NaN/inf in {n}")
            own = (self.owner[n] == self.current_task).flatten()
            idx = own.nonzero().squeeze(1)
            keep = round((1.0 - float(sparsity)) * idx.numel())
            mask = (self.owner[n] >= 0).flatten().clone()
            mask[idx] = False
            if keep > 0:
                top = torch.topk(w.flatten()[idx].abs(), keep, sorted=False).indices
                mask[idx[top]] = True
            out[n] = mask.view_as(m.mask)
        return out

    # ------------------------------------------------------------------ running a task
    def task_mask(self, name: str, task: int) -> torch.Tensor:
        """The bool mask of layer ``name`` for ``task``: the weights of tasks ``0..task``."""
        self._check_task(task)
        o = self.owner[name]
        return (o >= 0) & (o <= task)

    def _check_task(self, task: int) -> None:
        if (
            isinstance(task, bool)
            or not isinstance(task, int)
            or not 0 <= task <= self.current_task
        ):
            raise ValueError(
                f"PackNet: expected a task in [0, {self.current_task}] (the tasks started), "
                f"got {task!r}"
            )

    @contextlib.contextmanager
    def task(self, j: int) -> Iterator[nn.Module]:
        """Context manager: inside, the model computes task ``j`` (the weights of tasks after
        ``j`` masked out); on exit every weight and mask is restored bitwise. Yields the model."""
        self._check_task(j)
        saved = {n: (m.weight.detach().clone(), m.mask.clone()) for n, m in self.layers.items()}
        try:
            with torch.no_grad():
                for n, m in self.layers.items():
                    m.mask.copy_(self.task_mask(n, j))  # the next forward zeroes the rest
            yield self.model
        finally:
            with torch.no_grad():
                for n, m in self.layers.items():
                    w, mask = saved[n]
                    m.mask.copy_(mask)
                    m.weight.copy_(w)
                    note_mask_synced(m)

    def model_for_task(self, j: int) -> nn.Module:
        """An independent copy of the model computing task ``j`` (later tasks' weights removed,
        masks set to task ``j``'s), for export or inference; the original is untouched."""
        with self.task(j):
            net = copy.deepcopy(self.model)
        names = set(self.layers)
        with torch.no_grad():
            for n, m in net.named_modules():
                if n in names:
                    m.weight.masked_fill_(~m.mask, 0)
                    note_mask_synced(m)
        return net

    def task_sparsity(self) -> dict[int, float]:
        """``{task: fraction of all the pruned layers' weights it owns}``, and ``-1``: free."""
        total = sum(o.numel() for o in self.owner.values())
        tasks = range(-1, self.current_task + 1)
        return {t: sum(int((o == t).sum()) for o in self.owner.values()) / total for t in tasks}

    # ------------------------------------------------------------------ state
    def _config(self) -> dict:
        return {
            "prune_first": self.prune_first,
            "prune_later": self.prune_later,
            "num_tasks": self.num_tasks,
        }

    def _extra_state(self) -> dict:
        return {"task": self.current_task, "owner": {n: o.clone() for n, o in self.owner.items()}}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """As :meth:`BasePruner.load_state_dict`, with the owners; load the model's state dict
        first: the frozen weights' values are taken from it. Nothing changes when it refuses."""
        self._check_extra(state)
        super().load_state_dict(state, strict)

    def _check_extra(self, state: dict) -> None:
        owner, task = state.get("owner"), state.get("task")
        if not isinstance(task, int) or task < -1:
            raise ValueError(f"PackNet.load_state_dict: expected 'task' an int >= -1, got {task!r}")
        if not isinstance(owner, dict) or set(owner) != set(self.layers):
            raise ValueError(
                f"PackNet.load_state_dict: expected 'owner' for layers {sorted(self.layers)}, got "
                f"{sorted(owner) if isinstance(owner, dict) else owner!r}"
            )
        for n, o in owner.items():
            m = self.layers[n]
            if not isinstance(o, torch.Tensor) or o.shape != m.weight.shape:
                raise ValueError(
                    f"PackNet.load_state_dict: expected owner[{n!r}] of shape "
                    f"{list(m.weight.shape)}, got {getattr(o, 'shape', o)!r}"
                )
            if int(o.min()) < FREE or int(o.max()) > task:
                raise ValueError(
                    f"PackNet.load_state_dict: expected owners in [-1, {task}] in {n}, got "
                    f"[{int(o.min())}, {int(o.max())}]"
                )

    def _load_extra_state(self, state: dict) -> None:
        owner, task = state["owner"], state["task"]
        self.current_task = task
        self.owner = {n: o.to(torch.int16).to(self.layers[n].weight.device).clone()
                      for n, o in owner.items()}  # fmt: skip
        self._freeze_old()


def _bn_eval(module: nn.Module, args) -> None:
    module.training = False
