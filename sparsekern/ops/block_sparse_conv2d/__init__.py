"""Block-sparse 2-D convolution: implicit-GEMM Triton kernels on channels_last (NHWC) activations
that visit only the kept blocks of the weight, in the forward, dX and dW (groups=1).

The weight's GEMM view is TAP-MAJOR: ``W [C_out, C_in, kH, kW]`` is seen as the matrix
``[C_out, kH*kW*C_in_pad]`` with columns ordered (kh, kw, ci) and ``C_in`` padded to a multiple of
``bk`` per tap, so every ``bm x bk`` block holds ``bm`` output channels x ``bk`` input channels of
ONE kernel tap (kh, kw). Why not PyTorch's (ci, kh, kw) order: there a block straddles taps, so
its activation operand would need a different spatial shift per column, which no tile-level
``tl.dot`` can express.

Why NHWC: a block's ``bk`` input channels at one pixel are then ``bk`` consecutive elements, so
every activation load is a 16-byte vector per row, pipelined by ``cp.async``; the pixel (row)
address is computed once per tile row. The NCHW kernels this op held before gathered with
scalar 2-byte loads and spilled up to 4.4 KB per thread. Inputs in NCHW are converted once per
call (one read and one write of x: at VGG-16 conv3_2, batch 64, bf16, 103 MB, ~48 us at
4.3 TB/s against a ~0.1 ms block-sparse forward at d=0.1); keep the model channels_last
(``model.to(memory_format=torch.channels_last)``) to skip it. Outputs and dx are channels_last.

Storages, as in ``block_sparse_linear``: a dense weight with a block-structured bool mask
(``block_masked_conv2d``: SparseConv2d's block mode; the kernels read it as channels_last
``[C_out, kH, kW, C_in]``, where a tap-major block is ``bk`` consecutive elements per row; a
weight in another layout is copied once per call) or compact ``values [nnz, bm, bk]`` of a
:class:`BlockSparseMatrix` of the tap-major view (``block_sparse_conv2d``: inference, memory falls
with density).

Files, from the bottom up:

* ``layout``: the tap-major view (``conv_weight_to_gemm`` / ``conv_weight_from_gemm``,
  ``conv_block_occupancy``) and the block layouts (``conv_layout_of_mask``, cached on the mask;
  ``conv_layout_of_matrix``, cached on the matrix's index tensors by
  ``cached_conv_layout_of_matrix``);
* ``kernels``: the ``@triton.jit`` kernels, their autotune configs and launchers
  (``bsc_{fwd,dx,dw}_launch``);
* ``custom_ops``: one implementation per (storage, GEMM), the ``torch.library`` custom ops that
  torch.compile sees, and ``_BlockSparseConvFunction`` (autograd);
* ``op``: the public ops ``block_masked_conv2d`` / ``block_sparse_conv2d`` (input checks, path
  choice; where the kernels do not run: ``masked_conv2d`` or the reference);
* ``reference``: the reference twin ``block_sparse_conv2d_reference``;
* ``specs``: ``compile_specs`` for the static contract (``sparsekern.ops._compile_check``).

triton is optional: without it every file imports and only a kernel launch raises.
"""

from sparsekern.ops.block_sparse_conv2d.kernels import (
    bsc_dw_launch,
    bsc_dx_launch,
    bsc_fwd_launch,
    config_fits,
    nhwc,
)
from sparsekern.ops.block_sparse_conv2d.layout import (
    ConvLayout,
    conv_block_occupancy,
    conv_layout_of_mask,
    conv_layout_of_matrix,
    conv_weight_from_gemm,
    conv_weight_to_gemm,
)
from sparsekern.ops.block_sparse_conv2d.op import block_masked_conv2d, block_sparse_conv2d
from sparsekern.ops.block_sparse_conv2d.reference import block_sparse_conv2d_reference
from sparsekern.ops.block_sparse_conv2d.specs import HOT_BLOCKS, compile_specs

__all__ = [
    "HOT_BLOCKS",
    "ConvLayout",
    "block_masked_conv2d",
    "block_sparse_conv2d",
    "block_sparse_conv2d_reference",
    "bsc_dw_launch",
    "bsc_dx_launch",
    "bsc_fwd_launch",
    "compile_specs",
    "config_fits",
    "conv_block_occupancy",
    "conv_layout_of_mask",
    "conv_layout_of_matrix",
    "conv_weight_from_gemm",
    "conv_weight_to_gemm",
    "nhwc",
]
