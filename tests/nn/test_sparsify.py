"""sparsify / sparse_modules: every targeted layer swapped in place, weights kept, outputs equal."""

import pytest
import torch
import torchvision
from torch import nn

from sparsekern.nn import (
    SparseConv2d,
    SparseLinear,
    SparseMultiheadAttention,
    sparse_modules,
    sparsify,
)


@pytest.fixture
def reference_ops_on_cpu(device, monkeypatch):
    """Big models on CPU: run the ops' plain-PyTorch path instead of the Triton interpreter (which
    would take minutes on a 25088 x 4096 GEMM). The kernels have their own tests; these tests are
    about the module swap. On CUDA, SparseConv2d runs the Triton kernels and nn.Conv2d cuDNN:
    compare in true fp32 (cuDNN's default TF32 is off by ~1e-3)."""
    if device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    else:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        shared = nn.Linear(8, 8)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(2, 2, 1))
        self.blocks = nn.ModuleList([shared, nn.Sequential(nn.Linear(8, 8), nn.Tanh()), shared])
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 3), "b": nn.Identity()})
        self.attn = nn.MultiheadAttention(8, 2)  # its out_proj is a Linear subclass

    def forward(self, img, vec):
        y = self.features[1](self.features[0](img)).mean()
        for block in self.blocks:
            vec = block(vec)
        vec, _ = self.attn(vec, vec, vec)
        return self.heads["a"](vec) + y


def dense_types(model):
    return [name for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]


def test_sparsify_toy_model_in_place():
    model = Toy().eval()
    img, vec = torch.randn(2, 3, 5, 5), torch.randn(4, 8)
    expected = model(img, vec)
    params = list(model.parameters())

    assert sparsify(model) is model
    assert dense_types(model) == []
    assert isinstance(model.features[0], SparseConv2d)
    assert type(model.features[2]) is nn.Conv1d  # not a target
    assert isinstance(model.blocks[1][0], SparseLinear)
    assert isinstance(model.heads["a"], SparseLinear)
    assert model.blocks[0] is model.blocks[2]  # shared stays shared
    assert isinstance(model.attn, SparseMultiheadAttention)  # in_proj and out_proj masked
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))  # same Parameters
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(model(img, vec), expected)

    names = [name for name, _ in sparse_modules(model)]
    assert names == [
        "features.0",
        "blocks.0",
        "blocks.1.0",
        "heads.a",
        "attn.out_proj",
        "attn.in_proj",
    ]


def test_sparsify_selected_layers_and_idempotence():
    model = Toy()
    sparsify(model, layers=(nn.Linear,))
    assert isinstance(model.features[0], nn.Conv2d)
    assert not isinstance(model.features[0], SparseConv2d)
    assert isinstance(model.heads["a"], SparseLinear)

    head = model.heads["a"]
    head.set_mask(torch.rand(head.weight.shape) < 0.5)
    mask = head.mask.clone()
    sparsify(model, layers=nn.Conv2d)  # a single type is accepted too
    assert isinstance(model.features[0], SparseConv2d)
    sparsify(model)
    assert model.heads["a"] is head and torch.equal(head.mask, mask)  # sparse ones left alone


def test_sparsify_root_module_returns_sparse_version():
    dense = nn.Linear(4, 2)
    sparse = sparsify(dense)
    assert isinstance(sparse, SparseLinear) and sparse.weight is dense.weight


def test_sparsify_rejects_unsupported_layers():
    with pytest.raises(
        TypeError, match=r"nn.MultiheadAttention, 'transformers.Conv1D'\), got Conv1d"
    ):
        sparsify(Toy(), layers=(nn.Linear, nn.Conv1d))
    with pytest.raises(TypeError, match=r"got 'Linear'"):
        sparsify(Toy(), layers=("Linear",))


def test_optimizer_built_before_sparsify_keeps_training():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsify(model)
    before = model[0].weight.detach().clone()
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, before)


def _check_torchvision(model, x):
    counts = (len(dense_types(model)),)
    with torch.no_grad():
        expected = model(x)
        sparsify(model)
        out = model(x)
    assert dense_types(model) == []
    assert len(list(sparse_modules(model))) == counts[0]
    assert all(bool(m.mask.all()) for _, m in sparse_modules(model))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("reference_ops_on_cpu")
def test_sparsify_alexnet(device):
    model = torchvision.models.alexnet(weights=None).to(device).eval()
    _check_torchvision(model, torch.randn(2, 3, 224, 224, device=device))


@pytest.mark.usefixtures("reference_ops_on_cpu")
def test_sparsify_vgg16(device):
    model = torchvision.models.vgg16(weights=None).to(device).eval()
    _check_torchvision(model, torch.randn(1, 3, 224, 224, device=device))
