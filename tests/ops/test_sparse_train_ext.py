"""The optional C++ extension loader: disabled by the env var, one warning on failure, never
raises, and `import sparsekern` compiles nothing."""

from __future__ import annotations

import subprocess
import sys
import warnings

from sparsekern.ops import _ext


def test_env_var_forces_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv(_ext.NO_EXT_ENV, "1")
    src = tmp_path / "x.cpp"
    src.write_text("#include <torch/extension.h>\n")
    assert _ext.load_extension("never_built", [src]) is None
    assert "never_built" not in _ext._LOADED


def test_failure_returns_none_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.delenv(_ext.NO_EXT_ENV, raising=False)
    src = tmp_path / "broken.cpp"
    src.write_text("this is not C++\n")
    name = f"broken_{tmp_path.name}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monkeypatch.setattr(_ext, "_build", lambda *a: (_ for _ in ()).throw(OSError("no cc")))
        assert _ext.load_extension(name, [src]) is None
        assert _ext.load_extension(name, [src]) is None  # cached failure: no second warning
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "OSError: no cc" in msgs[0] and "fallback" in msgs[0]
    assert _ext.extension_status()[name].startswith("OSError")


def test_import_compiles_nothing():
    code = (
        "import sparsekern, sparsekern.nn, sparsekern.ops, sys; "
        "print('torch.utils.cpp_extension' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_build_name_follows_the_source_path(tmp_path):
    """Two checkouts of the same source get two build folders: ninja rebuilds a folder whose
    sources moved, so a shared one recompiled at every switch between them."""
    a, b = tmp_path / "a" / "x.cpp", tmp_path / "b" / "x.cpp"
    for p in (a, b):
        p.parent.mkdir()
        p.write_text("int f() { return 1; }\n")
    name_a = _ext._build_name("x", [a], ["-O3"])
    assert name_a == _ext._build_name("x", [a], ["-O3"])  # stable
    assert name_a != _ext._build_name("x", [b], ["-O3"])  # same bytes, another path
    a.write_text("int f() { return 2; }\n")
    assert name_a != _ext._build_name("x", [a], ["-O3"])  # same path, other bytes


def test_a_loaded_extension_is_a_lookup(monkeypatch, tmp_path):
    """Once loaded (or refused), a call touches no logger: Logger.setLevel clears every logger's
    cache, 16 ms of a LeNet-300-100 step when the op paid it per call."""
    import logging

    monkeypatch.delenv(_ext.NO_EXT_ENV, raising=False)
    name = f"lookup_{tmp_path.name}"
    monkeypatch.setattr(_ext, "_build", lambda *a: object())
    first = _ext.load_extension(name, [tmp_path / "x.cpp"])
    calls = []
    monkeypatch.setattr(logging.Logger, "setLevel", lambda self, lvl: calls.append(lvl))
    for _ in range(5):
        assert _ext.load_extension(name, [tmp_path / "x.cpp"]) is first
    assert calls == []
