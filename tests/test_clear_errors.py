"""The unclear errors users hit (issue 19, item 12), each pinned to an exception that names what
was expected and what was got, raised before anything is changed."""

import hashlib

import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern import ops
from sparsekern.formats import BlockSparseFormatError, BlockSparseMatrix
from sparsekern.formats.relative_index import (
    CompressedFormatError,
    load_compressed,
    save_compressed,
)
from sparsekern.pruning.block import block_size_pair, prune_blocks_


def test_x_on_another_device():
    w, m = torch.randn(8, 16), torch.rand(8, 16) > 0.5
    with pytest.raises(ValueError, match=r"expected x on the weight's device cpu, got meta"):
        ops.masked_linear(torch.randn(2, 16, device="meta"), w, m)


@pytest.mark.parametrize(
    "what, match",
    [
        ("mask", r"expected mask on the weight's device cpu, got meta"),
        ("bias", r"expected bias as torch.float32 on cpu, got torch.float32 on meta"),
    ],
)
def test_block_masked_conv2d_operand_on_another_device(what, match):
    x, w = torch.randn(1, 32, 6, 6), torch.randn(32, 32, 3, 3)
    mask, bias = torch.rand(32, 32, 3, 3) > 0.5, torch.randn(32)
    if what == "mask":
        mask = mask.to("meta")
    else:
        bias = bias.to("meta")
    with pytest.raises((ValueError, TypeError), match=match):
        ops.block_masked_conv2d(x, w, mask, bias, padding=1, block_size=(16, 16))


def test_mask_none():
    with pytest.raises(TypeError, match=r"expected mask as a torch.bool Tensor, got NoneType"):
        ops.masked_linear(torch.randn(2, 16), torch.randn(8, 16), None)


@pytest.mark.parametrize("bad", [(16.9, 32), (16, 48), "32", (16, 32, 64)])
def test_block_size_not_truncated(bad):
    with pytest.raises(BlockSparseFormatError, match=r"block_size: expected .*, got"):
        block_size_pair(bad)


def test_prune_blocks_density_none_leaves_model_untouched():
    model = sk.sparsify(nn.Sequential(nn.Linear(32, 32)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"prune_blocks_: expected density .*, got None"):
        prune_blocks_(model, density=None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_block_sparse_conv2d_weight_shape_disagrees_with_matrix():
    x = torch.randn(1, 32, 6, 6)
    matrix = BlockSparseMatrix.from_dense(torch.randn(32, 32 * 9), block_size=(16, 16))
    with pytest.raises(ValueError, match=r"expected the tap-major view of shape \(32, 144\).*"
                                         r"got \(32, 288\)"):  # fmt: skip
        ops.block_sparse_conv2d(x, matrix, weight_shape=(32, 16, 3, 3), padding=1)


def test_compressed_file_with_unknown_dtype(tmp_path):
    """A header naming a dtype the reader does not know (a newer writer, a hand edit) is refused
    by name, not with a bare KeyError; the checksum is recomputed so the dtype check is reached."""
    model = sk.sparsify(nn.Sequential(nn.Linear(16, 8)))
    path = tmp_path / "m.skr"
    save_compressed(model, path)
    body = path.read_bytes()[:-32]
    assert body.count(b'"float32"') >= 1
    body = body.replace(b'"float32"', b'"float99"')
    path.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(CompressedFormatError, match=r"expected a dtype among .*found 'float99'"):
        load_compressed(path)
