"""scripts/one_shot_*.py cache their dense model in --ckpt: checksummed, written atomically, and
refused (exit 2, before any pruning) when it was trained with other settings or has no checksum."""

import sys
from pathlib import Path

import pytest
import torch

from sparsekern.training import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _script(monkeypatch, name):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    sys.modules.pop(name, None)
    return __import__(name)


def _refused(main, args, capsys, match):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_one_shot_mnist_refuses_a_dense_ckpt_of_other_settings(tmp_path, monkeypatch, capsys):
    mod = _script(monkeypatch, "one_shot_mnist")
    from models.lenet import LeNet300100

    tiny = {f"{x}_{s}": torch.zeros(8, 1, 28, 28) if x == "x" else torch.zeros(8, dtype=torch.long)
            for x in ("x", "y") for s in ("train", "test")}  # fmt: skip
    monkeypatch.setattr(mod, "load_mnist", lambda root: tiny)  # the check comes before any use

    ckpt = tmp_path / "dense.pt"
    state = {"model": LeNet300100().state_dict(), "info": {"epochs": 10}}
    config = {"epochs": 10, "lr": 0.15, "seed": 0}
    save_checkpoint(ckpt, state | {"config": config}, mod.DENSE_FORMAT)
    args = ["--out", str(tmp_path / "out"), "--ckpt", str(ckpt), "--time-layer", "0"]
    _refused(mod.main, args + ["--lr", "0.3"], capsys, "'lr': 0.3")
    _refused(mod.main, args + ["--epochs", "2"], capsys, "'epochs': 2")
    torch.save({"model": state["model"], "info": {}}, ckpt)  # an old, unchecked cache
    _refused(mod.main, args, capsys, "plain torch.save file")


def test_one_shot_lm_saves_a_checked_ckpt_and_refuses_other_settings(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    mod = _script(monkeypatch, "one_shot_lm")
    ckpt = tmp_path / "dense.pt"
    args = ["--out", str(tmp_path), "--ckpt", str(ckpt), "--steps", "2", "--layers", "1",
            "--d", "16", "--heads", "2", "--ctx", "16", "--calib", "16"]  # fmt: skip

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    # no training, and stop right after the cache is written: this test is about the file
    monkeypatch.setattr(mod, "train", lambda model, data, args: {"train_seconds": 0.0})
    monkeypatch.setattr(mod, "perplexity", stop)
    with pytest.raises(Stop):
        mod.main(args)
    ck = load_checkpoint(ckpt, mod.DENSE_FORMAT)  # checksummed, with its training settings
    assert ck["config"]["steps"] == 2 and ck["config"]["d"] == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.pt"]  # no temporary left
    _refused(mod.main, args + ["--seed", "1"], capsys, "'seed': 1")
    with pytest.raises(Stop):  # --retrain: trains afresh and replaces it
        mod.main(args + ["--seed", "1", "--retrain"])
    assert load_checkpoint(ckpt, mod.DENSE_FORMAT)["config"]["seed"] == 1
