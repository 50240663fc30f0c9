"""Global pruning must not silently empty whole layers (layer collapse): at random
initialisation, global magnitude ranking at 90% emptied 11 of mobilenet_v2's 53 layers (the
issue saw 15), after which the output no longer depends on the input. The global pruners floor
every layer by default (``min_density=None``) and warn when a layer is left with nothing."""

import warnings

import pytest
import torch
from torch import nn

from sparsekern import sparsify
from sparsekern.pruning import (
    AUTO_MIN_DENSITY,
    GlobalMagnitudePruner,
    GradualPruner,
    global_magnitude_masks,
    prune_blocks_,
    snip_masks,
)

torchvision = pytest.importorskip("torchvision")


def _empty(pruner):
    return [n for n, m in pruner.layers.items() if not bool(m.mask.any())]


@pytest.fixture(scope="module")
def mobilenet_state():
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(num_classes=10).state_dict()


def _mobilenet(state):
    m = torchvision.models.mobilenet_v2(num_classes=10)
    m.load_state_dict(state)
    return sparsify(m).eval()


def test_default_floor_keeps_every_layer_alive(mobilenet_state):
    model = _mobilenet(mobilenet_state)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no collapse warning either
        pruner = GlobalMagnitudePruner(model, sparsity=0.9)
        pruner.prune()
    assert _empty(pruner) == []
    assert pruner.current_sparsity() == pytest.approx(0.9, abs=1e-6)
    for n, m in pruner.layers.items():
        floor = min(AUTO_MIN_DENSITY, 0.05)
        assert int(m.mask.count_nonzero()) >= floor * m.mask.numel() - 1, n
    # the output still depends on the input
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model(x)[0], model(x)[1])


def test_no_floor_warns_and_names_the_layers(mobilenet_state):
    model = _mobilenet(mobilenet_state)
    pruner = GlobalMagnitudePruner(model, sparsity=0.9, min_density=0.0)
    with pytest.warns(RuntimeWarning, match=r"layers keep no weight \(layer collapse") as rec:
        pruner.prune()
    empty = _empty(pruner)
    assert empty  # this model does collapse without a floor
    msg = str(rec[0].message)
    assert f"{len(empty)} of {len(pruner.layers)} layers" in msg and empty[0] in msg
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # what the warning is about: the input no longer reaches the output
        assert torch.equal(model(x)[0], model(x)[1])


def test_auto_floor_falls_back_when_floors_do_not_fit():
    # 40 layers of 4 weights at 99% sparsity: a 1-weight floor each (40) exceeds the target (2)
    model = sparsify(nn.Sequential(*[nn.Linear(2, 2, bias=False) for _ in range(40)]))
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "mask")}
    with pytest.warns(RuntimeWarning, match="layer collapse"):
        masks = global_magnitude_masks(layers, 0.99, None)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.01 * 160)


def test_gradual_global_floors_by_default(mobilenet_state):
    model = _mobilenet(mobilenet_state)
    pruner = GradualPruner(model, sparsity=0.9, begin_step=0, end_step=1, frequency=1,
                           scope="global")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        pruner.prune(0.9)
    assert _empty(pruner) == []


def test_snip_masks_warn_on_collapse():
    # SNIP's global top-kappa (kept as in the paper, no floor): a layer whose |g * w| sits below
    # every other layer's gets nothing, and that is said
    scores = {"a": torch.rand(16, 16) * 1e-9, "b": torch.rand(16, 16) + 1.0}
    with pytest.warns(RuntimeWarning, match=r"1 of 2 layers keep no weight .*: a;"):
        masks = snip_masks(scores, 0.25)
    assert not masks["a"].any() and int(masks["b"].sum()) == 128


def test_prune_blocks_refuses_density_none():
    model = sparsify(nn.Sequential(nn.Linear(64, 64)))
    before = model[0].mask.clone()
    with pytest.raises(TypeError, match=r"expected density a number .* got None"):
        prune_blocks_(model, None, block_size=(16, 16))
    assert torch.equal(model[0].mask, before)
