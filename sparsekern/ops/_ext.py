"""Optional C++/OpenMP extensions, built on first use and cached; never required.

``load_extension(name, sources)`` compiles ``sources`` with ``torch.utils.cpp_extension.load``
(ninja, the host C++ compiler, ``-O3 -fopenmp`` and ``-march=native`` where the compiler takes it,
so this CPU's AVX-512 is used where it has it) into torch's extension cache
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). The first call in a process
builds or loads it (a rebuild only when a source or a flag changed: the build name carries their
hash); later calls return the same module.

It never raises: on any failure (no compiler, no ninja, a compile error, a read-only cache) it
returns None and warns once per extension with the reason, and the caller runs its pure-torch
fallback. ``SPARSEKERN_NO_EXT=1`` forces that fallback (the tests cover both paths with it).
``import sparsekern`` compiles nothing: only the first op call that wants an extension does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import platform
import threading
import warnings
from types import ModuleType

__all__ = ["NO_EXT_ENV", "ext_disabled", "extension_status", "load_extension"]

NO_EXT_ENV = "SPARSEKERN_NO_EXT"
_DEFAULT_CFLAGS = ("-O3", "-fopenmp")  # the C++ standard is torch's own (c++20 for 2.14)
_LOCK = threading.Lock()
# name -> module, or None after a failure (so a failed build is tried once per process)
_LOADED: dict[str, ModuleType | None] = {}
_WHY: dict[str, str] = {}


def ext_disabled() -> bool:
    """True when ``SPARSEKERN_NO_EXT`` is set to something other than ``""``/``"0"``."""
    return os.environ.get(NO_EXT_ENV, "0") not in ("", "0")


def _arch_flags() -> list[str]:
    # -march=native turns on every ISA extension of the building CPU (avx512f/bw/vl/bf16 here);
    # the build name hashes the CPU model so a cache shared between machines never runs code
    # compiled for another CPU. Only x86-64/aarch64 hosts get it; others build portable code.
    if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        return ["-march=native"]
    return []


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def extension_status() -> dict[str, str]:
    """Per extension tried in this process: ``"loaded"``, or why it fell back."""
    return {k: ("loaded" if v is not None else _WHY.get(k, "failed")) for k, v in _LOADED.items()}


def load_extension(
    name: str,
    sources: list[pathlib.Path],
    extra_cflags: tuple[str, ...] | list[str] = (),
) -> ModuleType | None:
    """The compiled module for ``sources`` (C++ files using torch's extension API), or None.

    Args:
        name: a Python identifier; the build name adds a hash of the sources (paths and
            bytes), flags and CPU.
        sources: ``.cpp`` files (absolute paths).
        extra_cflags: flags beyond ``-O3 -fopenmp -march=native``.

    Returns None (with a one-time ``RuntimeWarning`` naming the reason) when the extension is
    disabled by ``SPARSEKERN_NO_EXT=1`` (no warning then: it was asked for) or cannot be built.
    """
    if ext_disabled():
        return None
    if name in _LOADED:
        return _LOADED[name]
    with _LOCK:
        if name in _LOADED:
            return _LOADED[name]
        module = None
        # cpp_extension logs "No CUDA runtime is found" at import on CPU-only hosts: not our
        # concern. Silenced here, on the build path only: Logger.setLevel clears every logger's
        # cache (~0.8 ms with torch's loggers), 16 ms of a 4 ms LeNet-300-100 step per op call.
        log = logging.getLogger("torch.utils.cpp_extension")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            module = _build(name, [pathlib.Path(s) for s in sources], list(extra_cflags))
        except Exception as exc:  # any failure means: fall back, never break the caller
            _WHY[name] = f"{type(exc).__name__}: {_first_error(str(exc))}"
            warnings.warn(
                f"sparsekern: the C++ extension {name!r} could not be built or loaded "
                f"({_WHY[name]}); running the pure-torch fallback (slower). Set "
                f"{NO_EXT_ENV}=1 to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
        finally:
            log.setLevel(level)
        _LOADED[name] = module
        return module


def _first_error(text: str) -> str:
    """The compiler's first ``error:`` line (the cause), else the message's last line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in lines:
        if "error:" in ln or "error " in ln.lower()[:12]:
            return ln[:300]
    return lines[-1][:300] if lines else "no message"


def _build_name(name: str, sources: list[pathlib.Path], cflags: list[str]) -> str:
    """``sparsekern_<name>_<12 hex>``: a hash of the sources' paths and bytes, the flags and
    the CPU model."""
    h = hashlib.sha256()
    for src in sources:
        # the path too: ninja rebuilds a build folder whose sources moved, so two checkouts
        # (worktrees, a venv's site-packages) sharing one folder recompiled at each switch,
        # holding every other process on the build lock for minutes
        h.update(str(src.resolve()).encode())
        h.update(src.read_bytes())
    h.update(" ".join(cflags).encode())
    h.update(_cpu_model().encode())
    return f"sparsekern_{name}_{h.hexdigest()[:12]}"


def _build(name: str, sources: list[pathlib.Path], extra: list[str]) -> ModuleType:
    import shutil
    import sys

    from torch.utils import cpp_extension  # imported here: `import sparsekern` stays light

    # torch finds ninja on PATH; the `ninja` wheel (a dependency) installs it beside the
    # interpreter, which is not on PATH when a venv's python runs without being activated
    bindir = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and shutil.which("ninja", path=bindir):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")

    cflags = [*_DEFAULT_CFLAGS, *_arch_flags(), *extra]
    build_name = _build_name(name, sources, cflags)
    return cpp_extension.load(
        name=build_name,
        sources=[str(s) for s in sources],
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )
