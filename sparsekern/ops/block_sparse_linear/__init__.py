"""block_sparse_linear: ``y = x W^T + b`` for a block-sparse W, visiting only the stored blocks.

Three GEMMs (forward ``y = x W^T``, dX ``dy W``, dW ``dy^T x`` at the stored blocks), each
touching only the stored blocks of W and of dW. One set of kernels serves two storages of W:

* compact (``BlockSparseMatrix.values [nnz, bm, bk]``): inference, and training with memory that
  falls with density (``block_sparse_linear``);
* dense ``weight [N, K]`` with a block-structured ``mask``: ``SparseLinear(block_size=...)`` trains
  a normal dense Parameter (any optimizer, the mask invariant of ``set_mask``) while the kernels
  skip its pruned blocks (``block_masked_linear``). Pruned weights inside kept blocks are zero
  (the invariant, or the masked copy ``block_masked_linear`` makes for an arbitrary weight), so
  the forward and dX read blocks as they are.

Files, from the bottom up:

* ``kernels``: the ``@triton.jit`` kernels, their autotune configs and launchers
  (``bsr_{fwd,dx,dw}_launch``: check, allocate, launch);
* ``cpu``: where the Triton kernels do not run (CPU without ``TRITON_INTERPRET=1``, float64):
  torch.sparse BSR products (MKL) over the stored blocks, never a dense rebuild of the weight;
* ``layout``: which blocks are stored (``layout_of_mask``, cached on the mask;
  ``layout_of_matrix``);
* ``custom_ops``: one implementation per (storage, GEMM), the ``torch.library`` custom ops that
  torch.compile sees, and ``_BlockSparseFunction`` (autograd);
* ``op``: the public ops ``block_sparse_linear`` / ``block_masked_linear`` (input checks, path
  choice);
* ``reference``: the reference twin ``block_sparse_linear_reference`` (``F.linear`` on the
  densified matrix);
* ``specs``: ``compile_specs`` for the static contract (``sparsekern.ops._compile_check``).

triton is optional: without it every file imports and only a kernel launch raises.
"""

from sparsekern.ops.block_sparse_linear.cpu import (
    CPU_BSR_MAX_DENSITY,
    CPU_BSR_MAX_DENSITY_TRAIN,
    CPU_DTYPES,
)
from sparsekern.ops.block_sparse_linear.kernels import bsr_dw_launch, bsr_dx_launch, bsr_fwd_launch
from sparsekern.ops.block_sparse_linear.layout import layout_of_mask, layout_of_matrix
from sparsekern.ops.block_sparse_linear.op import block_masked_linear, block_sparse_linear
from sparsekern.ops.block_sparse_linear.reference import block_sparse_linear_reference
from sparsekern.ops.block_sparse_linear.specs import HOT_BLOCKS, compile_specs

__all__ = [
    "CPU_BSR_MAX_DENSITY",
    "CPU_BSR_MAX_DENSITY_TRAIN",
    "CPU_DTYPES",
    "HOT_BLOCKS",
    "block_masked_linear",
    "block_sparse_linear",
    "block_sparse_linear_reference",
    "bsr_dw_launch",
    "bsr_dx_launch",
    "bsr_fwd_launch",
    "compile_specs",
    "layout_of_mask",
    "layout_of_matrix",
]
