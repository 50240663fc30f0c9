"""Tile code shared by the Triton GEMM kernels: autotune configs from data rows, the grouped
program-to-tile order, and the per-16x16-block "anything kept?" flags that let a dW kernel skip
an all-pruned output tile."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsekern.ops._dispatch import interpreter_enabled
from sparsekern.ops._mask_cache import cached_on_mask
from sparsekern.ops._triton import tl, triton

__all__ = [
    "FLAG_BLOCK",
    "batch_tile_configs",
    "grouped_tile",
    "skipped_tile_fraction",
    "tile_configs",
    "tile_flags",
    "tile_kept_blocks",
]

FLAG_BLOCK = 16  # granularity of the tile flags; every tile dimension that tests them is a multiple
# One config under the interpreter: with more, the autotuner benchmarks, which fails without a GPU.
INTERPRETER_TILE = (32, 32, 32, 4, 4, 1)
INTERPRETER_BATCH_TILE = (32, 4, 1)


def tile_configs(gpu_rows, interpreter_row=INTERPRETER_TILE) -> list:
    """``triton.Config`` objects from ``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps,
    num_stages)`` rows; under the interpreter only ``interpreter_row``."""
    rows = [interpreter_row] if interpreter_enabled() else gpu_rows
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g},
            num_warps=w,
            num_stages=s,
        )
        for bm, bn, bk, g, w, s in rows
    ]


def batch_tile_configs(gpu_rows, interpreter_row=INTERPRETER_BATCH_TILE) -> list:
    """``triton.Config`` objects from ``(BLOCK_M, num_warps, num_stages)`` rows; under the
    interpreter only ``interpreter_row``."""
    rows = [interpreter_row] if interpreter_enabled() else gpu_rows
    return [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s) for m, w, s in rows]


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map the 1-D program id to a (pid_m, pid_n) tile, GROUP_M row-tiles at a time, so that
    consecutive programs share B tiles in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def tile_kept_blocks(
    flags_ptr, pid_m, pid_n, FLAG_M, FLAG_N,
    FLAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """How many FLAG x FLAG blocks of output tile (pid_m, pid_n) keep anything: the tile's
    ``BLOCK_M/FLAG x BLOCK_N/FLAG`` bytes of ``flags [FLAG_M, FLAG_N]`` (uint8, contiguous)."""
    fm = pid_m * (BLOCK_M // FLAG) + tl.arange(0, BLOCK_M // FLAG)
    fn = pid_n * (BLOCK_N // FLAG) + tl.arange(0, BLOCK_N // FLAG)
    f_ok = (fm[:, None] < FLAG_M) & (fn[None, :] < FLAG_N)
    flags = tl.load(flags_ptr + fm[:, None] * FLAG_N + fn[None, :], mask=f_ok, other=0)
    return tl.sum(tl.sum(flags.to(tl.int32), axis=1), axis=0)


def compute_tile_flags(mask: torch.Tensor) -> torch.Tensor:
    """``flags [ceil(R/16), ceil(C/16)]`` uint8 of a 2-D ``mask [R, C]``: 1 where its 16x16 block
    keeps anything."""
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)
    rows, cols = m.shape
    pad_r, pad_c = (-rows) % FLAG_BLOCK, (-cols) % FLAG_BLOCK
    if pad_r or pad_c:
        m = F.pad(m, (0, pad_c, 0, pad_r))
    fr, fc = m.shape[0] // FLAG_BLOCK, m.shape[1] // FLAG_BLOCK
    return m.reshape(fr, FLAG_BLOCK, fc, FLAG_BLOCK).amax(dim=(1, 3)).contiguous()


def tile_flags(mask: torch.Tensor) -> torch.Tensor:
    """:func:`compute_tile_flags`, cached on the mask object; recomputed when the mask is modified
    in place."""
    return cached_on_mask(mask, "tile_flags", compute_tile_flags)


def _skipped_fraction(mask: torch.Tensor, tile: int) -> float:
    flags = tile_flags(mask)
    group = tile // FLAG_BLOCK
    fr, fc = flags.shape
    f = F.pad(flags, (0, (-fc) % group, 0, (-fr) % group))
    tiles = f.reshape(f.shape[0] // group, group, f.shape[1] // group, group).amax(dim=(1, 3))
    return float((tiles == 0).sum()) / tiles.numel()


def skipped_tile_fraction(mask: torch.Tensor, tile: int = 128) -> float:
    """Fraction of the ``tile x tile`` output tiles of the 2-D ``mask`` that are all pruned (what a
    tile-skipping dW kernel does not compute). Cached on the mask."""
    return cached_on_mask(mask, f"skipped:{tile}", lambda m: _skipped_fraction(m, tile))
