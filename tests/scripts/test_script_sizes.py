"""Scripts stay thin (issue 27): no script over 400 lines, no main() over 80."""

import ast

import pytest

from tests.helpers import ROOT

SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_is_thin(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 400, path.name
    mains = [n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert len(mains) == 1, f"{path.name}: expected one main()"
    assert mains[0].end_lineno - mains[0].lineno + 1 <= 80, path.name
