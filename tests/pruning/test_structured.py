"""Structured pruning with physical removal (sparsekern.pruning.structured).

The exactness tests zero, in the *original* model, every weight that reads a channel the plan
removes; removing those channels must then leave the outputs unchanged. A coupling mistake (a
residual add, cat or depthwise conv sliced inconsistently) breaks either the shapes or the
outputs, so these tests fail on it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from models.lenet import LeNet5, LeNet300100
from sparsekern.nn import sparsify
from sparsekern.pruning.structured import (
    StructuredPruner,
    channel_groups,
    count_macs,
    count_params,
    prune_channels,
    pruning_plan,
)


# ------------------------------------------------------------------------------------ models
class ResCatNet(nn.Module):
    """Residual adds, a concatenation, a depthwise conv, a grouped conv and flatten -> Linear:
    ``[B, 3, 8, 8] -> [B, 5]``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.a1 = nn.Conv2d(8, 6, 3, padding=1)
        self.a2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bdw = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(8, 6, 1)
        self.grp = nn.Conv2d(10, 10, 3, padding=1, groups=2)  # general grouped: excluded
        self.head = nn.Conv2d(10, 7, 1)
        self.fc1 = nn.Linear(7 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))  # [B, 8, 8, 8]
        x = x + self.bn2(self.a2(F.relu(self.a1(x))))  # residual: stem and a2 coupled
        x = x + F.relu(self.bdw(self.dw(x)))  # depthwise on the residual stream
        y = torch.cat([self.b(x), self.c(x)], dim=1)[:, :10]  # [B, 10]: slicing is not followed
        y = F.relu(self.head(self.grp(y)))  # [B, 7, 8, 8]
        y = F.max_pool2d(y, 2).flatten(1)  # [B, 112]
        return self.fc2(F.relu(self.fc1(y)))


class CatNet(nn.Module):
    """``cat`` feeding a conv, then adaptive pooling into the classifier."""

    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(3, 6, 3, padding=1)
        self.bnc = nn.BatchNorm2d(6)
        self.d = nn.Conv2d(10, 8, 3)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        y = torch.cat([F.relu(self.b(x)), F.relu(self.bnc(self.c(x)))], dim=1)
        return self.fc(torch.flatten(self.pool(F.relu(self.d(y))), 1))


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so BN slicing errors show."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


TV = {
    "resnet18": (lambda: torchvision.models.resnet18(), (1, 3, 64, 64)),
    "resnet50": (lambda: torchvision.models.resnet50(), (1, 3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), (1, 3, 64, 64)),
    "vgg16_bn": (lambda: torchvision.models.vgg16_bn(), (1, 3, 32, 32)),
    "alexnet": (lambda: torchvision.models.alexnet(), (1, 3, 64, 64)),
    "lenet5": (LeNet5, (1, 1, 28, 28)),
    "lenet300": (LeNet300100, (1, 1, 28, 28)),
    "rescat": (ResCatNet, (1, 3, 8, 8)),
    "cat": (CatNet, (1, 3, 8, 8)),
}


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    cache = {}

    def get(name):
        if name not in cache:
            build, shape = TV[name]
            cache[name] = (randomise_bn(build()), torch.randn(shape))
        return cache[name]

    return get


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, saved):
    now = model.state_dict()
    return set(now) == set(saved) and all(torch.equal(now[k], saved[k]) for k in saved)


def zero_readers(model: nn.Module, plan: dict) -> nn.Module:
    """A copy of ``model`` whose consumers' weights reading removed channels are zero (so those
    channels cannot influence anything any more)."""
    model = copy.deepcopy(model)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, keep in plan["in"].items():
            m = mods[name]
            if isinstance(m, nn.BatchNorm2d) or (isinstance(m, nn.Conv2d) and m.groups > 1):
                continue  # BN / depthwise pass channels on: their readers are zeroed instead
            m.weight[:, ~keep] = 0
    return model


