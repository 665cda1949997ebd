"""Status lines for long loops inside the library (image decoding, a long teacher epoch, check-grad).

The library owns no display: bars belong to the caller (:mod:`metakd.reporting.progress`, the CLI). A loop
that can run for minutes without reaching one of the caller's hooks logs a line instead, at most
every ``every`` seconds, through :mod:`logging` — the CLI shows ``metakd.*`` records on stderr
through rich (hidden by ``--quiet``) and a run directory's run.log keeps them. A loop that finishes
before ``after`` seconds prints nothing, so fast runs stay quiet::

    status = StatusLine(log, "decoding images", total=len(files))
    for chunk in loader:
        ...
        status.update(len(chunk))  # "decoding images: 12,288/50,000 (25%), 14 s, ETA 42 s"
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["StatusLine"]


class StatusLine:
    """Throttled ``what: done/total (pct), elapsed, ETA`` INFO lines on ``logger``.

    The first line comes once the loop has run ``after`` seconds, then one every ``every`` seconds;
    :meth:`update` adds ``n`` items (or sets ``done=``). ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        total: int,
        *,
        every: float = 10.0,
        after: float = 10.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.logger, self.what, self.total = logger, what, max(int(total), 0)
        self.every, self.after = every, after
        self._clock: Callable[[], float] = clock if clock is not None else time.monotonic
        self.start = self._clock()
        self.done = 0
        self.lines = 0
        self._next = self.start + after

    def update(self, n: int = 1, *, done: int | None = None) -> None:
        """Count ``n`` more items done (or set the count to ``done``); log when a line is due."""
        self.done = done if done is not None else self.done + n
        now = self._clock()
        if now < self._next:
            return
        self._next = now + self.every
        self.lines += 1
        elapsed = now - self.start
        text = f"{self.what}: {self.done:,}/{self.total:,}"
        if self.total > 0:
            text += f" ({100 * self.done / self.total:.0f}%)"
        text += f", {_seconds(elapsed)}"
        if 0 < self.done < self.total:
            text += f", ETA {_seconds(elapsed * (self.total - self.done) / self.done)}"
        self.logger.info("%s", text)


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"
