"""Every committed structured-pruning table is what its JSON gives (structured_report.py)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT))
from scripts._lib.structured_report import write_table  # noqa: E402

TABLES = sorted((ROOT / "results" / "structured").rglob("lenet5_mnist.json"))


@pytest.mark.parametrize("path", TABLES, ids=lambda p: str(p.parent.relative_to(ROOT)))
def test_committed_table_regenerates(path, tmp_path):
    write_table(json.loads(path.read_text()), tmp_path / "t.md")
    assert (tmp_path / "t.md").read_text() == path.with_suffix(".md").read_text()


def test_tables_found():
    assert len(TABLES) >= 4
