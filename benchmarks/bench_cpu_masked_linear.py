"""CPU benchmark (pytest-benchmark) of the reference path: SparseLinear vs dense nn.Linear vs
torch.nn.utils.prune's forward hook, forward+backward, at LeNet-300-100's layer shapes.

    make bench
    .venv/bin/python -m pytest benchmarks/bench_cpu_masked_linear.py --benchmark-only

Target (issue 2): SparseLinear forward+backward <= 1.1x dense nn.Linear on the CPU path. Compare
the medians of the rows with the same shape; nothing here asserts a time.
"""

import os

import pytest
import torch
import torch.nn.utils.prune as prune

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip(
        "CPU benchmarks time the reference path: unset TRITON_INTERPRET", allow_module_level=True
    )

from sparsekern.nn import SparseLinear  # noqa: E402

# (batch, in, out): LeNet-300-100's three layers at batch 256, and a wider layer.
SHAPES = [(256, 784, 300), (256, 300, 100), (256, 100, 10), (512, 1024, 1024)]
DENSITY = 0.1


def _layers(shape):
    batch, fin, fout = shape
    torch.manual_seed(0)
    dense = torch.nn.Linear(fin, fout)
    mask = torch.rand(fout, fin) < DENSITY
    hooked = torch.nn.Linear(fin, fout)
    hooked.load_state_dict(dense.state_dict())
    prune.custom_from_mask(hooked, "weight", mask)
    sparse = SparseLinear.from_dense(torch.nn.Linear(fin, fout))
    sparse.set_mask(mask)
    x = torch.randn(batch, fin, requires_grad=True)
    return {"dense": dense, "torch_prune": hooked, "sparsekern": sparse}, x


@pytest.mark.parametrize("impl", ["dense", "torch_prune", "sparsekern"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fwd_bwd(benchmark, shape, impl):
    layers, x = _layers(shape)
    layer = layers[impl]

    def step():
        layer(x).sum().backward()

    benchmark.group = "x".join(map(str, shape))
    benchmark(step)
