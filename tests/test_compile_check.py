"""The Triton kernels compile for a Hopper GPU (sm_90) even on a machine without one.

The interpreter accepts code that the compiler refuses (dot shapes under 16, dtype mixes), so CI
lowers each kernel to a cubin with triton's bundled ptxas, for the largest and smallest tile config
of every kernel and dtype. The full sweep: ``python -m sparsekern.ops._compile_check``."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_kernels_compile_for_sm90(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "sparsekern.ops._compile_check", "--arch", "90", "--sample"]
    proc = subprocess.run(
        [*cmd, "--json", str(out)], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows and all(r["ok"] and r["cubin"] for r in rows)
    kernels = {r["kernel"].split("[")[0] for r in rows}
    expected = {"masked_linear.mask_b", "masked_linear.mask_c"}
    expected |= {f"block_sparse_linear.{k}" for k in ("fwd", "dx", "dw", "dw_split", "dw_reduce")}
    expected |= {f"block_sparse_conv2d.{k}" for k in ("fwd", "dx", "dw")}
    expected |= {f"masked_conv2d.{k}" for k in ("fwd", "fwd_strided", "dx", "dw", "dw_split")}
    assert expected <= kernels, f"missing {expected - kernels}"
    # The big bf16 tiles must lower to Hopper's warpgroup MMA, not the older mma.sync path.
    big_bf16 = [r for r in rows if "bf16,128x256x64" in r["kernel"]]
    assert big_bf16 and all(r["wgmma"] and r["fits_smem"] for r in big_bf16)
