"""When the sparse training path beats the vendor (dense) path: a static rule fitted to crossovers
measured by ``benchmarks/bench_cpu_sparse_train.py`` (figures and fit: ``docs/kernels.md``).

Model of one training step (fwd + dX + dW) of an ``[N, K]`` layer on ``M`` rows at kept
fraction ``d``, as a fraction of ``nn.Linear``'s step with the same weights::

    ratio(d, M) ~= FIXED_ROWS / M + PER_FLOP * d

* ``PER_FLOP``: the sparse kernels' cost per useful FLOP over the GEMM's (the GEMM runs near
  peak; the CSR products gather one length-M vector per kept weight);
* ``FIXED_ROWS / M``: the work that does not shrink with ``d`` (with dense storage: gathering the
  kept values and writing the dense ``[N, K]`` weight gradient, ~``N K`` bytes each), against the
  GEMMs' ``6 N K M`` FLOPs, so it falls with the batch.

The sparse path runs when the predicted ratio is at most :data:`MARGIN` (a margin that keeps the
"never slower than dense" promise under the fit's error) and the layer is big enough that fixed
per-call costs (Python, transposes) do not dominate (:data:`MIN_DENSE_FLOPS`).
Compact storage (the kept values are the parameter) has no ``N K`` terms: ``FIXED_ROWS_COMPACT``.

Only CPU fp32 is measured. CUDA stays on the vendor path until a GPU benchmark exists; fp16/bf16
and fp64 stay dense on the CPU (unmeasured).
"""

from __future__ import annotations

import torch

__all__ = ["MARGIN", "sparse_pays"]

# Fitted in docs/kernels.md ("The rule"): least squares on the interleaved-median ratios.
PER_FLOP = 3.6
FIXED_ROWS = 22.0
FIXED_ROWS_COMPACT = 6.0
PER_FLOP_FALLBACK = 6.0  # torch.sparse (MKL) when the extension cannot be built
MARGIN = 0.8
MIN_DENSE_FLOPS = 2e7  # 6 N K M below this: the fixed per-call costs dominate
NOMINAL_ROWS = 64


def sparse_pays(
    rows: int | None,
    n: int,
    k: int,
    kept: float,
    device: torch.device,
    dtype: torch.dtype,
    *,
    compact: bool = False,
    extension: bool = True,
) -> tuple[bool, str]:
    """``(run the sparse path?, why)`` for an ``[n, k]`` layer at kept fraction ``kept`` on
    ``rows`` input rows (None: :data:`NOMINAL_ROWS`)."""
    if device.type != "cpu":
        return False, f"{device.type}: no GPU benchmark of the sparse kernels yet (vendor GEMM)"
    if dtype != torch.float32:
        return False, f"{dtype}: only float32 is measured on the CPU (vendor GEMM)"
    assumed = rows is None
    m = NOMINAL_ROWS if assumed else max(int(rows), 1)
    at = f"{m} rows{' (assumed: no input seen yet)' if assumed else ''}"
    flops = 6 * n * k * m
    if flops < MIN_DENSE_FLOPS:
        return False, f"small step ({flops:.1e} FLOPs < {MIN_DENSE_FLOPS:.0e}) at {at}"
    per_flop = PER_FLOP if extension else PER_FLOP_FALLBACK
    fixed = FIXED_ROWS_COMPACT if compact else FIXED_ROWS
    predicted = fixed / m + per_flop * kept
    threshold = (MARGIN - fixed / m) / per_flop
    verdict = predicted <= MARGIN
    why = (
        f"kept {kept:.3f} {'<=' if verdict else '>'} {max(threshold, 0.0):.3f} at {at} "
        f"(predicted {predicted:.2f}x nn.Linear's step, sparse if <= {MARGIN}; "
        f"{'C++ kernels' if extension else 'torch.sparse fallback'})"
    )
    return verdict, why
