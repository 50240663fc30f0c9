"""Strict JSON files and a JSON-lines event log.

* :func:`write_json`: one object as indented JSON, written atomically.
* :class:`JsonLog`: one JSON object per line, ``{"event", "time", "step", ...}``; the file is
  opened per event, so a killed run loses nothing already logged. Optionally mirrored to
  TensorBoard (scalars only) when ``torch.utils.tensorboard`` is installed.

Both write strict JSON (RFC 8259), which has no NaN or infinity (Python's ``json`` would write the
non-standard ``NaN`` / ``Infinity`` tokens that strict parsers reject). A non-finite float is
written as ``null`` and flagged: the top-level object gets ``"nonfinite_values": {"a/0/b":
"nan", ...}`` (the JSON path of each, ``/``-separated, and what it was: ``"nan"``, ``"inf"``,
``"-inf"``), so a diverged loss stays visible. ``nonfinite="raise"`` refuses them instead.
"""

from __future__ import annotations

import json
import math
import numbers
import time
from pathlib import Path

from sparsekern.formats._files import atomic_write

__all__ = ["NONFINITE_KEY", "JsonLog", "strict_json", "write_json"]

NONFINITE_KEY = "nonfinite_values"


def _plain(obj, path: str, found: dict[str, str]):
    """``obj`` as JSON-ready values, non-finite floats replaced by None and listed in ``found``."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, numbers.Integral):  # numpy integers stay integers
        return int(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v, f"{path}/{k}", found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{path}/{i}", found) for i, v in enumerate(obj)]
    x = float(obj)  # floats, numpy scalars, 0-d tensors; anything else raises TypeError
    if math.isfinite(x):
        return x
    found[path.lstrip("/")] = "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return None


def strict_json(obj, nonfinite: str = "flag", indent: int | None = None) -> str:
    """``obj`` as strict JSON text (see the module docstring).

    Args:
        obj: dicts, lists, tuples, str, int, bool, None and anything ``float()`` accepts.
        nonfinite: ``"flag"`` (``null`` + the top-level ``nonfinite_values`` entry; ``obj`` must
            then be a dict without that key) or ``"raise"`` (``ValueError`` naming each path).
        indent: as ``json.dumps``.
    """
    if nonfinite not in ("flag", "raise"):
        raise ValueError(f"strict_json: expected nonfinite 'flag' or 'raise', got {nonfinite!r}")
    found: dict[str, str] = {}
    plain = _plain(obj, "", found)
    if found:
        if nonfinite == "raise":
            raise ValueError(
                f"strict_json: expected finite numbers, got {found} (JSON path: value)"
            )
        if not isinstance(plain, dict) or NONFINITE_KEY in plain:
            raise ValueError(
                f"strict_json: non-finite values {found} can be flagged only in a dict without a "
                f"{NONFINITE_KEY!r} key, got {type(obj).__name__}"
            )
        plain[NONFINITE_KEY] = found
    return json.dumps(plain, indent=indent, allow_nan=False)


def write_json(path, obj, nonfinite: str = "flag") -> Path:
    """``obj`` as indented strict JSON at ``path`` (:func:`strict_json`), written atomically
    (temporary file, fsync, rename; an error names ``path``)."""
    path = Path(path)
    atomic_write(path, (strict_json(obj, nonfinite, indent=1) + "\n").encode("utf-8"))
    return path


class JsonLog:
    """Append events to ``path``.

    Args:
        path: the ``.jsonl`` file (created with its folder on the first event).
        enabled: False: log nothing (ranks other than 0).
        tensorboard: a folder for TensorBoard event files, or None. Skipped silently when
            tensorboard is not installed (the JSON lines are the record).
    """

    def __init__(self, path, enabled: bool = True, tensorboard=None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard))
            except Exception:  # not installed: JSON lines only
                self.tb = None

    def __call__(self, event: str, step: int | None = None, **record) -> None:
        if not self.enabled:
            return
        rec = {"event": event, "time": time.time(), "step": step, **record}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(strict_json(rec) + "\n")
        if self.tb is not None and step is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{event}/{k}", v, step)

    def read(self) -> list[dict]:
        """Every event logged so far."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
