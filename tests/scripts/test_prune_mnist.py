"""scripts/prune_mnist.py, run as a program: a smoke run of each LeNet; every method killed after
an epoch and resumed ends bit for bit where an uninterrupted run ends; a resume with changed
settings is refused; bad command lines are rejected by argparse before any work starts; a small
deterministic configuration reproduces the committed summary exactly (CI's reproduction check)."""

import json

import pytest

from tests.helpers import ROOT, rejected, run_script

SCRIPT = ROOT / "scripts" / "prune_mnist.py"
# 1,000 training images (7 steps of 128 per epoch), 500 test images, 500 for the sensitivity
TINY = ["--subset", "1000", "--test-subset", "500", "--sens-n", "500", "--no-progress"]
TINY += ["--inference-budget", "0.5"]  # seconds per batch size timing the export


def run(*args, **kw):
    return run_script(SCRIPT, *args, **kw)


@pytest.mark.parametrize("model", ["lenet300", "lenet5"])
def test_quick_smoke(tmp_path, model):
    out = run("--model", model, "--quick", *TINY, "--out", tmp_path).stdout
    assert "Table 1 (Han et al. 2015)" in out and "Weights%" in out  # Table 1 and Table 2
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["weights_dense"] == {"lenet300": 266_200, "lenet5": 430_500}[model]
    assert 0 < s["weights_kept"] < s["weights_dense"] and s["compression_weights"] > 1
    assert s["command"].startswith("python scripts/prune_mnist.py --model")
    assert len(s["run"]["commit"]) == 40  # the git commit that produced it
    assert [p["name"] for p in s["plan"]][:2] == ["dense", "round 1"]
    comp = tmp_path / s["compressed_file"]["path"]
    assert comp.stat().st_size == s["compressed_file"]["file_bytes"]
    assert s["compressed_file"]["round_trip"] == "exact"
    for fig in s["figures"]:
        assert (tmp_path / fig).stat().st_size > 1000
    assert "fig7_weight_hist.png" in s["figures"]
    # the exported model timed against dense (issue 14's main-job report), then again from the
    # finished run's files by scripts/export_mnist.py
    for again in (False, True):
        if again:
            run_script(ROOT / "scripts" / "export_mnist.py", tmp_path, "--budget", "0.5")
        inf = json.loads((tmp_path / "inference.json").read_text())
        script = "export_mnist.py" if again else "prune_mnist.py"
        assert inf["command"].startswith(f"python scripts/{script}"), inf["command"]
        assert [r["batch"] for r in inf["model"]] == [1, 64]
        assert all(r["dense_ms"] > 0 and r["exported_ms"] > 0 for r in inf["model"])
        assert [c["name"] for c in inf["layers"]] == list(s["kept_pct"])[:-1]  # all but "total"
        assert inf["max_abs_diff"] < 1e-3


RESUME = {  # per method: a configuration of 3 epochs, killed (stopped) after the first
    "han": ["--epochs", "1", "--rounds", "2", "--retrain-epochs", "1", "--dropout", "0.2"],
    "global": ["--sparsity", "0.9", "--total-epochs", "3", "--prune-at", "0.34"],
    "gradual": ["--sparsity", "0.9", "--total-epochs", "3", "--gradual-freq", "2"],
    "snip": ["--sparsity", "0.9", "--total-epochs", "3"],
    "rigl": ["--sparsity", "0.9", "--total-epochs", "3", "--rigl-delta", "3"],
    "nm": ["--nm", "2:4", "--total-epochs", "3", "--prune-at", "0.34"],
}
SAME = ("error_pct", "weights_kept", "kept_pct", "phases", "prunes", "mask_sha256", "state_sha256")


@pytest.mark.parametrize("method", list(RESUME))
def test_resume_after_a_kill_equals_uninterrupted(tmp_path, method):
    cfg = ["--model", "lenet300", "--method", method, *RESUME[method], *TINY, "--no-figures"]
    cfg += ["--seed", "3"]
    run(*cfg, "--out", tmp_path / "a")
    out = run(*cfg, "--out", tmp_path / "b", "--stop-after-epochs", "1").stdout
    assert "stopped after 1 epochs" in out and not (tmp_path / "b" / "summary.json").exists()
    out = run(*cfg, "--out", tmp_path / "b", "--resume").stdout
    assert "resumed at epoch 1" in out
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    for key in SAME:  # every loss, error, mask and weight, bit for bit
        assert a[key] == b[key], key
    assert len(b["commands"]) == 2 and "--resume" in b["commands"][1]
    assert a["sparsity"] > 0.45  # it did prune
    if method == "han":
        assert a["phases"][-1]["name"] == "round 2"


