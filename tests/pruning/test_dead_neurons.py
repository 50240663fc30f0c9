"""Dead-neuron removal: layers shrink, outputs stay the same (constant outputs folded)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern.pruning.dead_neurons as dn
from sparsekern.nn import set_mask, sparsify
from sparsekern.pruning import count_dead_neurons, remove_dead_neurons

D = torch.float64  # the reference path: exact and fast on CPU


class MLP(nn.Module):
    def __init__(self, bias2=True):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 4, bias=bias2)
        self.fc3 = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _prune(layer, *where, keep=()):
    """Prune ``mask[idx]`` for each idx in ``where``, then keep ``mask[idx]`` for idx in keep."""
    mask = layer.mask.clone()
    for idx in where:
        mask[idx] = False
    for idx in keep:
        mask[idx] = True
    set_mask(layer, mask)


def _mlp_with_dead(bias2=True):
    torch.manual_seed(0)
    model = sparsify(MLP(bias2)).to(D)
    with torch.no_grad():
        model.fc1.bias[1] = 0.7  # no inputs, relu(0.7) = 0.7 reaches fc2: fold it
        model.fc1.bias[3] = -0.7  # no inputs, relu(-0.7) = 0: nothing to fold
    _prune(model.fc1, [1, 3])
    _prune(model.fc2, (slice(None), 4), 2, keep=[(2, 1)])
    _prune(model.fc3, (slice(None), 0))
    # fc1: 1, 3 no inputs; 4 no outputs. fc2: 0 no outputs; 2 reads only fc1's neuron 1, so once
    # that one is gone it has no inputs either (a second pass).
    return model


def test_mlp_shrinks_and_keeps_outputs():
    model = _mlp_with_dead()
    x = torch.randn(32, 6, dtype=D)
    y = model(x)
    assert count_dead_neurons(model) == {
        "fc1": {"no_inputs": 2, "no_outputs": 1, "removable": 3},
        "fc2": {"no_inputs": 0, "no_outputs": 1, "removable": 1},
    }
    out, removed = remove_dead_neurons(model, example_input=x, return_removed=True)
    assert out is model
    assert removed == {"fc1": 3, "fc2": 2}
    assert model.fc1.weight.shape == (2, 6) and model.fc1.mask.shape == (2, 6)
    assert model.fc1.out_features == 2 and model.fc2.in_features == 2
    assert model.fc2.weight.shape == (2, 2) and model.fc2.bias.shape == (2,)
    assert model.fc3.weight.shape == (3, 2) and model.fc3.in_features == 2
    torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)
    assert remove_dead_neurons(model, return_removed=True)[1] == {"fc1": 0, "fc2": 0}


def test_no_bias_to_fold_into_keeps_the_neuron():
    model = _mlp_with_dead(bias2=False)
    x = torch.randn(16, 6, dtype=D)
    y = model(x)
    _, removed = remove_dead_neurons(model, return_removed=True)
    # fc1's neuron 1 (constant 0.7) cannot be folded into a bias-less fc2: it stays; 3 and 4 go
    assert removed["fc1"] == 2 and model.fc1.out_features == 3
    torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)


class ConvNet(nn.Module):
    """conv1(1->4, 3x3) -> maxpool 2 -> [relu] -> conv2(4->3, 3x3, padding) -> relu -> flatten
    -> fc(3*H*W -> 2). Input [B, 1, 10, 10]: 8x8 -> 4x4 -> 2x2 (padding 0) or 4x4 (padding 1)."""

    def __init__(self, padding=0, relu1=False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=padding)
        side = 4 if padding else 2
        self.fc = nn.Linear(3 * side * side, 2)
        self.relu1 = relu1

    def forward(self, x):
        x = self.pool(self.conv1(x))
        if self.relu1:
            x = torch.relu(x)
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def test_conv_chain_shrinks_and_keeps_outputs():
    torch.manual_seed(0)
    model = sparsify(ConvNet()).to(D)
    with torch.no_grad():
        model.conv1.bias[1] = 0.3
        model.conv2.bias[1] = 0.5
    _prune(model.conv1, 1)  # channel 1: constant 0.3 into conv2
    _prune(model.conv2, (slice(None), 2), 1)  # conv1 ch 2 unread; conv2 ch 1 input-less
    _prune(model.fc, (slice(None), slice(0, 4)))  # conv2 channel 0: its 2x2 block unread
    x = torch.randn(8, 1, 10, 10, dtype=D)
    y = model(x)
    _, removed = remove_dead_neurons(model, example_input=x, return_removed=True)
    assert removed == {"conv1": 2, "conv2": 2}
    assert model.conv1.weight.shape == (2, 1, 3, 3) and model.conv1.out_channels == 2
    assert model.conv2.weight.shape == (1, 2, 3, 3) and model.conv2.in_channels == 2
    assert model.conv2.out_channels == 1
    assert model.fc.weight.shape == (2, 4) and model.fc.in_features == 4
    torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)


def test_zero_padding_blocks_folding_unless_constant_is_zero():
    torch.manual_seed(0)
    model = sparsify(ConvNet(padding=1, relu1=True)).to(D)
    with torch.no_grad():
        model.conv1.bias[1] = 0.3  # relu -> 0.3: padded borders would see less, cannot fold
        model.conv1.bias[3] = -0.3  # relu -> 0: nothing to fold, removable
    _prune(model.conv1, [1, 3])
    x = torch.randn(4, 1, 10, 10, dtype=D)
    y = model(x)
    _, removed = remove_dead_neurons(model, example_input=x, return_removed=True)
    assert removed["conv1"] == 1 and model.conv1.out_channels == 3
    torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)


def test_fully_pruned_layer_keeps_one_neuron():
    torch.manual_seed(0)
    model = sparsify(MLP()).to(D)
    _prune(model.fc2, ...)  # fc2 reads nothing: every fc1 neuron unread
    x = torch.randn(8, 6, dtype=D)
    y = model(x)
    _, removed = remove_dead_neurons(model, example_input=x, return_removed=True)
    assert model.fc1.out_features == 1 and removed["fc1"] == 4
    torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)


def test_mismatch_is_detected_and_rolled_back(monkeypatch):
    model = _mlp_with_dead()
    x = torch.randn(8, 6, dtype=D)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(
        dn, "_constants", lambda a, chain, idx: torch.full((len(idx),), 5.0, dtype=D)
    )
    with pytest.raises(RuntimeError, match="restored"):
        remove_dead_neurons(model, example_input=x)
    assert model.fc1.out_features == 5
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


class Untraceable(MLP):
    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return super().forward(x)


def test_untraceable_model_is_refused():
    with pytest.raises(ValueError, match="fx"):
        remove_dead_neurons(sparsify(Untraceable()))
    with pytest.raises(ValueError, match="sparsify"):
        remove_dead_neurons(MLP())


class Shared(nn.Module):
    """fc2 is applied twice: it cannot shrink for one of its uses."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.fc3 = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return self.fc3(torch.relu(self.fc2(x)))


def test_shared_layer_is_not_touched():
    model = sparsify(Shared()).to(D)
    _prune(model.fc2, (slice(None), 0))  # fc1's neuron 0 unread, but fc2 is shared
    assert count_dead_neurons(model) == {}
    _, removed = remove_dead_neurons(model, return_removed=True)
    assert removed == {} and model.fc1.out_features == 4
