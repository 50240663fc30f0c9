"""Every script refuses nonsense on its command line with argparse's usage error (exit 2, an
"error:" line, no traceback) before any work: nothing written, well under a second a case. The
cases are the adversarial pass's (issue 27, items 6 and 7)."""

import json
import sys

import pytest

from tests.helpers import ROOT, rejected

S = ROOT / "scripts"


@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("not a folder")
    return str(f)


def check_rejected(script, cases, tmp_path, budget=1.5):
    results = rejected(S / script, [["--help"], *cases])[1:]  # --help: the imports, once
    for argv, (code, err, seconds) in zip(cases, results):
        assert code == 2, (script, argv, code, err[-600:])
        assert "error:" in err and "Traceback" not in err, (script, argv, err[-600:])
        assert seconds < budget, (script, argv, seconds)  # argparse, not after some training


def test_prune_mnist(tmp_path, a_file):
    out = ["--out", str(tmp_path / "o")]
    cases = [
        ["--out", a_file], ["--out", a_file + "/sub"], ["--preset", "bogus"],
        ["--preset", "lenet5", "--model", "lenet300"], ["--val-images", "-1"],
        ["--val-images", "30000"], ["--epochs", "0", *out], ["--batch-size", "0", *out],
        ["--sparsity", "1", *out], ["--model", "lenet7", *out], ["--data", "/nonexistent", *out],
        # the mask-learning methods' options
        ["--method", "srste", *out], ["--method", "nmdecay", "--nm", "2:5x", *out],
        ["--method", "scl", "--nm", "2:4", "--sparsity", "0.9", *out],
        ["--method", "srste", "--nm", "2:4", "--sparsity", "0.9", *out],
        ["--method", "nmstruct", "--sparsity", "0.995", *out], ["--method", "gibbs", *out],
        ["--method", "srste", "--sparsity", "0.9", "--srste-decay", "-1", *out],
        ["--method", "gap", "--sparsity", "0.9", "--gap-interval", "0", *out],
        ["--method", "gap", "--sparsity", "0.9", "--gap-interval", "1.5", *out],
        ["--method", "earlycrop", "--sparsity", "0.9", "--crop-max-epoch", "0", *out],
        ["--method", "earlycrop", "--sparsity", "0.9", "--crop-max-epoch", "nan", *out],
    ]  # fmt: skip
    check_rejected("prune_mnist.py", cases, tmp_path)
    assert not (tmp_path / "o").exists()


def test_prune_structured(tmp_path, a_file):
    out = ["--out", str(tmp_path / "o")]
    cases = [
        ["--dense-epochs", "-1"], ["--dense-epochs", "0"], ["--batch-size", "0"],
        ["--amounts", "1.5"], ["--amounts", "1"], ["--amounts", "0"], ["--amounts", "x"],
        ["--methods", "bogus"], ["--methods", "l1,l1"], ["--methods", "scratch"],
        ["--rounds", "0"], ["--lr", "-1"], ["--ft-epochs", "-1"], ["--taylor-batches", "0"],
        ["--subset", "-3"], ["--subset", "10"], ["--data", "/nonexistent"], ["--out", a_file],
    ]  # fmt: skip
    check_rejected("prune_structured.py", [c + out if "--out" not in c else c for c in cases],
                   tmp_path)  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_one_shot_mnist(tmp_path, a_file):
    out = ["--out", str(tmp_path / "o"), "--ckpt", str(tmp_path / "c" / "dense.pt")]
    cases = [
        ["--calib", "-5"], ["--calib", "0"], ["--calib", "70000"], ["--epochs", "0"],
        ["--epochs", "-1"], ["--lr", "0"], ["--sparsities", "1.0"], ["--sparsities", "0.5,x"],
        ["--time-layer", "-1"], ["--seed", "-1"], ["--data", "/nonexistent"],
    ]  # fmt: skip
    cases = [c + out for c in cases]
    cases += [["--out", a_file, "--ckpt", str(tmp_path / "c.pt")], ["--ckpt", str(tmp_path)]]
    check_rejected("one_shot_mnist.py", cases, tmp_path)
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_export_mnist(tmp_path, a_file):
    run = str(ROOT / "results" / "ci" / "lenet300-tiny")
    cases = [["/nonexistent"], [a_file], [str(tmp_path)], [run, "--threads", "0"],
             [run, "--threads", "-1"], [run, "--budget", "0"],
             [run, "--budget", "nan"]]  # fmt: skip
    check_rejected("export_mnist.py", cases, tmp_path)


