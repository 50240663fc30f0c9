"""Ahead-of-time compile specs of the block_sparse_linear kernels (see
``sparsekern.ops._compile_check``): every kernel x storage x block shape x config x dtype, with
the integer arguments' values at the benchmark shape."""

from __future__ import annotations

from sparsekern.ops._block_kernels import bsr_dw_reduce_kernel
from sparsekern.ops.block_sparse_linear.kernels import (
    _GPU_CONFIGS,
    _SMEM_BUDGET,
    _bsr_dw_kernel,
    _bsr_dx_kernel,
    _bsr_fwd_kernel,
    _smem,
)

__all__ = ["HOT_BLOCKS", "compile_specs"]

_SPEC_BLOCKS = [(16, 16), (32, 32), (64, 64), (128, 128), (64, 128), (128, 64), (16, 64)]
# The block shapes the GPU targets are set at (bench_block_sparse.py, blocks >= 64): what the
# contract holds. 32x32 blocks are reported, not held: a 32-row dW block is below wgmma's 64-row
# minimum and runs mma.sync.
HOT_BLOCKS = [(64, 64), (128, 128), (64, 128), (128, 64)]
_HOT_MIN_BLOCK_M = 64  # smaller batch tiles run mma.sync (wgmma needs 64 rows): decode sizes


def _bench_values(bm: int, bk: int, dense: bool) -> dict[str, dict[str, int]]:
    """Integer arguments of each kernel at the benchmark shape: M=8192 tokens, N=K=4096, d = 0.1,
    contiguous activations; dW split in two (as ``dw_splits`` does when few blocks are stored)."""
    M, N, K = 8192, 4096, 4096
    R, C = N // bm, K // bk
    nnz = max(1, (R * C) // 10)
    common = {"M": M, "N": N, "K": K, "W_ROW": K, "M_BUCKET": M}
    return {
        "fwd": {**common, "NUM_BLOCK_ROWS": R, "NUM_BLOCK_COLS": C, "stride_xm": K,
                "stride_xk": 1, "stride_ym": N, "stride_yn": 1},
        "dx": {**common, "NUM_BLOCK_COLS": C, "stride_dym": N, "stride_dyn": 1, "stride_dxm": K,
               "stride_dxk": 1},
        "dw": {**common, "CHUNK": M // 2, "NNZ": nnz, "SPLITS": 2, "NUM_BLOCK_COLS": C,
               "stride_dym": N, "stride_dyn": 1, "stride_xm": K, "stride_xk": 1},
        "dw_reduce": {"ROWS": N, "COLS": K, "CB": C, "NNZ": nnz, "SPLITS": 2,
                      "W_ROW": K if dense else bk, "TAP": 0},
    }  # fmt: skip


def _spec(name, fn, ptrs, values, consts, warps, stages, hot) -> dict:
    return {
        "name": name, "fn": fn, "signature": ptrs | {k: "i32" for k in values},
        "constexprs": consts, "values": values, "num_warps": warps, "num_stages": stages,
        "hot": hot,
    }  # fmt: skip


def compile_specs():
    """Yield one spec dict per kernel, storage, block shape, config and dtype (``name``, ``fn``,
    ``signature``, ``constexprs``, ``values`` at M=8192, N=K=4096, ``num_warps``, ``num_stages``,
    ``hot``: the bf16 configs with batch tiles of at least 64 rows at the benchmark's block
    shapes, the ones the autotuner may pick there)."""
    for dt in ("bf16", "fp16", "fp32"):
        prec = "ieee" if dt == "fp32" else "tf32"
        kernels = {
            "fwd": (
                _bsr_fwd_kernel,
                {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "row_ptr_ptr": "*i32",
                 "col_idx_ptr": "*i32", "bias_ptr": f"*{dt}", "y_ptr": f"*{dt}"},
                {"HAS_BIAS": True},
            ),
            "dx": (
                _bsr_dx_kernel,
                {"dy_ptr": f"*{dt}", "w_ptr": f"*{dt}", "col_ptr_ptr": "*i32",
                 "t_row_ptr": "*i32", "t_perm_ptr": "*i32", "dx_ptr": f"*{dt}"},
                {},
            ),
            "dw": (
                _bsr_dw_kernel,
                {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "block_row_ptr": "*i32",
                 "col_idx_ptr": "*i32", "keep_ptr": "*u8", "dw_ptr": f"*{dt}",
                 "part_ptr": "*fp32"},
                {"SPLIT": True, "MASKED": False},
            ),
        }  # fmt: skip
        esize = 4 if dt == "fp32" else 2
        for dense in (False, True):
            storage = "dense" if dense else "compact"
            for kind, (kernel, ptrs, extra) in kernels.items():
                for bm, bk in _SPEC_BLOCKS:
                    values = _bench_values(bm, bk, dense)[kind]
                    for block_m, w, s in _GPU_CONFIGS[kind]:
                        # The configs the launch-time pruning would drop are not compiled either.
                        if _smem(block_m, bm, bk, esize, s) > _SMEM_BUDGET:
                            continue
                        consts = {**extra, "DENSE": dense, "UPCAST": False, "PRECISION": prec}
                        consts |= {"BM": bm, "BK": bk, "BLOCK_M": block_m}
                        hot = dt == "bf16" and block_m >= _HOT_MIN_BLOCK_M
                        hot = hot and (bm, bk) in HOT_BLOCKS
                        name = (
                            f"block_sparse_linear.{kind}[{dt},{storage},b{bm}x{bk},m{block_m},"
                            f"w{w},s{s}]"
                        )
                        yield _spec(name, kernel.fn, ptrs, values, consts, w, s, hot)
            reduce_ptrs = {"part_ptr": "*fp32", "block_row_ptr": "*i32", "col_idx_ptr": "*i32",
                           "keep_ptr": "*u8", "dw_ptr": f"*{dt}"}  # fmt: skip
            for bm, bk in _SPEC_BLOCKS:
                values = _bench_values(bm, bk, dense)["dw_reduce"]
                consts = {"DENSE": dense, "MASKED": dense, "BM": bm, "BK": bk}
                name = f"block_sparse_linear.dw_reduce[{dt},{storage},b{bm}x{bk}]"
                yield _spec(name, bsr_dw_reduce_kernel.fn, reduce_ptrs, values, consts, 4, 1, False)
