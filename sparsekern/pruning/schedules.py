"""Sparsity schedules: when a pruner changes its masks, and to what target.

A schedule maps a tick ``t`` to a target and says which ticks are updates. Its ``clock`` says what
a tick is:

* ``"step"``: optimizer steps, counted by :meth:`BasePruner.step` (1 after the first step). The
  pruner acts inside ``step()`` whenever ``schedule.is_update(steps)``;
* ``"round"``: pruning rounds, i.e. calls of :meth:`BasePruner.prune` without an explicit
  target (1 for the first). The training loop decides when a round happens (Han et al. prune
  after retraining epochs, which the loop owns); the schedule decides how far each round goes.

Targets are sparsities (the pruned fraction, in [0, 1]): a number, or ``{layer name | "conv" |
"fc" | "*": sparsity}`` for the pruners that take one target per layer (Han, block pruning).

Schedules are plain objects with a :meth:`Schedule.state_dict` of their parameters, so a pruner's
``state_dict`` can tell whether a resumed run uses the same schedule.
"""

from __future__ import annotations

import math

__all__ = ["CLOCKS", "CosineDecay", "Cubic", "Geometric", "OneShot", "Schedule"]

CLOCKS = ("step", "round")


def _check_target(value, who: str):
    """A sparsity in [0, 1], or a dict of them; returns it with floats."""
    if isinstance(value, dict):
        if not value:
            raise ValueError(f"{who}: expected a sparsity or a non-empty dict of them, got {{}}")
        return {k: _check_target(v, f"{who}[{k!r}]") for k, v in value.items()}
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{who}: expected a sparsity (a number in [0, 1]), got {value!r}")
    v = float(value)
    if not 0.0 <= v <= 1.0:  # also rejects nan
        raise ValueError(f"{who}: expected a sparsity in [0, 1], got {value}")
    return v


