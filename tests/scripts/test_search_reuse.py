"""search_mnist.py --reuse keeps a finished run only when it is this search's run."""

from __future__ import annotations

import json
import sys

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT))
from scripts import search_mnist as sm  # noqa: E402


def test_reusable_only_for_the_same_command_and_fixed_values(tmp_path, monkeypatch):
    monkeypatch.setattr(sm, "ROOT", tmp_path)
    cmd = ["scripts/prune_mnist.py", "--preset", "lenet5", "--max-drop", "0.4", "--out", "r/a"]
    fixed = {"model": "lenet5", "epochs": 12}
    assert sm.reusable(cmd, fixed) is None  # nothing finished yet
    (tmp_path / "r" / "a").mkdir(parents=True)
    line = "python " + " ".join(cmd)
    s = {"command": line, "commands": [line], "test_images": 0, "args": dict(fixed)}
    f = tmp_path / "r" / "a" / "summary.json"
    f.write_text(json.dumps(s))
    assert sm.reusable(cmd, fixed) == s
    resumed = s | {"commands": [line, line + " --resume"], "command": line + " --resume"}
    f.write_text(json.dumps(resumed))
    assert sm.reusable(cmd, fixed) == resumed  # continued bit for bit: the same run
    for change in ({"args": {"model": "lenet5", "epochs": 13}}, {"test_images": 10000},
                   {"commands": ["python scripts/prune_mnist.py --preset lenet5"]},
                   {"commands": [line, line + " --max-drop 0.5"]}):  # fmt: skip
        f.write_text(json.dumps(s | change))
        assert sm.reusable(cmd, fixed) is None, change
