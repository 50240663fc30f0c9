"""The mask invariant: after set_mask / apply_masks, pruned weights stay EXACTLY zero through
training with SGD (momentum, weight decay), Adam and AdamW, across pruning further and regrowing."""

import pytest
import torch
from torch import nn

from sparsekern.nn import (
    SparseConv2d,
    SparseLinear,
    apply_masks,
    set_mask,
    sparse_modules,
    zero_optimizer_state,
)


@pytest.fixture
def small_cpu_loop(device, monkeypatch):
    """Long loops of tiny ops on CPU: run the ops' plain-PyTorch path, not the Triton interpreter
    (too slow for hundreds of steps; `test_invariant_through_kernels_short` keeps the kernels in the
    loop, and on CUDA they run everywhere), on one thread (for ops this small, handing work to a
    second OpenMP thread costs more than it saves, dozens of times more on a busy machine)."""
    if device.type != "cpu":
        yield
        return
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Net(nn.Module):
    def __init__(self, device):
        super().__init__()
        self.conv = SparseConv2d(2, 4, 3, padding=1, device=device)
        self.fc1 = SparseLinear(4 * 5 * 5, 16, device=device)
        self.fc2 = SparseLinear(16, 3, device=device)

    def forward(self, x):  # [N, 2, 5, 5] -> [N, 3]
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def train(model, opt, data, steps, check=None):
    x, y = data
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if check is not None:
            check()


def state_tensors(opt, param):
    return {k: v for k, v in opt.state[param].items() if v.shape == param.shape}


def assert_invariant(model, opt):
    for name, m in sparse_modules(model):
        pruned = ~m.mask
        assert bool((m.weight[pruned] == 0).all()), f"{name}: a pruned weight moved off 0"
        if m.weight.grad is not None:
            assert bool((m.weight.grad[pruned] == 0).all()), f"{name}: nonzero grad when pruned"
        for key, value in state_tensors(opt, m.weight).items():
            assert bool((value[pruned] == 0).all()), f"{name}: optimizer {key} nonzero when pruned"


def masks_from(model, make):
    return {name: make(m) for name, m in sparse_modules(model)}


def run_prune_prune_regrow(device, make_opt, steps):
    model = Net(device)
    opt = make_opt(model.parameters())
    data = (torch.randn(32, 2, 5, 5, device=device), torch.randint(0, 3, (32,), device=device))
    train(model, opt, data, steps)  # dense warm-up: optimizer state is nonzero everywhere
    check = lambda: assert_invariant(model, opt)

    # 1. prune half
    first = masks_from(model, lambda m: torch.rand(m.weight.shape, device=device) < 0.5)
    apply_masks(model, first, optimizer=opt)
    check()
    train(model, opt, data, steps, check)

    # 2. prune more: a subset of the kept weights
    second = {n: mask & (torch.rand(mask.shape, device=device) < 0.6) for n, mask in first.items()}
    apply_masks(model, second, optimizer=opt)
    check()
    train(model, opt, data, steps, check)

    # 3. regrow some pruned entries (and prune a few kept ones), RigL-style
    third, regrown = {}, {}
    for name, mask in second.items():
        grow = ~mask & (torch.rand(mask.shape, device=device) < 0.3)
        drop = mask & (torch.rand(mask.shape, device=device) < 0.1)
        third[name], regrown[name] = (mask | grow) & ~drop, grow & ~drop
    apply_masks(model, third, optimizer=opt)
    check()
    modules = dict(model.named_modules())
    for name, grow in regrown.items():
        w = modules[name].weight
        assert bool(grow.any())
        assert bool((w[grow] == 0).all()), "a regrown weight must start at 0"
        for key, value in state_tensors(opt, w).items():
            assert bool((value[grow] == 0).all()), f"regrown {key} must start at 0"
    train(model, opt, data, steps, check)
    # the regrown weights do train
    assert any(bool((modules[n].weight[g] != 0).any()) for n, g in regrown.items())
    return model


@pytest.mark.usefixtures("small_cpu_loop")
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_invariant_over_hundreds_of_steps(device, opt_name):
    # 4 phases x 80 steps = 320 optimizer steps
    run_prune_prune_regrow(device, OPTIMIZERS[opt_name], steps=80)


def test_invariant_through_kernels_short(device):
    """The same sequence, a few steps per phase, with the ops as the tests run them (Triton
    kernels, through the interpreter on CPU): their weight gradients must be exactly 0 too."""
    run_prune_prune_regrow(device, OPTIMIZERS["adamw"], steps=2)


@pytest.mark.usefixtures("small_cpu_loop")
def test_without_optimizer_momentum_moves_pruned_weights(device):
    """Why set_mask takes the optimizer: stale momentum drags pruned weights off zero."""
    layer = SparseLinear(8, 4, device=device)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 8, device=device)
    for _ in range(3):
        opt.zero_grad()
        layer(x).pow(2).sum().backward()
        opt.step()
    mask = torch.rand(layer.weight.shape, device=device) < 0.5
    layer.set_mask(mask)  # optimizer not given
    opt.zero_grad()
    layer(x).pow(2).sum().backward()
    opt.step()
    assert bool((layer.weight[~mask] != 0).any())


