"""A progress bar whose messages never land on the bar's line.

tqdm draws the bar on stderr with carriage returns; a plain ``print`` to stdout while it is drawn
ends up on the same terminal line. :meth:`Progress.write` goes through ``tqdm.write``, which
clears the bar, prints, and redraws it. The bar is drawn only on an interactive terminal (stderr
a TTY) unless asked otherwise: in a log file or a CI job its carriage-return frames are noise, so
there :meth:`Progress.note` lines (one per epoch) report progress instead.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
    """One bar over a whole run.

    Args:
        total: steps of the whole run. initial: steps already done (a resumed run).
        enabled: False: no bar at all (``--no-progress``, or ranks other than 0). None
            (default): a bar only if stderr is a terminal.
        quiet: print nothing at all (ranks other than 0).
    """

    def __init__(
        self, total: int, initial: int = 0, enabled: bool | None = None, quiet: bool = False
    ) -> None:
        self.quiet = quiet
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.bar = None
        if enabled and not quiet:
            self.bar = tqdm(
                total=total,
                initial=initial,
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=1.0,
                leave=False,
            )

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text, refresh=False)

    def postfix(self, **values) -> None:
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def write(self, msg: str) -> None:
        """Print a line (always), without breaking the bar."""
        if self.quiet:
            return
        if self.bar is not None:
            tqdm.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)

    def note(self, msg: str) -> None:
        """Print a progress line only when there is no bar to show progress."""
        if self.bar is None:
            self.write(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