def test_methods_table(tmp_path, a_file):
    (tmp_path / "empty").mkdir()
    cases = [
        ["--methods", "bogus"], ["--methods", "han,bogus"], ["--models", "lenet7"],
        ["--sparsities", "1.0"], ["--sparsities", "0"], ["--table", "/nonexistent"],
        ["--table", str(tmp_path / "empty")], ["--table", a_file],
        ["--table", str(ROOT / "results" / "methods"), "--quick"], ["--runs", a_file],
        ["--results", a_file], ["--methods", "han,snip", "--nm-24"],
        ["--methods", "srste,scl,bogus", "--nm-24"], ["--into", a_file],
        ["--table", str(ROOT / "results" / "methods"), "--into", a_file],
    ]  # fmt: skip
    check_rejected("methods_table.py", cases, tmp_path)


def test_methods_table_into(tmp_path):
    """--into rewrites only the block between the markers, and results/methods.md holds exactly
    what the committed summaries give."""
    sys.path.insert(0, str(ROOT))
    from scripts import methods_table as mt

    md = tmp_path / "m.md"
    md.write_text(f"head\n{mt.BEGIN}\nold\n{mt.END}\ntail\n")
    mt.write_into(md, "new")
    assert md.read_text() == f"head\n{mt.BEGIN}\nnew\n{mt.END}\ntail\n"
    committed = (ROOT / "results" / "methods.md").read_text()
    text = mt.print_table(ROOT / "results" / "methods")
    assert f"{mt.BEGIN}\n{text}\n{mt.END}" in committed


def test_search_mnist(tmp_path, a_file):
    cases = [["--preset", "bogus"], ["--preset", "lenet300", "--jobs", "0"],
             ["--preset", "lenet300", "--out", str(tmp_path)], []]  # fmt: skip
    check_rejected("search_mnist.py", cases, tmp_path)


@pytest.mark.parametrize("script", ["packnet", "omni", "multitask", "federated"])
def test_many_task_scripts(script, tmp_path, a_file):
    cases = [["--data", str(tmp_path / "nowhere")], ["--out", a_file], ["--preset", "bogus"]]
    check_rejected(f"{script}_mnist.py", cases, tmp_path)


def test_one_shot_lm(tmp_path, a_file):
    cases = [["--steps", "0"], ["--heads", "3"], ["--lr", "-1"], ["--calib", "-5"],
             ["--out", a_file]]  # fmt: skip
    check_rejected("one_shot_lm.py", cases, tmp_path)


def test_prune_imagenet_out_is_a_file(tmp_path, a_file):
    check_rejected("prune_imagenet.py", [["--synthetic", "--tiny", "--out", a_file]], tmp_path)


def test_quick_never_overrides_a_given_value():
    from scripts import prune_structured

    args = prune_structured.parse_args(["--quick", "--amounts", "0.3", "--out", "/tmp/x"])
    assert args.amounts == [0.3] and args.dense_epochs == 1  # given: kept; the rest: --quick
    assert prune_structured.parse_args(["--out", "/tmp/x"]).amounts == [0.5, 0.7]


def test_methods_table_quick_runs_and_tabulates(tmp_path):
    """The CI variant of `make methods`: two methods at CI budgets, then the table, with SNIP's
    paper figure beside its row only at the paper's sparsity."""
    from tests.helpers import run_script

    runs = tmp_path / "runs"
    out = run_script(S / "methods_table.py", "--quick", "--models", "lenet300", "--methods",
                     "han,snip", "--sparsities", "0.95", "--runs", runs).stdout  # fmt: skip
    assert "| LeNet-300-100 | 95% | han | 2 |" in out  # Han spends the same 2 epochs
    assert "| LeNet-300-100 | 95% | snip | 2 |" in out and "95% / 1.6%" in out
    table = (runs / "summaries" / "table.md").read_text()
    assert table.count("| LeNet-300-100 |") == 2


