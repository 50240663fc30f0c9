"""The README's results table is what the committed summaries say (scripts/readme_results.py)."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT))
from scripts import readme_results as rr  # noqa: E402


def test_readme_matches_the_summaries():
    readme = (ROOT / "README.md").read_text()
    assert rr.render(readme, rr.block()) == readme, "run python scripts/readme_results.py"
    assert rr.main(["--check"]) == 0


def test_rows_come_from_the_files(tmp_path):
    """A changed summary changes the row: nothing in the block is typed by hand."""
    import json
    import shutil

    for m in rr.MODELS:
        shutil.copytree(ROOT / "results" / m, tmp_path / "results" / m)
    f = tmp_path / "results" / "lenet5" / "summary.json"
    s = json.loads(f.read_text())
    s["error_pct"], s["compression_weights"], s["val_images"] = 0.7, 30.0, 5000
    f.write_text(json.dumps(s))
    text = rr.block(tmp_path)
    dense = f"{s['error_dense_pct']:.2f}%"
    assert f"| **LeNet-5, sparsekern** | **{dense} -> 0.70%** |" in text and "**30.0x**" in text
    s["error_pct"] = 0.9
    f.write_text(json.dumps(s))
    assert "misses Han's row: +0.13 points of error at 2.50x his compression" in rr.block(tmp_path)
    assert "5,000 held out" in text.split("- LeNet-5:")[1]


def test_markers_required():
    with pytest.raises(ValueError, match="expected one"):
        rr.render("no markers here", "x")


def test_a_final_run_on_all_images_names_its_search(tmp_path):
    """Han trained on all 60,000 images: a final run without a validation split says so, and
    names the validation search whose choice it used only where every chosen knob is its own."""
    import json
    import shutil

    for m in rr.MODELS:
        shutil.copytree(ROOT / "results" / m, tmp_path / "results" / m)
    shutil.copytree(ROOT / "results" / "search", tmp_path / "results" / "search")
    f = tmp_path / "results" / "lenet5" / "summary.json"
    s = json.loads(f.read_text())
    chosen = json.loads((ROOT / "results" / "search" / "lenet5.json").read_text())["chosen"]
    s["val_images"], s["train_images"] = 0, 60000
    s["args"] = {**s["args"], "preset": "lenet5", "val_images": 0, **chosen}
    f.write_text(json.dumps(s))
    line = rr.block(tmp_path).split("- LeNet-5:")[1]
    assert "60,000 training images (all, as Han's; the knobs chosen on a validation split" in line
    assert "`results/search/lenet5.json`" in line and "tuned by hand" not in rr.block(tmp_path)
    s["args"]["max_drop"] = 0.123  # not the search's choice: hand-tuned
    f.write_text(json.dumps(s))
    assert "LeNet-5, sparsekern (no validation split: knobs tuned by hand)" in rr.block(tmp_path)