# --------------------------------------------------------------------------------- coverage
@pytest.mark.parametrize("name", list(TV))
def test_coverage_shape_params_exact_at_zero(nets, name):
    model, x = nets(name)
    saved = state(model)
    with torch.no_grad():
        ref = model(x)
        same = prune_channels(model, (x,), 0.0)
        assert torch.equal(same(x), ref)
        small = prune_channels(model, (x,), 0.5)
        out = small(x)
    assert out.shape == ref.shape
    assert count_params(small) < 0.6 * count_params(model)
    assert count_macs(small, x) < count_macs(model, x)
    assert not any(hasattr(m, "mask") for m in small.modules())
    assert same_state(model, saved), "the input model must be untouched"
    # the result runs at another batch size too (only the flatten width was fixed)
    with torch.no_grad():
        assert small(torch.cat([x, x])).shape[0] == 2


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "lenet5", "rescat", "cat"])
def test_removed_channels_with_zero_readers_are_exact(nets, name):
    model, x = nets(name)
    plan = pruning_plan(model, (x,), 0.5, "random", seed=3)
    assert any(not bool(k.all()) for k in plan["out"].values()), "the plan must remove something"
    reference = zero_readers(model, plan)
    small = prune_channels(reference, (x,), 0.5, "random", seed=3)
    with torch.no_grad():
        torch.testing.assert_close(small(x), reference(x), rtol=1e-4, atol=1e-5)
    # and it did shrink every layer the plan touched, to the planned sizes
    mods = dict(small.named_modules())
    for n, keep in plan["out"].items():
        assert mods[n].weight.shape[0] == int(keep.sum())


def test_residual_coupling_shares_channel_sets(nets):
    model, x = nets("resnet18")
    groups = channel_groups(model, (x,))
    stream = [g for g in groups if "layer1.0.conv2" in g["producers"]]
    assert len(stream) == 1
    assert set(stream[0]["producers"]) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    assert "fc" not in {p for g in groups for p in g["producers"]}  # the classifier keeps all
    plan = pruning_plan(model, (x,), 0.5)
    keeps = [plan["out"][p] for p in stream[0]["producers"]]
    assert all(torch.equal(keeps[0], k) for k in keeps)
    assert int(keeps[0].sum()) == 32
    # the BN after each of them and the next block's input conv read the same channels
    for n in ("bn1", "layer1.0.bn2", "layer1.1.bn2"):
        assert torch.equal(plan["in"][n], keeps[0])
    assert torch.equal(plan["in"]["layer2.0.conv1"], keeps[0])
    assert torch.equal(plan["in"]["layer2.0.downsample.0"], keeps[0])


def test_concat_offsets_and_untraceable_ops_are_left_alone(nets):
    model, x = nets("rescat")
    plan = pruning_plan(model, (x,), 0.5)
    # b and c feed a slice (`[:, :10]`), which is not followed: they keep all outputs
    assert bool(plan["out"]["b"].all()) and bool(plan["out"]["c"].all())
    assert "grp" not in plan["out"] or bool(plan["out"]["grp"].all())  # grouped: excluded
    assert bool(plan["out"]["fc2"].all())  # the classifier
    # the depthwise conv follows the residual stream's channel set
    assert torch.equal(plan["in"]["dw"], plan["out"]["stem"])
    assert int(plan["out"]["stem"].sum()) == 4
    # head -> pool -> flatten -> fc1: each kept channel keeps its 4*4 consecutive features
    assert torch.equal(plan["in"]["fc1"], plan["out"]["head"].repeat_interleave(16))
    cat = CatNet()
    p2 = pruning_plan(cat, (torch.randn(1, 3, 8, 8),), 0.5)
    assert torch.equal(p2["in"]["d"], torch.cat([p2["out"]["b"], p2["out"]["c"]]))


