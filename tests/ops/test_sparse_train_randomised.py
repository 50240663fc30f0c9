"""200 training steps with RigL updates and Han rounds on the sparse path: the weights match the
same training on the dense (vendor) path within tolerance, and the mask invariant holds."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from torch import nn

from sparsekern.nn import execution_plan, set_mask, sparsify
from sparsekern.pruning import HanPruner, RigLPruner

# the module (sparsekern.nn.execution_plan the name is the function)
plan_module = importlib.import_module("sparsekern.nn.execution_plan")


@contextlib.contextmanager
def forced(path: str):
    """Every SparseLinear's plan says ``path`` ("sparse" or "masked") inside the block."""
    original = plan_module.sparse_pays
    plan_module.sparse_pays = lambda *a, **k: (path == "sparse", f"forced {path} (test)")
    try:
        yield
    finally:
        plan_module.sparse_pays = original


def _model(seed):
    torch.manual_seed(seed)
    return sparsify(nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10)))


@pytest.fixture
def one_thread():
    # Tiny layers: a second thread only adds barrier waits (seconds on a loaded 2-core CI box).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("seed", [0])
def test_200_steps_rigl_and_han_sparse_matches_dense(seed, monkeypatch, one_thread):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    models = {"sparse": _model(seed), "masked": _model(seed)}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for k, m in models.items()}
    g = torch.Generator().manual_seed(100 + seed)
    xs = torch.randn(200, 24, 96, generator=g)
    ys = torch.randint(0, 10, (200, 24), generator=g)
    rigl = RigLPruner(
        models["sparse"], opts["sparse"], sparsity=0.9, total_steps=120, delta=20,
        distribution="uniform", generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    han = HanPruner(models["sparse"], opts["sparse"], regularization="none", dropout=False)
    loss_fn = nn.CrossEntropyLoss()

    def mirror():  # the dense twin trains under the very same masks
        for a, b in zip(models["sparse"].modules(), models["masked"].modules()):
            if hasattr(a, "mask"):
                set_mask(b, a.mask.clone(), opts["masked"])

    with forced("sparse"):
        rigl.prune()
    mirror()
    for step in range(200):
        x, y = xs[step], ys[step]
        for path, model in models.items():
            with forced(path):
                opts[path].zero_grad()
                loss_fn(model(x), y).backward()
                opts[path].step()
        with forced("sparse"):  # the pruners run on the sparse path's model
            assert execution_plan(models["sparse"])[0].path == "sparse"
            if step < 120:
                updated = rigl.step(lambda x=x, y=y: loss_fn(models["sparse"](x), y))
            else:
                updated = step in (140, 170)
                if updated:
                    han.prune(sparsity=0.92 if step == 140 else 0.95)
        if updated:
            mirror()
    for a, b in zip(models["sparse"].parameters(), models["masked"].parameters()):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-3)
    for m in (models["sparse"][0], models["sparse"][2]):
        assert bool((m.weight[~m.mask] == 0).all())
    assert rigl.last_update is not None and models["sparse"][0].density < 0.1
