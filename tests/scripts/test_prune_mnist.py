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


@pytest.fixture(scope="module")
def script():
    """scripts/prune_mnist.py as a module, MNIST loaded once for all the tests that use it."""
    import functools
    import importlib.util

    spec = importlib.util.spec_from_file_location("prune_mnist_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.load_mnist = functools.lru_cache(maxsize=1)(mod.load_mnist)
    return mod


@pytest.mark.parametrize("method", ["han", "global", "gradual", "snip", "rigl", "nm"])
def test_methods_from_the_script(tmp_path, monkeypatch, script, method):
    """Every --method runs end to end (in-process: no interpreter start-up) and hits --sparsity."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    argv = ["--model", "lenet300", "--method", method, "--sparsity", "0.9", *TINY,
            "--total-epochs", "1", "--epochs", "1", "--rounds", "1", "--retrain-epochs", "1",
            "--no-figures", "--threads", "0", "--gradual-freq", "1", "--rigl-delta", "2",
            "--out", str(tmp_path)]  # fmt: skip
    script.main(argv)
    s = json.loads((tmp_path / "summary.json").read_text())
    if method == "han":  # Han's summary: kept fractions in Han's proportions, total exact
        assert s["kept_pct"]["total"] == pytest.approx(10.0, abs=1e-3)
        assert s["args"]["method"] == "han" and s["mode"] == "keep"
        return
    assert s["method"] == method
    assert s["steps"] == 7  # 1,000 images / 128 per batch, one epoch
    assert 0 <= s["error_pct"] <= 100
    if method == "nm":  # 1:10 in every group of 10 inputs: 784 = 78 x 10 + 4 -> 79 of 784 in fc1
        assert s["info"]["nm"] == "1:10" and s["info"]["nm_exact"]
        assert s["kept_pct"]["fc1"] == pytest.approx(100 * 79 / 784)
    else:
        assert s["sparsity"] == pytest.approx(0.9, abs=1e-5)
    if method == "rigl":
        assert s["info"]["step_time_s"]["updates"] == 2  # steps 2, 4 (< t_end = 5)


def test_han_sparsity_reaches_target_on_lenet5(tmp_path, monkeypatch, script):
    """LeNet-5's default schedule spans 8 rounds; with --sparsity one round must still reach it."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    argv = ["--model", "lenet5", "--method", "han", "--sparsity", "0.98", *TINY,
            "--epochs", "1", "--rounds", "1", "--retrain-epochs", "1", "--no-figures",
            "--threads", "0", "--out", str(tmp_path)]  # fmt: skip
    script.main(argv)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["kept_pct"]["total"] == pytest.approx(2.0, abs=1e-3)