def test_resume_refuses_changed_settings_and_foreign_files(tmp_path):
    cfg = ["--model", "lenet300", "--epochs", "1", "--rounds", "1", "--retrain-epochs", "1"]
    cfg += [*TINY, "--no-figures", "--out", str(tmp_path)]
    run(*cfg, "--stop-after-epochs", "1")
    before = (tmp_path / "ckpt.pt").read_bytes()
    proc = run(*cfg, "--resume", "--lr", "0.05", check=False)
    assert proc.returncode != 0
    assert (
        "--lr: saved 0.15, now 0.05" in proc.stderr
        and "a resumed run must be one run" in proc.stderr
    )
    proc = run(*cfg, check=False)  # a fresh run over the checkpoint: refused
    assert proc.returncode == 2 and "expected --resume (continue it) or --overwrite" in proc.stderr
    (tmp_path / "ckpt.pt").write_bytes(before[: len(before) // 2])
    proc = run(*cfg, "--resume", check=False)
    assert proc.returncode != 0 and "truncated or corrupted" in proc.stderr
    assert (tmp_path / "ckpt.pt").read_bytes() == before[: len(before) // 2]  # left as it was


BAD = [  # the adversarial pass's values: each must end in argparse's usage error, exit 2
    ("--epochs", "0"), ("--epochs", "-1"), ("--epochs", "x"), ("--batch-size", "0"),
    ("--batch-size", "-5"), ("--batch-size", "70000"), ("--rounds", "-2"), ("--rounds", "0"),
    ("--retrain-epochs", "-1"), ("--lr", "0"), ("--lr", "-0.1"), ("--lr", "nan"),
    ("--lr", "inf"), ("--subset", "-10"), ("--subset", "50"), ("--test-subset", "-1"),
    ("--sparsity", "1.5"), ("--sparsity", "1"), ("--sparsity", "-0.1"),
    ("--sparsity", "fc9=0.5"), ("--sparsity", "fc1=0.5,fc1=0.6"), ("--quality", "-1"),
    ("--quality", "fc1=x"), ("--max-drop", "0"), ("--sens-n", "0"), ("--sens-n", "70000"),
    ("--dropout", "1.0"), ("--dropout", "-0.2"), ("--reg-strength", "-1"),
    ("--warmup-epochs", "100"), ("--retrain-lr-factor", "0"), ("--threads", "-1"),
    ("--schedule-rounds", "1"), ("--data", "/nonexistent"), ("--seed", "-1"),
    ("--method", "global"), ("--method", "global --sparsity 0.9 --min-density 0.5"),
    ("--method", "gradual --sparsity 0.9 --gradual-start 0.8 --gradual-end 0.2"),
    ("--method", "nm --nm 5:4"), ("--method", "nm --nm 2-4"), ("--method", "rigl --sparsity "
    "0.9 --rigl-end 0"), ("--method", "snip --sparsity fc1=0.9"), ("--method", "rigl "
    "--sparsity 0.9 --quality 1.0"), ("--prune-at", "1.5"), ("--rigl-delta", "0"),
    ("--quality", "1.0 --sparsity 0.9"), ("--model", "lenet7"),
    ("--method", "snip --sparsity 0.9 --snip-batches 500"),
]  # fmt: skip


def test_bad_command_lines_are_rejected_before_any_work(tmp_path):
    cases = [["--out", str(tmp_path / f"c{i}"), f, *v.split()] for i, (f, v) in enumerate(BAD)]
    results = rejected(SCRIPT, [["--help"], *cases])[1:]  # --help: the imports, once
    for (flag, value), (code, err, seconds) in zip(BAD, results):
        assert code == 2, (flag, value, code, err[-500:])
        assert "error:" in err and "Traceback" not in err, (flag, value, err[-500:])
        assert seconds < 1.0, (flag, value, seconds)  # argparse, not after some training
    assert not any(tmp_path.iterdir())  # nothing written


def test_ci_summary_reproduces_exactly(tmp_path):
    """results/ci/lenet300-tiny/summary.json came from its recorded command on a 2-core CPU (1
    thread, deterministic algorithms); the same command must give the same run, bit for bit on a
    CPU whose torch kernels dispatch to the same vector ISA (``cpu_capability``): every phase's
    losses and errors, the kept counts, the masks' and the state's SHA-256. On another ISA (AVX2
    against AVX-512: MKL and ATen sum in other orders) the float sums differ in their last bits:
    measured, the losses by at most 6e-8 relative with the same masks, kept counts and errors; there
    the losses are compared to 1e-6 and the rest exactly, the weights' digest not at all."""
    ref = json.loads((ROOT / "results" / "ci" / "lenet300-tiny" / "summary.json").read_text())
    argv = ref["command"].split()[2:]
    i = argv.index("--out")
    argv[i + 1] = str(tmp_path)
    run(*argv)
    got = json.loads((tmp_path / "summary.json").read_text())
    same_isa = ref["run"]["cpu_capability"] == got["run"]["cpu_capability"]
    cpu = f"committed on {ref['run']['cpu']!r} {ref['run']['cpu_capability']}, running on "
    cpu += f"{got['run']['cpu']!r} {got['run']['cpu_capability']}"
    for key in ("prunes", "weights_kept", "kept_pct", "error_pct", "mask_sha256"):
        assert got[key] == ref[key], f"{key} differs ({cpu})"
    if same_isa:
        assert got["phases"] == ref["phases"], f"phases differ ({cpu})"
        assert got["state_sha256"] == ref["state_sha256"], f"weights differ ({cpu})"
        return
    for a, b in zip(got["phases"], ref["phases"], strict=True):
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-6), f"{a['name']} ({cpu})"
        rest = {k: v for k, v in a.items() if k != "losses"}
        assert rest == {k: v for k, v in b.items() if k != "losses"}, f"{a['name']} ({cpu})"
