"""Ahead-of-time compile specs of the block_sparse_conv2d kernels (see
``sparsekern.ops._compile_check``): every kernel x storage x block shape x config x dtype, with
the integer arguments' values at the benchmark shape."""

from __future__ import annotations

from sparsekern.ops.block_sparse_conv2d.kernels import (
    _GPU_CONFIGS,
    _bsc_dw_kernel,
    _bsc_dx_kernel,
    _bsc_fwd_kernel,
    config_fits,
)

__all__ = ["HOT_BLOCKS", "compile_specs"]

_SPEC_BLOCKS = [(16, 16), (32, 32), (64, 64), (128, 128), (64, 128)]
# The block shapes the GPU targets are set at (blocks >= 64). 32x32 blocks are reported, not
# held: a 32-row dW block is below wgmma's 64-row minimum and runs mma.sync.
HOT_BLOCKS = [(64, 64), (128, 128), (64, 128)]


def _bench_values(bm: int, bk: int) -> dict[str, dict[str, int]]:
    """Integer arguments of each kernel at the benchmark shape: VGG-16 conv3_2 (256 -> 256
    channels, 3x3, pad 1, 56x56) at batch 64, channels_last activations, d = 0.1."""
    n, c, h, w = 64, 256, 56, 56
    R, CB = c // bm, c // bk
    nnz = max(1, (R * CB * 9) // 10)
    dims = {"M": n * h * w, "C_out": c, "C_in": c, "H": h, "W": w, "OH": h, "OW": w,
            "KH": 3, "KW": 3, "CB": CB, "W_ROW": 9 * c, "M_BUCKET": 1 << 18}  # fmt: skip
    geo = {"stride_h": 1, "stride_w": 1, "pad_h": 1, "pad_w": 1, "dil_h": 1, "dil_w": 1}
    act = dict(zip(("n", "h", "w", "c"), (h * w * c, w * c, c, 1)))  # NHWC

    def strides(prefix):
        return {f"{prefix}_{k}": v for k, v in act.items()}

    return {
        "fwd": {**dims, "NUM_BLOCK_ROWS": R, **geo, **strides("sx"), **strides("sy")},
        "dx": {**dims, **geo, **strides("sdy"), **strides("sdx")},
        "dw": {**dims, "CHUNK": n * h * w // 2, "NNZ": nnz, "SPLITS": 2, **geo,
               **strides("sdy"), **strides("sx")},
    }  # fmt: skip


def compile_specs():
    """Yield one spec dict per kernel, storage, block shape, config and dtype (``name``, ``fn``,
    ``signature``, ``constexprs``, ``values`` at VGG-16 conv3_2 batch 64, ``num_warps``,
    ``num_stages``, ``hot``: the bf16 configs at the benchmark's block shapes)."""
    for dt in ("bf16", "fp16", "fp32"):
        prec = "ieee" if dt == "fp32" else "tf32"
        kernels = {
            "fwd": (
                _bsc_fwd_kernel,
                {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "row_ptr_ptr": "*i32",
                 "col_idx_ptr": "*i32", "bias_ptr": f"*{dt}", "y_ptr": f"*{dt}"},
                {"HAS_BIAS": True},
            ),
            "dx": (
                _bsc_dx_kernel,
                {"dy_ptr": f"*{dt}", "w_ptr": f"*{dt}", "dx_ptr_ptr": "*i32",
                 "dx_row_ptr": "*i32", "dx_perm_ptr": "*i32", "dx_tap_ptr": "*i32",
                 "dx_out_ptr": f"*{dt}"},
                {},
            ),
            "dw": (
                _bsc_dw_kernel,
                {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "block_row_ptr": "*i32",
                 "col_idx_ptr": "*i32", "keep_ptr": "*u8", "dw_ptr": f"*{dt}",
                 "part_ptr": "*fp32"},
                {"SPLIT": True, "MASKED": False},
            ),
        }  # fmt: skip
        for dense in (False, True):
            storage = "dense" if dense else "compact"
            for kind, (kernel, ptrs, extra) in kernels.items():
                for bm, bk in _SPEC_BLOCKS:
                    values = _bench_values(bm, bk)[kind]
                    sig = ptrs | {k: "i32" for k in values}
                    for block_m, w, s in _GPU_CONFIGS[kind]:
                        # The configs the launch-time pruning would drop are not compiled either.
                        if not config_fits(block_m, w, s, bm, bk, 4 if dt == "fp32" else 2):
                            continue
                        consts = {**extra, "DENSE": dense, "UPCAST": False, "PRECISION": prec}
                        consts |= {"BM": bm, "BK": bk, "BLOCK_M": block_m}
                        yield {
                            "name": (
                                f"block_sparse_conv2d.{kind}[{dt},{storage},b{bm}x{bk},"
                                f"m{block_m},w{w},s{s}]"
                            ),
                            "fn": kernel.fn,
                            "signature": sig,
                            "constexprs": consts,
                            "values": values,
                            "num_warps": w,
                            "num_stages": s,
                            "hot": dt == "bf16" and (bm, bk) in HOT_BLOCKS,
                        }