def test_manual_subnetwork_reference():
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)
    )
    randomise_bn(net)
    with torch.no_grad():
        scale = torch.tensor([3.0, 0.1, 2.0, 0.2, 1.5, 0.3, 0.05, 4.0])
        net[0].weight.mul_(scale.view(8, 1, 1, 1) / net[0].weight.abs().sum((1, 2, 3), True))
    drop = [1, 3, 5, 6]  # the four smallest filter L1 norms
    keep = torch.tensor([i not in drop for i in range(8)])
    ref = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3)
    )
    with torch.no_grad():
        ref[0].weight.copy_(net[0].weight[keep])
        ref[0].bias.copy_(net[0].bias[keep])
        for a in ("weight", "bias", "running_mean", "running_var"):
            getattr(ref[1], a).copy_(getattr(net[1], a)[keep])
        ref[3].weight.copy_(net[3].weight[:, keep])
        ref[3].bias.copy_(net[3].bias)
    ref.eval()
    x = torch.randn(2, 3, 10, 10)
    small = prune_channels(net, x, 0.5, "l1")
    assert small[0].weight.shape == (4, 3, 3, 3) and small[3].weight.shape == (4, 4, 3, 3)
    with torch.no_grad():
        assert torch.equal(small(x), ref(x))
    # L2 picks the same here (one scale per filter); random (seeded) picks reproducibly
    a = prune_channels(net, x, 0.5, "random", seed=5)
    b = prune_channels(net, x, 0.5, "random", seed=5)
    assert torch.equal(a[0].weight, b[0].weight)


def test_per_layer_and_global_amounts(nets):
    model, x = nets("lenet5")
    small = prune_channels(model, x, {"conv2": 0.5})
    assert small.conv1.out_channels == 20 and small.conv2.out_channels == 25
    assert small.fc1.in_features == 25 * 16 and small.fc1.out_features == 500
    small = prune_channels(model, x, {"conv2": 0.5, "*": 0.2})
    assert small.conv1.out_channels == 16 and small.fc1.out_features == 400
    g = prune_channels(model, x, 0.6, global_pruning=True)
    kept = g.conv1.out_channels + g.conv2.out_channels + g.fc1.out_features
    assert kept == 570 - int(0.6 * 570)
    assert min(g.conv1.out_channels, g.conv2.out_channels, g.fc1.out_features) >= 1


def test_bad_input_raises_and_leaves_model_untouched(nets):
    model, x = nets("lenet5")
    saved = state(model)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"expected amount in \[0, 1\), got"):
            prune_channels(model, x, bad)
    with pytest.raises(ValueError, match="expected importance in"):
        prune_channels(model, x, 0.5, importance="l3")
    with pytest.raises(KeyError, match="unknown layer 'conv9'"):
        prune_channels(model, x, {"conv9": 0.5})
    with pytest.raises(ValueError, match="outputs reach the model output"):
        prune_channels(model, x, {"fc2": 0.5})
    with pytest.raises(ValueError, match="expected data"):
        prune_channels(model, x, 0.5, importance="taylor")
    assert same_state(model, saved)


def test_sparse_input_becomes_plain(nets):
    model, x = nets("lenet5")
    sp = sparsify(copy.deepcopy(model))
    with torch.no_grad():
        sp.conv2.mask[:10] = False
        sp.conv2.weight[:10] = 0
    small = prune_channels(sp, x, 0.0)
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in small.modules() if hasattr(m, "weight"))
    with torch.no_grad():
        torch.testing.assert_close(small(x), sp(x))
    # the masked-out filters have zero L1 norm: L1 removes exactly them
    small = prune_channels(sp, x, {"conv2": 0.2})
    with torch.no_grad():
        assert torch.equal(small.conv2.weight, sp.conv2.weight[10:])


