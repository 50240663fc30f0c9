"""Fixtures shared by the op tests."""

from __future__ import annotations

import pytest

from sparsekern.ops import _fresh


@pytest.fixture
def pooled_gradients(monkeypatch):
    """Every CPU fp32 weight gradient the package owns goes on a pooled mapping
    (``sparsekern/ops/_fresh.py``), as a large weight's does: small test shapes reach that path.
    Skips where the C++ extension cannot be built."""
    if _fresh.ext() is None:
        pytest.skip("the C++ extension cannot be built here")
    monkeypatch.setattr(_fresh, "FRESH_MIN", 0)
