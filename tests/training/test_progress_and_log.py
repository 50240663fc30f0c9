"""Progress bar and messages on one terminal: every message on a line of its own. JSON lines."""

import io
import json
import sys

from sparsekern.training import JsonLog, Progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_messages_never_share_the_bars_line(monkeypatch):
    term = _Tty()  # stdout and stderr are one terminal
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    bar = Progress(total=100)
    assert bar.bar is not None  # a terminal: the bar is drawn
    for i in range(100):
        bar.update()
        bar.describe(f"epoch {i // 10}")
        if i % 25 == 0:
            bar.write(f"message {i}")
        bar.bar.refresh()  # draw now (tqdm redraws at most once a second)
    bar.close()
    text = term.getvalue()
    for i in (0, 25, 50, 75):
        lines = [seg for line in text.split("\n") for seg in [line.split("\r")[-1]]]
        assert f"message {i}" in lines  # what the terminal shows on that line: the message only
    assert text.count("message") == 4


def test_no_bar_off_a_terminal_and_notes(capsys):
    bar = Progress(total=10)  # pytest's captured stderr is not a terminal
    assert bar.bar is None
    bar.update(5)
    bar.note("epoch 1: loss 0.5")
    bar.write("done")
    quiet = Progress(total=10, quiet=True)
    quiet.write("rank 1 says nothing")
    assert capsys.readouterr().out == "epoch 1: loss 0.5\ndone\n"


def test_json_lines(tmp_path):
    log = JsonLog(tmp_path / "sub" / "log.jsonl")
    log("dense_epoch", 10, loss=0.5, epoch=1)
    log("done", None, error=1.0)
    recs = log.read()
    assert [r["event"] for r in recs] == ["dense_epoch", "done"]
    assert recs[0]["step"] == 10 and recs[0]["loss"] == 0.5 and "time" in recs[0]
    lines = (tmp_path / "sub" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["event"] for x in lines] == ["dense_epoch", "done"]
    off = JsonLog(tmp_path / "off.jsonl", enabled=False)
    off("x")
    assert not (tmp_path / "off.jsonl").exists()