NEW_METHODS = "scl,nmdecay,nmstruct,srste,gap,gibbs,earlycrop"


def test_methods_table_quick_runs_the_mask_learning_methods(tmp_path):
    """Every mask-learning method through prune_mnist.py at the CI budget (LeNet-300-100, 1,000
    images, 2 epochs), 1:10 at 90% and 2:4 with --nm-24 for the N:M family, into the table: the
    exact sparsity (N:M: exact N of every M, the last partial group of fc1's 784 inputs keeps 1 of
    4), the pattern beside the method, Early-CROP's pruning point and FLOPs saved under it."""
    from tests.helpers import run_script

    runs = tmp_path / "runs"
    argv = ["--quick", "--models", "lenet300", "--methods", NEW_METHODS, "--sparsities", "0.9"]
    out = run_script(S / "methods_table.py", *argv, "--nm-24", "--runs", runs).stdout
    table = (runs / "summaries" / "table.md").read_text()
    assert table.count("| LeNet-300-100 |") == 7 + 3
    for m in ("scl", "gap", "gibbs", "earlycrop"):
        assert f"| LeNet-300-100 | 90% | {m} | 2 |" in table
        run = json.loads((runs / f"lenet300_{m}_s90" / "summary.json").read_text())
        assert run["sparsity"] == pytest.approx(0.9, abs=1e-9), m  # exactly the target
    for m in ("nmdecay", "nmstruct", "srste"):
        assert f"| LeNet-300-100 | 90% | {m} 1:10 | 2 |" in table
        assert f"| LeNet-300-100 | 50% | {m} 2:4 | 2 |" in table
        one_ten = json.loads((runs / f"lenet300_{m}_s90" / "summary.json").read_text())
        assert one_ten["kept_pct"]["fc1"] == pytest.approx(100 * (78 + 1) / 784)
        assert [one_ten["kept_pct"][k] for k in ("fc2", "fc3")] == [10.0, 10.0]
        two_four = json.loads((runs / f"lenet300_{m}_2of4" / "summary.json").read_text())
        assert two_four["sparsity"] == 0.5 and two_four["args"]["nm"] == [2, 4]
    crop = json.loads((runs / "lenet300_earlycrop_s90" / "summary.json").read_text())
    c = crop["early_crop"]
    assert (c["pruned_at_epoch"], c["pruned_at_step"]) == (1, 7)  # 1,000 // 128 steps an epoch
    assert crop["sparsity"] == pytest.approx(0.9, abs=1e-6)
    assert c["flops_saved"] == pytest.approx(0.5 * 0.9)  # dense half, then 10% of the MACs
    assert "earlycrop, LeNet-300-100 90%, 2 epochs: pruned at the end of epoch 1 (step 7" in out
    assert "45.0% of the FLOPs saved" in out


def test_structured_weights_arm_matches_the_structured_parameter_count():
    """The unstructured control of the TTS claim keeps exactly as many parameters as the
    structured net at the same amount, with pruned weights exactly zero, and its kept-weight
    MACs count each kept conv weight once per output position."""
    import torch

    from scripts import prune_structured as ps
    from sparsekern.pruning.structured import count_params

    torch.manual_seed(0)
    x = torch.randn(256, 1, 28, 28)
    data = {"x_train": x, "y_train": torch.randint(0, 10, (256,)), "x_test": x[:8]}
    args = ps.parse_args(["--rounds", "2", "--ft-epochs", "0", "--out", "/tmp/x"])
    dense = ps.LeNet5BN()
    gen = torch.Generator().manual_seed(0)
    model, params, macs = ps.prune_weights(args, data, gen, dense, 0.7)
    assert params == ps.structured_params(dense, x[:1], 0.7) < count_params(dense)
    kept = {n: int(m.weight.count_nonzero()) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}  # fmt: skip
    assert params == count_params(dense) - sum(
        m.weight.numel()
        for m in dense.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ) + sum(kept.values())
    assert macs == kept["conv1"] * 24 * 24 + kept["conv2"] * 8 * 8 + kept["fc1"] + kept["fc2"]