def test_importances_pick_what_they_should(nets):
    model, x = nets("resnet18")
    # bn_scale: gammas zeroed on 8 channels of layer1's stream -> exactly those removed
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n in ("bn1", "layer1.0.bn2", "layer1.1.bn2"):
            m.get_submodule(n).weight[:8] = 0
    plan = pruning_plan(m, x, 0.125, "bn_scale")
    assert torch.equal(plan["out"]["conv1"], torch.arange(64) >= 8)
    # groups without BN fall back to L1: on LeNet-5 bn_scale equals l1
    lenet, xl = nets("lenet5")
    a, b = pruning_plan(lenet, xl, 0.5, "bn_scale"), pruning_plan(lenet, xl, 0.5, "l1")
    assert all(torch.equal(a["out"][k], b["out"][k]) for k in a["out"])
    # taylor: a channel nobody reads has g = 0 at its consumers: it goes first
    lenet = copy.deepcopy(lenet)
    with torch.no_grad():
        lenet.fc1.weight[:, 3 * 16 : 4 * 16] = 0  # conv2 channel 3's features
    data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    for imp in ("taylor", "taylor2"):
        plan = pruning_plan(lenet, xl, {"conv2": 0.02}, imp, data=data, loss_fn=F.cross_entropy)
        assert not plan["out"]["conv2"][3] and int(plan["out"]["conv2"].sum()) == 49


@pytest.mark.parametrize("name", ["resnet18", "lenet5"])
def test_torch_export_of_the_result(nets, name):
    model, x = nets(name)
    small = prune_channels(model, x, 0.5)
    ep = torch.export.export(small, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), small(x))


# ------------------------------------------------------------------------ StructuredPruner
def test_structured_pruner_masks_then_exports_the_same_function():
    torch.manual_seed(0)
    model = sparsify(randomise_bn(ResCatNet()))
    x = torch.randn(4, 3, 8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = StructuredPruner(model, opt, example_inputs=x, importance="bn_scale", bn_l1=1e-3)
    # slimming: the regulariser is bn_l1 * sum |gamma| over the prunable groups' BNs
    gam = sum(model.get_submodule(n).weight.abs().sum() for n in ("bn0", "bn2", "bdw"))
    torch.testing.assert_close(pruner.regularization_loss(), 1e-3 * gam)
    y = torch.randint(0, 5, (4,))
    model.train()
    loss = F.cross_entropy(model(x), y) + pruner.regularization_loss()
    opt.zero_grad()
    loss.backward()
    opt.step()
    pruner.step()
    pruner.prune(0.25)
    first = pruner.removed_channels()
    pruner.prune(0.5)
    second = pruner.removed_channels()
    assert all(set(first[k]) <= set(second[k]) for k in first), "rounds are cumulative"
    model.eval()
    small = pruner.export()
    assert count_params(small) < count_params(model)
    assert small.stem.out_channels == 4 and small.dw.groups == 4
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    # resume: the removed channels come back from the state dict
    p2 = StructuredPruner(model, None, example_inputs=x, importance="bn_scale", bn_l1=1e-3)
    p2.load_state_dict(pruner.state_dict())
    assert p2.removed_channels() == second


def test_structured_pruner_taylor_with_closure():
    torch.manual_seed(0)
    model = sparsify(LeNet5())
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    pruner = StructuredPruner(model, example_inputs=x[:1], sparsity=0.5, importance="taylor")
    pruner.prune(closure=lambda: F.cross_entropy(model(x), y))
    assert model.conv2.weight.grad is None  # scores come from autograd.grad
    small = pruner.export()
    assert small.conv1.out_channels == 10 and small.conv2.out_channels == 25
    assert small.fc1.out_features == 250 and small.fc2.out_features == 10
    with torch.no_grad():
        torch.testing.assert_close(small(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_train_mode_model_is_untouched_and_keeps_its_mode():
    torch.manual_seed(0)
    model = randomise_bn(ResCatNet()).train()
    saved = state(model)
    x = torch.randn(2, 3, 8, 8)
    data = [(x, torch.randint(0, 5, (2,)))]
    for imp in ("l2", "taylor", "bn_scale", "random"):
        small = prune_channels(model, x, 0.5, imp, data=data, loss_fn=F.cross_entropy)
        assert small.training and model.training
    assert same_state(model, saved), "no BatchNorm statistic may change"
    assert all(p.grad is None for p in model.parameters())
