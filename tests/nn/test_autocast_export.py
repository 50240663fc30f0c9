"""Every module the inference export can produce runs under torch.autocast and gives what the
dense model gives under the same autocast (the issue: bf16 autocast failed on an exported
BlockSparseConv2d; MKL's CSR product has no bf16 either)."""

import pytest
import torch
from torch import nn

from sparsekern import sparsify, to_inference
from sparsekern.nn import (
    BlockSparseConv2d,
    BlockSparseLinear,
    CSRConv2d,
    CSRLinear,
    SparseConv2d,
    SparseLinear,
)
from sparsekern.pruning import prune_blocks_

KINDS = {
    "dense": (nn.Conv2d, nn.Linear),
    "csr": (CSRConv2d, CSRLinear),
    "bsr": (BlockSparseConv2d, BlockSparseLinear),
    "sparse": (SparseConv2d, SparseLinear),  # the un-exported modules, in eval
}


def _model():
    torch.manual_seed(0)
    model = sparsify(
        nn.Sequential(
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 6 * 6, 48)
        )
    ).eval()
    prune_blocks_(model, 0.3, block_size=(16, 16))
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", list(KINDS))
def test_exported_modules_under_autocast(fmt, dtype, device):
    model = _model().to(device)
    x = torch.randn(3, 16, 6, 6, device=device)
    if fmt == "sparse":
        exported = model
    elif fmt == "bsr":
        exported = to_inference(model, format="bsr", block_size=16, conv=True)
    else:
        exported = to_inference(model, format=fmt, calibrate=False, conv=True)
    conv_cls, lin_cls = KINDS[fmt]
    assert isinstance(exported[0], conv_cls) and isinstance(exported[3], lin_cls)
    dense = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32 * 6 * 6, 48)).to(device).eval()  # fmt: skip
    with torch.no_grad():
        for d, s in ((dense[0], model[0]), (dense[3], model[3])):
            d.weight.copy_(s.weight * s.mask)
            d.bias.copy_(s.bias)
        with torch.autocast(device.type, dtype=dtype):
            want = dense(x)
            got = exported(x)
    assert got.dtype == want.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(got.float(), want.float(), atol=tol * want.abs().max().item(),
                               rtol=tol)  # fmt: skip
