"""When the sparse training path beats the vendor (dense) path: a static rule fitted to crossovers
measured by ``benchmarks/bench_cpu_sparse_train.py`` (figures and fit: ``docs/kernels.md``).

Model of one training step (fwd + dX + dW) of an ``[N, K]`` layer on ``M`` rows at kept
fraction ``d``, as a fraction of ``nn.Linear``'s step with the same weights::

    ratio(d) ~= FIXED + PER_KEPT * d

* ``PER_KEPT``: the sparse kernels' cost per kept weight over the GEMM's per weight (the GEMM
  runs near peak; the CSR products gather one length-M vector per kept weight): ~4;
* ``FIXED``: what does not shrink with ``d``: transposes of the activations, and with dense
  storage the per-step gather of the kept values and the zero-filled dense ``[N, K]`` weight
  gradient (~0.4 of the step); compact storage has no ``N K`` term (~0.3 measured).

Measured on the quiet 2-core machine (``--sweep``, 768->3072, 9216->4096, 4096->4096, forced
sparse path, ratios at kept 0.2 / 0.1 / 0.05 / 0.02; ``benchmarks/results/
cpu_sparse_train_sweep_2026-12-07.json``):

* dense storage, 64 and 256 rows: 0.72-1.07 / 0.41-0.69 / 0.25-0.83 / 0.14-0.46;
* dense storage, 16 rows: 0.99-1.35 / 0.93-1.09 / 0.63-0.83 / 0.33-0.69 (the zero-filled dense
  gradient and the gather are a larger share of a small step: :data:`FIXED_SMALL_BATCH`);
* compact, 16-256 rows: 0.63-1.02 / 0.31-0.55 / 0.17-0.33 / 0.07-0.22.

Batches under :data:`MIN_ROWS` (unmeasured: a single AVX-512 lane group per kept weight) stay
dense.

The sparse path runs when the predicted ratio is at most :data:`MARGIN`, 0.9: the path it
replaces is not ``nn.Linear``'s step but the masked one (the same GEMMs plus a pass zeroing
dW's pruned entries; ``make bench`` at 70d6b94 on the AVX-512 Xeon, 50% sparsity: 0.84x at
9216->4096, whose dW goes on a pooled mapping, 1.04x at 768->3072 and 784->300, and 1.48x at
300->100 at 90%), and 0.1 under dense covers the fit's error
(kept <= 0.125 with dense storage, <= 0.0875 under 64 rows, <= 0.15 compact, <= 0.09 on the
torch.sparse fallback), and the step is big enough that fixed per-call costs (Python, thread
wake-ups) do not dominate (:data:`MIN_DENSE_FLOPS`). Measured at kept 0.10 (90% sparsity;
AMD EPYC without AVX-512, 2 threads, quiet; ``benchmarks/bench_cpu_sparse_train.py``'s
contenders timed 15 times interleaved): sparse 0.84 / 0.83 / 1.00 against masked
1.03 / 1.11 / 1.15 (768->3072 and 784->300 at 256 rows, 4096->4096 at 16 rows); the AVX-512
sweep above: sparse 0.41-0.69 at 64 and 256 rows. At kept 0.10 the previous margin (0.8) took
the masked path by float rounding (0.4 + 4 x 0.1 = 0.8000000000000002).

Only CPU fp32 is measured. CUDA stays on the vendor path until a GPU benchmark exists; fp16/bf16
and fp64 stay dense on the CPU (unmeasured).
"""

from __future__ import annotations

import torch

__all__ = ["MARGIN", "sparse_pays"]

# Fitted by hand to benchmarks/results/cpu_sparse_train_2026-12-07.json (docs/kernels.md).
PER_KEPT = 4.0
FIXED = 0.4
FIXED_COMPACT = 0.3
PER_KEPT_FALLBACK = 5.0  # torch.sparse (MKL) when the extension cannot be built
FIXED_FALLBACK = 0.45
MARGIN = 0.9  # under dense for the fit's error (module docstring)
# 6 N K M below this: the fixed per-call costs dominate. AVX-512 Xeon, 2 threads, forced paths
# (step over nn.Linear's): 300->100 at 128 / 256 rows (2.3e7 / 4.6e7 FLOPs) sparse 2.27 / 2.04
# against masked 1.56 / 1.45; 784->300 at 128 rows (1.8e8) kept 0.05 sparse 1.06, masked 1.19.
MIN_DENSE_FLOPS = 1e8
MIN_ROWS = 16  # the smallest batch measured
# Dense storage under 64 rows: the per-step gather and the zero-filled dense gradient do not
# shrink with the batch, so they are a larger share of the step (16 rows at kept 0.05 measured
# 0.63-0.83 of dense, at kept 0.1 0.93-1.09): a larger fixed term, kept <= 0.0875.
MIN_ROWS_DENSE_STORAGE = 64
FIXED_SMALL_BATCH = 0.55  # kept <= 0.0875 at MARGIN 0.9
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
    if m < MIN_ROWS:
        return False, f"{at} < {MIN_ROWS} (small batches unmeasured: vendor GEMM)"
    per_kept = PER_KEPT if extension else PER_KEPT_FALLBACK
    fixed = FIXED_COMPACT if compact else (FIXED if extension else FIXED_FALLBACK)
    small = not compact and m < MIN_ROWS_DENSE_STORAGE
    if small:  # the dense gradient's fixed cost weighs more in a small step
        fixed = max(fixed, FIXED_SMALL_BATCH)
    predicted = fixed + per_kept * kept
    threshold = (MARGIN - fixed) / per_kept
    verdict = predicted <= MARGIN
    why = (
        f"kept {kept:.3f} {'<=' if verdict else '>'} {threshold:.3f} at {at} "
        f"(predicted {predicted:.2f}x nn.Linear's step, sparse if <= {MARGIN}; "
        f"{'C++ kernels' if extension else 'torch.sparse fallback'}"
        f"{', compact storage' if compact else ''}"
        f"{f', dense storage under {MIN_ROWS_DENSE_STORAGE} rows' if small else ''})"
    )
    return verdict, why
