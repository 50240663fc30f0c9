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
    assert len(msgs) == 1 and "OSError: ['no cc']" in msgs[0] and "fallback" in msgs[0]
    assert _ext.extension_status()[name].startswith("OSError")


def test_import_compiles_nothing():
    code = (
        "import sparsekern, sparsekern.nn, sparsekern.ops, sys; "
        "print('torch.utils.cpp_extension' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