def _check_int(value, who: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{who}: expected an integer >= {lo}, got {value!r}")
    return value


class Schedule:
    """Base class. Subclasses set ``clock`` and implement :meth:`__call__` and :meth:`is_update`.

    Attributes:
        clock: ``"step"`` or ``"round"`` (see the module docstring).
        final: the target once the schedule is done.
    """

    clock = "step"
    final: float | dict

    def __call__(self, t: int) -> float | dict:
        """The target sparsity at tick ``t``."""
        raise NotImplementedError

    def is_update(self, t: int) -> bool:
        """Whether the pruner changes its masks at tick ``t``."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """``{"type": class name, **parameters}``: JSON-able, compared on resume."""
        return {"type": type(self).__name__, **self._params()}

    def _params(self) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Schedule) and self.state_dict() == other.state_dict()

    __hash__ = None


class OneShot(Schedule):
    """Prune once, to ``sparsity``, at tick ``at``.

    ``OneShot(0.9, at=3000)`` prunes after 3,000 optimizer steps (global magnitude pruning after
    dense training); ``OneShot(0.9, clock="round")`` prunes to 0.9 at the first ``prune()`` and
    stays there.
    """

    def __init__(self, sparsity: float | dict, at: int = 1, clock: str = "step") -> None:
        if clock not in CLOCKS:
            raise ValueError(f"OneShot: expected clock in {CLOCKS}, got {clock!r}")
        self.final = _check_target(sparsity, "OneShot: sparsity")
        self.at = _check_int(at, "OneShot: at", 0)
        self.clock = clock

    def __call__(self, t: int) -> float | dict:
        return self.final

    def is_update(self, t: int) -> bool:
        return t == self.at if self.clock == "step" else t >= 1

    def _params(self) -> dict:
        return {"sparsity": self.final, "at": self.at, "clock": self.clock}


class Geometric(Schedule):
    """Han et al.'s iterative pruning over ``rounds`` rounds: every round removes the same
    fraction of what is left, so round ``r`` (1-based) keeps ``(1 - sparsity) ** (r / rounds)``.

    ``Geometric(0.92, 3)`` -> sparsities 0.569, 0.814, 0.92 (kept 43%, 19%, 8%). A dict gives a
    dict per round (each layer its own final sparsity). Clock: rounds; after the last round the
    target stays at ``sparsity``.
    """

    clock = "round"

    def __init__(self, sparsity: float | dict, rounds: int) -> None:
        self.final = _check_target(sparsity, "Geometric: sparsity")
        self.rounds = _check_int(rounds, "Geometric: rounds", 1)

    def _one(self, s: float, t: int) -> float:
        if t >= self.rounds:
            return s
        return 1.0 - (1.0 - s) ** (t / self.rounds)

    def __call__(self, t: int) -> float | dict:
        t = max(0, int(t))
        if isinstance(self.final, dict):
            return {k: self._one(v, t) for k, v in self.final.items()}
        return self._one(self.final, t)

    def is_update(self, t: int) -> bool:
        return 1 <= t <= self.rounds

    def _params(self) -> dict:
        return {"sparsity": self.final, "rounds": self.rounds}


class Cubic(Schedule):
    """Zhu and Gupta 2017's gradual schedule, on optimizer steps:
    ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (end - t0))^3`` at ``t = t0, t0 + every, ..., end``:
    fast at first, while many weights are redundant, slower towards ``s_f``.

    Args:
        sparsity: ``s_f``, reached at ``end`` and kept after it.
        begin: ``t0``, the first pruning step (>= 0).
        end: the last pruning step; ``end - begin`` a positive multiple of ``every``.
        every: ``dt``, steps between pruning steps (Zhu and Gupta: 100 to 1000).
        initial: ``s_i``, the sparsity before ``begin`` (usually 0), ``<= sparsity``.
    """

    clock = "step"

    def __init__(
        self, sparsity: float, begin: int, end: int, every: int = 100, initial: float = 0.0
    ) -> None:
        self.final = _check_target(sparsity, "Cubic: sparsity")
        self.initial = _check_target(initial, "Cubic: initial")
        if isinstance(self.final, dict) or isinstance(self.initial, dict):
            raise TypeError("Cubic: expected one sparsity for all layers, got a dict")
        if self.initial > self.final:
            raise ValueError(
                f"Cubic: expected initial <= sparsity, got initial {initial} > sparsity {sparsity}"
            )
        self.begin = _check_int(begin, "Cubic: begin", 0)
        self.every = _check_int(every, "Cubic: every", 1)
        self.end = _check_int(end, "Cubic: end", self.begin + 1)
        if (self.end - self.begin) % self.every:
            raise ValueError(
                f"Cubic: expected end - begin ({self.end - self.begin}) to be a multiple of "
                f"every ({self.every})"
            )
        self.n = (self.end - self.begin) // self.every  # pruning steps after the first

    def __call__(self, t: int) -> float:
        frac = min(max((t - self.begin) / (self.end - self.begin), 0.0), 1.0)
        if frac in (0.0, 1.0):  # exactly s_i / s_f at the ends, not up to float rounding
            return self.initial if frac == 0.0 else self.final
        return self.final + (self.initial - self.final) * (1.0 - frac) ** 3

    def is_update(self, t: int) -> bool:
        return self.begin <= t <= self.end and (t - self.begin) % self.every == 0

    def _params(self) -> dict:
        return {
            "sparsity": self.final,
            "begin": self.begin,
            "end": self.end,
            "every": self.every,
            "initial": self.initial,
        }


class CosineDecay(Schedule):
    """RigL's update fraction (Evci et al. 2020), on optimizer steps: every ``every`` steps before
    ``end``, ``value * (1 + cos(pi t / end)) / 2``; 0 from ``end`` on.

    RigL keeps its sparsity fixed: this schedule is the fraction of active weights dropped and
    regrown at each update (``value`` = alpha, 0.3 in the paper; ``every`` = dT, 100; ``end`` =
    T_end, 3/4 of training).
    """

    clock = "step"

    def __init__(self, value: float, end: int, every: int = 100) -> None:
        self.final = 0.0
        self.value = _check_target(value, "CosineDecay: value")
        # end = 0 would make every value 0: ``value`` silently ignored
        self.end = _check_int(end, "CosineDecay: end", 1)
        self.every = _check_int(every, "CosineDecay: every", 1)

    def __call__(self, t: int) -> float:
        if t >= self.end:
            return 0.0
        return self.value * (1.0 + math.cos(math.pi * t / self.end)) / 2.0

    def is_update(self, t: int) -> bool:
        return t > 0 and t % self.every == 0 and t < self.end

    def _params(self) -> dict:
        return {"value": self.value, "end": self.end, "every": self.every}