def test_set_mask_in_place_zeroes_weight_grad_and_state(device):
    layer = SparseLinear(6, 5, device=device)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1, amsgrad=True)
    layer(torch.randn(3, 6, device=device)).sum().backward()
    opt.step()
    buffer, step = layer.mask, opt.state[layer.weight]["step"].clone()
    mask = torch.rand(layer.weight.shape, device=device) < 0.5

    layer.set_mask(mask, optimizer=opt)  # the method delegates to set_mask
    assert layer.mask is buffer and torch.equal(layer.mask, mask)
    assert layer.density == pytest.approx(mask.float().mean().item())
    assert bool((layer.weight[~mask] == 0).all()) and bool((layer.weight[mask] != 0).all())
    assert bool((layer.weight.grad[~mask] == 0).all())
    state = opt.state[layer.weight]
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert bool((state[key][~mask] == 0).all()) and bool((state[key][mask] != 0).all()), key
    assert torch.equal(state["step"], step)  # scalars untouched
    assert bool((opt.state[layer.bias]["exp_avg"] != 0).all())  # other parameters untouched

    mask[:] = True  # the module keeps its own copy
    assert not bool(layer.mask.all())


def test_zero_optimizer_state(device):
    w = nn.Parameter(torch.randn(3, 4, device=device))
    sgd = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    where = torch.zeros(3, 4, dtype=torch.bool, device=device)
    where[0] = True
    assert zero_optimizer_state(sgd, w, where) == []  # no state yet: nothing to do
    assert w not in sgd.state
    w.grad = torch.ones_like(w)
    sgd.step()
    assert zero_optimizer_state(sgd, w, where) == ["momentum_buffer"]
    buf = sgd.state[w]["momentum_buffer"]
    assert bool((buf[0] == 0).all()) and bool((buf[1:] != 0).all())

    adam = torch.optim.Adam([w], amsgrad=True)
    adam.step()
    assert zero_optimizer_state(adam, w, where) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    with pytest.raises(ValueError, match=r"expected the weight's shape \[3, 4\], got \[4, 3\]"):
        zero_optimizer_state(adam, w, where.T)


def snapshot(model, opt=None):
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        if p.grad is not None:
            snap[name + ".grad"] = p.grad.clone()
        if opt is not None:
            for key, value in opt.state.get(p, {}).items():
                snap[f"{name}.{key}"] = value.clone()
    return snap


def assert_unchanged(before, after):
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (lambda m: m.float(), TypeError, r"expected dtype torch.bool, got torch.float32"),
        (lambda m: m.T, ValueError, r"expected the weight's shape \[5, 6\], got \[6, 5\]"),
        (lambda m: m[:, :3], ValueError, r"expected the weight's shape \[5, 6\], got \[5, 3\]"),
        (lambda m: m.to("meta"), ValueError, r"expected the weight's device .*, got meta"),
        (lambda m: m.tolist(), TypeError, r"expected a torch.bool Tensor, got list"),
    ],
)
def test_set_mask_rejects_bad_masks_and_changes_nothing(device, bad, error, message):
    layer = SparseLinear(6, 5, device=device)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.randn(2, 6, device=device)).sum().backward()
    opt.step()
    layer.set_mask(torch.rand(5, 6, device=device) < 0.5, optimizer=opt)
    before = snapshot(layer, opt)
    good = torch.rand(5, 6, device=device) < 0.5
    with pytest.raises(error, match=message):
        set_mask(layer, bad(good), optimizer=opt)
    with pytest.raises(error, match=message):
        layer.set_mask(bad(good), optimizer=opt)
    assert_unchanged(before, snapshot(layer, opt))


def test_set_mask_rejects_dense_modules():
    with pytest.raises(TypeError, match=r"expected a sparse module .*, got Linear"):
        set_mask(nn.Linear(2, 2), torch.ones(2, 2, dtype=torch.bool))


def test_apply_masks_is_all_or_nothing(device):
    model = Net(device)
    before = snapshot(model)
    ok = torch.rand(model.fc2.weight.shape, device=device) < 0.5
    conv_shape = list(model.conv.weight.shape)

    bad_shape = {"fc2": ok, "conv": torch.ones(3, 3, dtype=torch.bool, device=device)}
    with pytest.raises(ValueError, match=rf"'conv'.*shape \[{', '.join(map(str, conv_shape))}\]"):
        apply_masks(model, bad_shape)
    with pytest.raises(KeyError, match=r"got 'fc3' \(sparse modules: \['conv', 'fc1', 'fc2'\]\)"):
        apply_masks(model, {"fc2": ok, "fc3": ok})
    with pytest.raises(TypeError, match=r"apply_masks\[''\]: expected a sparse module .*got Net"):
        apply_masks(model, {"fc2": ok, "": ok})
    assert_unchanged(before, snapshot(model))

    apply_masks(model, {"fc2": ok})
    assert torch.equal(model.fc2.mask, ok) and bool(model.fc1.mask.all())
