"""Warnings about peers, at a bounded rate.

Anyone who can open fdserver's socket can make it refuse a connection; one
warning line per refusal would let them fill the disk.  Past *burst* lines in
a *window*, the lines are counted instead, and one summary line says how many
were suppressed once the window ends (or at shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any


class PeerLog:
    def __init__(self, log: logging.Logger, loop: asyncio.AbstractEventLoop | None = None,
                 burst: int = 20, window: float = 10.0) -> None:
        self.log = log
        self.loop = loop
        self.burst = burst
        self.window = window
        self._started = -window
        self._logged = 0
        self.suppressed = 0
        self._summary: asyncio.TimerHandle | None = None

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._started >= self.window and not self.suppressed:
            self._started, self._logged = now, 0
        if self._logged < self.burst:
            self._logged += 1
            self.log.warning(message, *args)
            return
        self.suppressed += 1
        if self._summary is None and self.loop is not None:
            self._summary = self.loop.call_later(
                max(0.0, self._started + self.window - now), self.flush)

    def flush(self) -> None:
        """Say how many warnings were suppressed, if any; start a new window."""
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None
        if self.suppressed:
            self.log.warning("suppressed %d more warnings about peers in the last %gs",
                             self.suppressed, round(time.monotonic() - self._started, 1))
        self.suppressed = 0
        self._started, self._logged = time.monotonic(), 0
