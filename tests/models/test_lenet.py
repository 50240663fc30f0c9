"""The LeNets of Han et al. 2015: sizes (Table 1: 267K and 431K parameters), shapes, sparsify."""

import pytest
import torch
from torch import nn

from models import DROPOUT_FEEDS, LeNet5, LeNet300100, build_model, count_weights
from sparsekern.nn import SparseConv2d, SparseLinear, sparse_modules


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    # conftest turns on Triton's interpreter for the kernel tests; these are model tests, and the
    # plain-PyTorch CPU path is the one the MNIST script runs.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_lenet300_counts_match_paper():
    w, b = count_weights(LeNet300100())
    assert w == 784 * 300 + 300 * 100 + 100 * 10 == 266_200
    assert b == 300 + 100 + 10
    assert round((w + b) / 1e3) == 267  # Table 1: 267K


def test_lenet5_counts_match_paper():
    w, b = count_weights(LeNet5())
    assert w == 20 * 25 + 50 * 20 * 25 + 800 * 500 + 500 * 10 == 430_500
    assert b == 20 + 50 + 500 + 10
    assert round((w + b) / 1e3) == 431  # Table 1: 431K


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
@pytest.mark.parametrize("sparse", [False, True])
def test_output_shape(name, sparse):
    model = build_model(name, sparse=sparse).eval()
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()


def test_lenet5_intermediate_shapes():
    m = LeNet5()
    x = torch.randn(2, 1, 28, 28)
    a = nn.functional.max_pool2d(m.conv1(x), 2)
    assert a.shape == (2, 20, 12, 12)
    b = nn.functional.max_pool2d(m.conv2(a), 2)
    assert b.shape == (2, 50, 4, 4)
    assert m.fc1.in_features == 800


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_sparse_build_keeps_function_and_names(name):
    torch.manual_seed(0)
    dense = build_model(name, sparse=False).eval()
    torch.manual_seed(0)
    sparse = build_model(name, sparse=True).eval()
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(sparse(x), dense(x))
    names = [n for n, _ in sparse_modules(sparse)]
    expected = ["fc1", "fc2", "fc3"] if name == "lenet300" else ["conv1", "conv2", "fc1", "fc2"]
    assert names == expected
    for _, m in sparse_modules(sparse):
        assert isinstance(m, (SparseLinear, SparseConv2d))
        assert m.mask.all()


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_dropout_feeds_name_real_modules(name):
    model = build_model(name, sparse=True, dropout=0.5)
    modules = dict(model.named_modules())
    for drop, layer in DROPOUT_FEEDS[name].items():
        assert isinstance(modules[drop], nn.Dropout) and modules[drop].p == 0.5
        assert isinstance(modules[layer], SparseLinear)


def test_unknown_model():
    with pytest.raises(ValueError, match="lenet300"):
        build_model("alexnet")
