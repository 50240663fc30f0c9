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


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_imports_the_checkouts_sparsekern(path):
    """A script run from a checkout puts the checkout first on ``sys.path`` before any
    ``sparsekern`` import: an editable install of another checkout would otherwise supply the
    library (one_shot_lm.py ran another worktree's SparseGPT that way)."""
    body = ast.parse(path.read_text()).body

    def imports_sparsekern(n) -> bool:
        if isinstance(n, ast.ImportFrom):
            return (n.module or "").split(".")[0] in ("sparsekern", "scripts", "models")
        return isinstance(n, ast.Import) and any(
            a.name.split(".")[0] in ("sparsekern", "scripts", "models") for a in n.names
        )

    first = next((i for i, n in enumerate(body) if imports_sparsekern(n)), None)
    if first is None:
        return
    inserts = [
        i
        for i, n in enumerate(body)
        if isinstance(n, ast.Expr) and "sys.path.insert" in ast.unparse(n)
    ]
    assert inserts and inserts[0] < first, f"{path.name}: sys.path.insert after a package import"
