"""scripts/prune_mnist.py: a CI smoke run of --quick on a tiny slice of MNIST, and --resume after a
simulated kill giving bit-for-bit the result of an uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "prune_mnist.py"
# A tiny, fast configuration: 1,000 training images (7 steps of 128 per epoch), 500 test images.
TINY = ["--subset", "1000", "--test-subset", "500", "--sens-n", "500", "--no-progress"]


def run(*args, timeout=120):
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"  # the plain-PyTorch CPU path, as `make demo` runs it
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("model", ["lenet300", "lenet5"])
def test_quick_smoke(tmp_path, model):
    out = run("--model", model, "--quick", *TINY, "--out", tmp_path)
    assert "Table 1 (Han et al. 2015)" in out
    assert "Weights%" in out  # Table 2's columns
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["weights_dense"] == {"lenet300": 266_200, "lenet5": 430_500}[model]
    assert 0 < s["weights_pruned"] < s["weights_dense"]
    assert s["compression_weights"] > 1
    assert 0 <= s["error_pruned_pct"] <= 100
    assert "scripts/prune_mnist.py" in s["command"]
    assert (tmp_path / s["compressed_file"]["path"]).stat().st_size == s["compressed_file"][
        "file_bytes"
    ]
    for fig in s["figures"]:
        assert (tmp_path / fig).stat().st_size > 1000
    assert "fig7_weight_hist.png" in s["figures"]


def test_resume_equals_uninterrupted(tmp_path):
    cfg = ["--model", "lenet300", "--quick", *TINY, "--epochs", "1", "--rounds", "2",
           "--dropout", "0.2", "--no-figures", "--seed", "3"]  # fmt: skip
    run(*cfg, "--out", tmp_path / "a")
    out = run(*cfg, "--out", tmp_path / "b", "--stop-after-round", "1")
    assert "stopping after round 1" in out
    assert not (tmp_path / "b" / "summary.json").exists()
    out = run(*cfg, "--out", tmp_path / "b", "--resume")
    assert "resumed from" in out

    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    for key in ("error_dense_pct", "error_pruned_pct", "weights_pruned", "kept_pct"):
        assert a[key] == b[key], key
    assert [r["error"] for r in a["rounds"]] == [r["error"] for r in b["rounds"]]
    assert a["rounds"][-1]["dropout"] == b["rounds"][-1]["dropout"]  # dropout rule restored
    wa = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
