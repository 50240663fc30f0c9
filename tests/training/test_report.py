"""Reports: Table 1 rows and text, the methods table, model figures, git commit, atomic JSON."""

import json
import re

import pytest
import torch

from models import HAN_2015, METHOD_FIGURES, build_model
from scripts._lib.tables import format_table1, label_rows, methods_table, table1_rows
from sparsekern.training.report import git_commit, model_summary, run_info, write_json
from tests.helpers import ROOT


def test_table1_rows_and_text():
    rows = table1_rows(HAN_2015["lenet300"], {"error": 1.3}, {"error": 1.5}, 266_610, 21_000)
    assert [r["network"] for r in rows][2:] == ["LeNet-300-100 Ref (this run)",
                                               "LeNet-300-100 Pruned (this run)"]  # fmt: skip
    assert rows[3]["compression"] == pytest.approx(266_610 / 21_000)
    text = format_table1(rows)
    assert re.search(r"Pruned \(this run\)\s+1\.50%\s+21\.0K\s+12\.7x", text)
    none = table1_rows(HAN_2015["lenet300"], None, {"error": 2.0}, 266_610, 21_000)
    assert "-" in format_table1(none).splitlines()[3]  # no dense net (SNIP, RigL)
    top = table1_rows(
        HAN_2015["alexnet"],
        {"top1_error": 43.0, "top5_error": 20.0},
        {"top1_error": 43.1, "top5_error": 20.1},
        61_100_840,
        6_700_000,
    )
    assert "Top-5 err" in format_table1(top) and "61.10M" in format_table1(top)


def test_methods_table_sorts_and_picks_paper_figures():
    def run(model, method, sp, err):
        return {"args": {"model": model, "method": method, "sparsity": sp}, "epochs": 6,
                "error_pct": err, "sparsity": sp, "wall_time_s": 10.0,
                "kept_pct": {"fc1": 5.0, "total": 5.0}}  # fmt: skip

    names = {k: v["name"] for k, v in HAN_2015.items()}
    out = methods_table([run("lenet300", "snip", 0.95, 2.0), run("lenet300", "han", 0.95, 1.9),
                         run("lenet300", "snip", 0.9, 1.8)], names, METHOD_FIGURES)  # fmt: skip
    lines = out.splitlines()[2:]
    assert [x.split("|")[3].strip() for x in lines] == ["snip", "han", "snip"]
    assert "95% / 1.6%" in lines[2] and "| - |" in lines[0]  # SNIP's figure at its sparsity only


def test_model_summary_and_labels():
    model = build_model("lenet300")
    with torch.no_grad():
        model.fc1.mask[:, :392] = False
    s = model_summary(model)
    assert s["weights_dense"] == 266_200 and s["biases"] == 410
    assert s["weights_kept"] == 266_200 - 300 * 392
    assert s["kept_pct"]["fc1"] == 50.0 and len(s["mask_sha256"]) == 64
    rows = label_rows([{"layer": "classifier.1"}, {"layer": "total"}], {"fc6": "classifier.1"},
                      {"fc6": 0.09})  # fmt: skip
    assert rows[0] == {"layer": "fc6 (classifier.1)", "paper_name": "fc6",
                       "paper_weights_kept_pct": 9.0} and rows[1] == {"layer": "total"}  # fmt: skip


def test_git_commit_run_info_and_write_json(tmp_path):
    c = git_commit(ROOT)
    assert re.fullmatch(r"[0-9a-f]{40}", c["commit"]) and isinstance(c["dirty"], bool)
    assert git_commit(tmp_path) == {"commit": None, "dirty": None}
    info = run_info(ROOT)
    assert info["torch"] == torch.__version__ and info["threads"] >= 1
    write_json(tmp_path / "s.json", {"a": 1.5})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1.5}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_dirty_means_code_not_results(tmp_path):
    import subprocess

    def git(*a):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=tmp_path,
                       check=True, capture_output=True)  # fmt: skip

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    assert git_commit(tmp_path)["dirty"] is False
    (tmp_path / "results" / "summary.json").write_text('{"a": 1}')  # a run writes its results
    assert git_commit(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path / "results")["dirty"] is True  # from any folder of the tree
