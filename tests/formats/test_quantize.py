"""Trained quantisation (Deep Compression Sec. 3): k-means with linear initialisation over kept
weights, centroids fine-tuned by the summed gradients of their members."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.formats.quantize import QuantizedWeights, kmeans_1d, layer_codebook
from sparsekern.nn import set_mask, sparsify


def test_kmeans_linear_init_and_lloyd_fixed_point():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, generator=g) * 0.05 + c for c in (-2.0, 0.5, 3.0)])
    c, labels = kmeans_1d(x, 3)
    assert torch.allclose(c, torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64), atol=0.02)
    # a fixed point of Lloyd: each value's label is its nearest centroid, each centroid its mean
    x64 = x.double()
    assert torch.equal(labels, (x64[:, None] - c[None]).abs().argmin(1))
    for j in range(3):
        assert torch.allclose(c[j], x64[labels == j].mean())
    # linear initialisation: evenly spaced between min and max (one iteration shows it)
    c1, _ = kmeans_1d(torch.tensor([0.0, 1.0, 10.0]), 3, iters=0)
    assert torch.equal(c1, torch.tensor([0.0, 5.0, 10.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="init='linear'"):
        kmeans_1d(x, 3, init="random")
    with pytest.raises(ValueError, match="finite"):
        kmeans_1d(torch.tensor([1.0, float("nan")]), 2)


def test_layer_codebook_is_exact_for_few_values():
    v = torch.tensor([0.5, -0.0, 0.5, 2.0, -1.0])
    book, labels = layer_codebook(v, 2)  # 3 entries allowed, 4 distinct bit patterns: k-means
    assert book.numel() == 3 and labels.max() < 3
    book, labels = layer_codebook(v, 3)  # 7 allowed: the values themselves, -0.0 kept
    assert torch.equal(book[labels].view(torch.int32), v.view(torch.int32))


def _net(seed=0):
    torch.manual_seed(seed)
    net = sparsify(nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)))
    g = torch.Generator().manual_seed(seed)
    for layer, d in ((net[0], 0.6), (net[2], 0.3)):
        set_mask(layer, torch.rand(layer.weight.shape, generator=g) < d)
    return net


def test_quantized_weights_share_values_and_keep_zeros():
    net = _net()
    masks = [net[0].mask.clone(), net[2].mask.clone()]
    before = net[2].weight.detach().clone()
    qw = QuantizedWeights(net, bits={"fc": 3, "conv": 4})
    assert qw.bits == {"0": 4, "2": 3}
    for layer, mask, k in ((net[0], masks[0], 15), (net[2], masks[1], 7)):
        kept = layer.weight.detach()[mask]
        assert torch.unique(kept).numel() <= k
        assert (layer.weight.detach()[~mask] == 0).all() and torch.equal(layer.mask, mask)
    # k-means: every kept weight went to its nearest centroid
    c = qw.centroids["2"].detach()
    nearest = (before[masks[1]][:, None] - c[None]).abs().argmin(1)
    assert torch.equal(c[nearest], net[2].weight.detach()[masks[1]])
    qw.check()
    with torch.no_grad():
        net[2].weight[masks[1]] += 1e-3
    with pytest.raises(ValueError, match=r"layer '2'.*differ"):
        qw.check()


def test_centroid_update_is_lr_times_summed_member_gradients():
    net = _net(1)
    qw = QuantizedWeights(net)  # 5 bits FC, 8 conv: here every conv weight is its own value
    x, y = torch.randn(6, 2, 6, 6), torch.randint(0, 5, (6,))
    F.cross_entropy(net(x), y).backward()
    lr = 0.07
    for name, layer in qw.layers.items():
        g = layer.weight.grad[layer.mask]
        want = qw.centroids[name].detach().clone()
        for j in range(want.numel()):
            want[j] -= lr * g[qw.labels[name] == j].sum()
        qw.expected = getattr(qw, "expected", {}) | {name: want}
    qw.step(lr)
    for name, layer in qw.layers.items():
        assert torch.allclose(qw.centroids[name].detach(), qw.expected[name], atol=1e-7), name
        assert torch.equal(layer.weight.detach()[layer.mask],
                           qw.centroids[name].detach()[qw.labels[name]])  # fmt: skip
        assert (layer.weight.detach()[~layer.mask] == 0).all()
    with pytest.raises(ValueError, match="finite lr"):
        qw.step(float("nan"))


def test_fine_tuning_centroids_lowers_the_loss():
    net = _net(2)
    x = torch.randn(64, 2, 6, 6)
    with torch.no_grad():
        y = net(x).argmax(1)  # the unquantised net's answers: quantising costs, tuning recovers
    qw = QuantizedWeights(net, bits={"fc": 2, "conv": 2})
    opt = torch.optim.SGD(qw.parameters(), lr=0.1)  # any optimizer over the centroids
    first = None
    for _ in range(8):
        net.zero_grad()
        loss = F.cross_entropy(net(x), y)
        first = float(loss.detach()) if first is None else first
        loss.backward()
        qw.gather_grads()
        opt.step()
        qw.write()
    assert float(F.cross_entropy(net(x), y).detach()) < first - 0.05
    qw.check()


def test_needs_sparse_layers():
    with pytest.raises(ValueError, match="expected a model with sparse layers"):
        QuantizedWeights(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="'fc' / 'conv'"):
        QuantizedWeights(_net(), bits={"linear": 4})
