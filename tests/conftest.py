"""Test set-up. Without a GPU, the Triton kernels run through Triton's interpreter on CPU tensors:
TRITON_INTERPRET=1 must be set before triton is first imported, so it is set here, at collection."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the kernels are tested on: CUDA when present, else CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def reference_path(monkeypatch):
    """Run the ops' plain-PyTorch path on the CPU instead of the Triton interpreter, for tests
    about training loops and pruning (the kernels have their own tests). On CUDA it changes
    nothing: CUDA tensors always run the kernels."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
