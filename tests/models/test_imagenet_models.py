"""models/alexnet.py, models/vgg.py: sizes of the real nets (on the meta device: no memory, no
time), the Caffe AlexNet's structure, smallest inputs, the tiny widths, local weight loading."""

import pytest
import torch
import torchvision
from torch import nn

from models import (
    IMAGENET_MODELS,
    CaffeAlexNet,
    build_imagenet_model,
    count_weights,
    load_weights,
    paper_layer_names,
)
from sparsekern.nn import SparseConv2d, SparseLinear, sparse_modules


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    # These tests are about the models, not the kernels (tested in test_masked_*.py): the sparse
    # layers take the plain-PyTorch CPU path, not Triton's interpreter (~100x slower here).
    monkeypatch.setenv("TRITON_INTERPRET", "0")


# (weights, parameters) of the full-size nets; Han's Table 1: AlexNet 61M, VGG-16 138M
SIZES = {
    "alexnet": (61_090_496, 61_100_840),
    "alexnet-caffe": (60_954_656, 60_965_224),
    "vgg16": (138_344_128, 138_357_544),
}


@pytest.mark.parametrize("name", sorted(IMAGENET_MODELS))
def test_full_size_counts_and_output_shape(name):
    with torch.device("meta"):
        model = build_imagenet_model(name, sparse=False)
        res = IMAGENET_MODELS[name][3]
        y = model(torch.empty(2, 3, res, res))
    w, b = count_weights(model)
    assert (w, w + b) == SIZES[name]
    assert y.shape == (2, 1000)


@pytest.mark.parametrize(
    "name, ctor", [("alexnet", torchvision.models.alexnet), ("vgg16", torchvision.models.vgg16)]
)
def test_width_one_is_torchvision(name, ctor):
    with torch.device("meta"):
        ours = build_imagenet_model(name, num_classes=10, sparse=False)
        ref = ctor(weights=None, num_classes=10)
    assert type(ours) is type(ref)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }


def test_caffe_alexnet_structure():
    with torch.device("meta"):
        m = CaffeAlexNet()
        feats = {}

        def hook(name):
            def fn(module, inputs, output):
                feats[name] = output.shape

            return fn

        hooks = [
            getattr(m, n).register_forward_hook(hook(n)) for n in ("conv1", "conv2", "avgpool")
        ]
        m(torch.empty(1, 3, 227, 227))
    for h in hooks:
        h.remove()
    convs = [m.conv1, m.conv2, m.conv3, m.conv4, m.conv5]
    assert [c.out_channels for c in convs] == [96, 256, 384, 384, 256]
    assert [c.groups for c in convs] == [1, 2, 1, 2, 2]
    assert (m.conv1.kernel_size, m.conv1.stride, m.conv1.padding) == ((11, 11), (4, 4), (0, 0))
    assert isinstance(m.norm1, nn.LocalResponseNorm) and m.norm1.size == 5
    assert feats["conv1"] == (1, 96, 55, 55)
    assert feats["conv2"] == (1, 256, 27, 27)
    assert feats["avgpool"] == (1, 256, 6, 6)  # the identity at 227: fc6 sees Caffe's 9216
    # Han's Table 4 weights per layer
    assert [c.weight.numel() for c in convs] == [34_848, 307_200, 884_736, 663_552, 442_368]
    assert [f.weight.numel() for f in (m.fc6, m.fc7, m.fc8)] == [37_748_736, 16_777_216, 4_096_000]


@pytest.mark.parametrize("name", sorted(IMAGENET_MODELS))
def test_smallest_input_and_tiny_width(name):
    lo = IMAGENET_MODELS[name][2]
    tiny = build_imagenet_model(name, num_classes=4, width=1 / 16)
    with torch.no_grad():
        assert tiny(torch.randn(2, 3, lo, lo)).shape == (2, 4)
        with pytest.raises(RuntimeError):
            tiny(torch.randn(2, 3, lo - 1, lo - 1))
    with torch.device("meta"):
        full = build_imagenet_model(name, num_classes=4)
    # same module names and kinds, smaller tensors: the tiny config exercises the real layout
    assert list(tiny.state_dict()) == list(full.state_dict())
    assert count_weights(tiny)[0] < count_weights(full)[0] / 100
    layers = dict(sparse_modules(tiny))
    assert len(layers) == len(IMAGENET_MODELS[name][1])
    assert all(isinstance(m, (SparseLinear, SparseConv2d)) for m in layers.values())
    names = paper_layer_names(name, tiny)
    assert list(names) == IMAGENET_MODELS[name][1]
    assert list(names.values()) == list(layers)
    assert names["fc8"] == list(layers)[-1]


def test_sparse_equals_dense():
    dense = build_imagenet_model("alexnet-caffe", num_classes=5, width=1 / 8, sparse=False)
    sparse = build_imagenet_model("alexnet-caffe", num_classes=5, width=1 / 8, sparse=True)
    sparse.load_state_dict(dense.state_dict(), strict=False)  # masks stay all True
    dense.eval(), sparse.eval()
    x = torch.randn(2, 3, 72, 72)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-6)


def test_load_weights_from_local_file(tmp_path):
    src = build_imagenet_model("vgg16", num_classes=3, width=1 / 16, sparse=False)
    path = tmp_path / "vgg_tiny.pth"
    torch.save(src.state_dict(), path)
    got = build_imagenet_model("vgg16", num_classes=3, width=1 / 16, weights=path)
    for k, v in src.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    assert all(bool(m.mask.all()) for _, m in sparse_modules(got))

    # another architecture's file: a clear error naming what does not fit
    with pytest.raises(ValueError, match="do not fit.*missing.*features.0.weight"):
        build_imagenet_model("alexnet-caffe", num_classes=3, width=1 / 16, weights=path)
    # another class count: shapes named
    with pytest.raises(ValueError, match=r"classifier.6.weight: expected \(5, 256\), got \(3,"):
        build_imagenet_model("vgg16", num_classes=5, width=1 / 16, weights=path)
    # a truncated file
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read weights"):
        load_weights(build_imagenet_model("vgg16", 3, 1 / 16), bad)
    # a pickle that would run code / build arbitrary objects: refused by weights_only=True
    evil = tmp_path / "evil.pth"
    torch.save({"model": nn.Linear(2, 2)}, evil)
    with pytest.raises(ValueError, match="cannot read weights"):
        load_weights(build_imagenet_model("vgg16", 3, 1 / 16), evil)
