"""Smoke run of scripts/one_shot_lm.py (a tiny model, a few steps): it trains, prunes with every
variant and writes its JSON, table and plot."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_one_shot_lm_smoke(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    sys.modules.pop("one_shot_lm", None)
    import one_shot_lm

    args = ["--out", str(tmp_path), "--ckpt", str(tmp_path / "dense.pt"), "--steps", "3",
            "--layers", "1", "--d", "32", "--heads", "2", "--ctx", "32",
            "--calib", "16"]  # fmt: skip
    one_shot_lm.main(args)
    result = json.loads((tmp_path / "lm.json").read_text())
    assert len(result["runs"]) == 3 * len(one_shot_lm.VARIANTS) == 18  # 3 patterns x 6 variants
    assert {r["method"] for r in result["runs"]} == set(one_shot_lm.VARIANTS)
    assert all(r["perplexity"] > 1 for r in result["runs"])
    assert (tmp_path / "lm.md").exists() and (tmp_path / "lm.png").exists()
