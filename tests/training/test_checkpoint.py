"""Checkpoints: atomic, tagged, validated before use; RNG state; resume differences."""

import pickle
import random

import pytest
import torch
from torch import nn

from sparsekern.training import (
    CheckpointError,
    load_checkpoint,
    load_run_checkpoint,
    resume_differences,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_dict_problems,
)


def test_save_is_atomic_and_load_validates(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model_name": "m", "x": torch.arange(3)}, "fmt/1")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind
    ck = load_checkpoint(path, "fmt/1", expect={"model_name": "m"})
    assert torch.equal(ck["x"], torch.arange(3)) and ck["format"] == "fmt/1"
    with pytest.raises(
        CheckpointError, match="expected a checkpoint of format 'fmt/2', got 'fmt/1'"
    ):
        load_checkpoint(path, "fmt/2")
    with pytest.raises(
        CheckpointError, match=r"is a checkpoint of \{'model_name': 'm'\}; expected"
    ):
        load_checkpoint(path, "fmt/1", expect={"model_name": "other"})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"cannot read it \(truncated or corrupted\?\)"):
        load_checkpoint(path, "fmt/1")


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"v": 1}, "f")
    with pytest.raises((AttributeError, pickle.PicklingError)):
        save_checkpoint(path, {"v": lambda: 0}, "f")  # cannot be pickled: fails mid-write
    assert load_checkpoint(path, "f")["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_run_checkpoint_checks_model_and_settings(tmp_path):
    model = nn.Linear(3, 2)
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model_name": "lin", "model": model.state_dict(),
                           "args": {"lr": 0.1, "out": "a"}}, "f")  # fmt: skip
    ck = load_run_checkpoint(path, "f", model, {"model_name": "lin"}, {"lr": 0.1, "out": "b"},
                             ignore={"out"})  # fmt: skip
    assert ck["args"]["lr"] == 0.1
    with pytest.raises(CheckpointError, match="--lr: saved 0.1, now 0.2"):
        load_run_checkpoint(path, "f", model, {"model_name": "lin"}, {"lr": 0.2, "out": "a"})
    with pytest.raises(CheckpointError, match="does not fit"):
        load_run_checkpoint(path, "f", nn.Linear(4, 2), {"model_name": "lin"})
    assert state_dict_problems(nn.Linear(4, 2), model.state_dict()) == [
        "weight: expected shape [2, 4], got [2, 3]"
    ]
    assert resume_differences({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 0}, ignore={"c"}) == [
        "--b: saved 2, now 3"
    ]


def test_rng_state_round_trip(tmp_path):
    state = rng_state()
    save_checkpoint(tmp_path / "r.pt", {"rng": state}, "f")
    a = (torch.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "r.pt", "f")["rng"])  # through weights_only
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
