"""JSON-lines event log: one JSON object per line, ``{"event", "time", "step", ...}``; the file is
opened per event, so a killed run loses nothing already logged. Optionally mirrored to
TensorBoard (scalars only) when ``torch.utils.tensorboard`` is installed."""

from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["JsonLog"]


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
            f.write(json.dumps(rec, default=float) + "\n")
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
