"""Files that cannot lie: checksummed checkpoints (every flipped byte refused), a resume with
another thread count refused, strict JSON without NaN, and save errors that name the target."""

import errno
import json
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

from sparsekern.formats import save_compressed
from sparsekern.training import (
    CheckpointError,
    JsonLog,
    load_checkpoint,
    load_run_checkpoint,
    save_checkpoint,
    write_json,
)
from sparsekern.training.checkpoint import CHECKPOINT_MAGIC


def test_every_flipped_byte_of_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.manual_seed(0)
    save_checkpoint(path, {"model": nn.Linear(4, 3).state_dict(), "epoch": 3}, "f/1")
    data = path.read_bytes()
    assert data.startswith(CHECKPOINT_MAGIC)
    assert load_checkpoint(path, "f/1")["epoch"] == 3
    bad = tmp_path / "bad.pt"
    step = max(1, len(data) // 300)  # ~300 flips spread over magic, zip archive and checksum
    for i in sorted(set(range(0, len(data), step)) | set(range(len(data) - 40, len(data)))):
        corrupt = bytearray(data)
        corrupt[i] ^= 1 << (i % 8)
        bad.write_bytes(bytes(corrupt))
        with pytest.raises(CheckpointError, match=r"cannot read it \(truncated or corrupted\?\)"):
            load_checkpoint(bad, "f/1")
    bad.write_bytes(data + b"\0")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(bad, "f/1")


def test_a_plain_torch_save_file_is_refused_clearly(tmp_path):
    path = tmp_path / "dense.pt"
    torch.save({"format": "f/1", "model": {}}, path)
    with pytest.raises(CheckpointError, match="got a plain torch.save file"):
        load_checkpoint(path, "f/1")


def test_a_resume_with_another_thread_count_is_refused(tmp_path):
    model = nn.Linear(3, 2)
    path = tmp_path / "c.pt"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        save_checkpoint(path, {"model": model.state_dict(), "args": {"threads": 1}}, "f")
        assert load_checkpoint(path, "f")["torch_threads"] == 1
        torch.set_num_threads(2)
        # even where the script lists --threads as result-free (ignore), the count is checked
        with pytest.raises(
            CheckpointError, match=r"1 torch thread\(s\), this run has 2.*--threads 1"
        ):
            load_run_checkpoint(path, "f", model, {}, {"threads": 2}, ignore={"threads"})
        load_run_checkpoint(path, "f", model, {})  # not a resume (args None): any thread count
        torch.set_num_threads(1)
        load_run_checkpoint(path, "f", model, {}, {"threads": 1})
    finally:
        torch.set_num_threads(before)


def _no_tmp_named(e: BaseException, target) -> None:
    assert str(target) in str(e) and ".tmp" not in str(e), str(e)


def test_save_errors_name_the_target(tmp_path, monkeypatch):
    missing = tmp_path / "no" / "such" / "dir"
    model = nn.Linear(2, 2)
    with pytest.raises(FileNotFoundError) as e:
        save_checkpoint(missing / "ckpt.pt", {"x": 1}, "f")
    _no_tmp_named(e.value, missing / "ckpt.pt")
    with pytest.raises(FileNotFoundError) as e:
        write_json(missing / "summary.json", {"a": 1})
    _no_tmp_named(e.value, missing / "summary.json")
    with pytest.raises(FileNotFoundError) as e:
        save_compressed(model, missing / "m.skr")
    _no_tmp_named(e.value, missing / "m.skr")

    # a read-only folder (simulated: the tests may run as root, who may write anywhere)
    def denied(dir=None, prefix="", suffix=""):
        name = f"{dir}/{prefix}abc{suffix}"
        raise PermissionError(errno.EACCES, "Permission denied", name)

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError) as e:
        save_checkpoint(tmp_path / "ckpt.pt", {"x": 1}, "f")
    _no_tmp_named(e.value, tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []


def _strict_load(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_write_json_is_strict_and_flags_non_finite_values(tmp_path):
    path = tmp_path / "s.json"
    obj = {"loss": [0.5, float("nan")], "best": {"error": float("inf")}, "n": np.int64(3),
           "x": torch.tensor(0.25), "ok": True, "none": None}  # fmt: skip
    write_json(path, obj)
    got = _strict_load(path.read_text())
    flags = {"loss/1": "nan", "best/error": "inf"}
    assert got == {"loss": [0.5, None], "best": {"error": None}, "n": 3, "x": 0.25, "ok": True,
                   "none": None, "nonfinite_values": flags}  # fmt: skip
    assert isinstance(got["n"], int)
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]
    with pytest.raises(ValueError, match=r"expected finite numbers, got \{'loss/1': 'nan'"):
        write_json(tmp_path / "r.json", obj, nonfinite="raise")
    with pytest.raises(ValueError, match="only in a dict"):
        write_json(tmp_path / "l.json", [float("-inf")])
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "l.json").exists()
    write_json(path, {"a": 1.5})  # finite: no flag
    assert _strict_load(path.read_text()) == {"a": 1.5}


def test_json_log_lines_are_strict(tmp_path):
    log = JsonLog(tmp_path / "log.jsonl")
    log("epoch", step=3, loss=float("nan"), lr=0.1)
    line = (tmp_path / "log.jsonl").read_text().splitlines()[0]
    rec = _strict_load(line)
    assert rec["loss"] is None and rec["nonfinite_values"] == {"loss": "nan"} and rec["lr"] == 0.1
