"""Schedules: values at their ticks, update ticks, validation, equality through state_dict."""

import pytest

from sparsekern.pruning import CosineDecay, Cubic, Geometric, OneShot


def test_oneshot():
    s = OneShot(0.9, at=5)
    assert [t for t in range(10) if s.is_update(t)] == [5] and s(0) == 0.9
    r = OneShot(0.9, clock="round")
    assert r.clock == "round" and r.is_update(1) and r.is_update(4) and not r.is_update(0)


def test_geometric_equals_han_rounds():
    g = Geometric(0.875, 3)  # keep 0.125 = 0.5^3: halve the survivors every round
    assert [g(t) for t in (0, 1, 2, 3, 4)] == pytest.approx([0.0, 0.5, 0.75, 0.875, 0.875])
    assert g(3) == 0.875  # exact at the last round


def test_cosine_decay_is_rigl_drop_fraction():
    c = CosineDecay(0.3, end=750, every=100)
    assert c(0) == pytest.approx(0.3) and c(375) == pytest.approx(0.15) and c(750) == 0.0
    assert [t for t in range(1000) if c.is_update(t)] == [100, 200, 300, 400, 500, 600, 700]


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda: OneShot(1.5), r"sparsity in \[0, 1\], got 1.5"),
        (lambda: OneShot(0.5, at=-1), "at: expected an integer >= 0"),
        (lambda: OneShot(0.5, clock="epoch"), "clock"),
        (lambda: Geometric(0.5, 0), "rounds: expected an integer >= 1, got 0"),
        (lambda: Geometric(float("nan"), 2), r"sparsity in \[0, 1\]"),
        (lambda: Cubic(0.5, 10, 5), "end: expected an integer >= 11, got 5"),
        (lambda: CosineDecay(0.3, end=10, every=0), "every: expected an integer >= 1"),
    ],
)
def test_validation(make, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        make()


def test_equality_and_state():
    assert Cubic(0.9, 0, 100, 10) == Cubic(0.9, 0, 100, 10)
    assert Cubic(0.9, 0, 100, 10) != Cubic(0.9, 0, 100, 20)
    assert Geometric(0.9, 3).state_dict() == {"type": "Geometric", "sparsity": 0.9, "rounds": 3}
    assert repr(Geometric(0.9, 3)) == "Geometric(sparsity=0.9, rounds=3)"
