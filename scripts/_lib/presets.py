"""Presets, nanoGPT's ``config/*.py`` style: a preset is a Python file in ``scripts/config/``
whose module-level names are a script's argument names (argparse ``dest`` form, e.g.
``max_drop``); flags given on the command line override them. ``search`` and names starting with
``search_`` belong to ``scripts/search_mnist.py``, not to the run."""

from __future__ import annotations

import runpy
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "config"


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG.glob("*.py") if not p.stem.startswith("_"))


def load_preset(name: str) -> dict:
    """The preset ``scripts/config/<name>.py`` (or a path to a ``.py`` file) as ``{name:
    value}``: its public module-level names, modules and functions left out. Raises
    ``ValueError`` naming the presets there are when there is no such file."""
    path = Path(name) if name.endswith(".py") else CONFIG / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"expected a preset among {preset_names()} or a .py file, got {name!r}")
    ns = runpy.run_path(str(path))
    return {k: v for k, v in ns.items() if not k.startswith("_") and not callable(v)
            and type(v).__name__ != "module"}  # fmt: skip


def run_settings(preset: dict) -> dict:
    """The preset without the search's names."""
    return {k: v for k, v in preset.items() if k != "search" and not k.startswith("search_")}
