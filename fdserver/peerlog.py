"""Warnings about peers, at a bounded rate per uid and in total.

Anyone who can open fdserver's socket can make it refuse a connection; one
warning line per refusal would let them fill the disk.  Each uid gets its
own budget, so that one user's flood cannot hide another's refusal: past
*burst* lines for a uid in a *window*, its lines are counted instead, and
one summary line names the uids and counts suppressed once the window ends
(or at shutdown).  All uids together get TOTAL_BURSTS budgets a window: a
user with subordinate uids (rootless containers) has thousands of them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

TOTAL_BURSTS = 10       # all uids together: this many uids' worth of lines a window


class PeerLog:
    def __init__(self, log: logging.Logger, loop: asyncio.AbstractEventLoop | None = None,
                 burst: int = 20, window: float = 10.0) -> None:
        self.log = log
        self.loop = loop
        self.burst = burst
        self.window = window
        self._started = time.monotonic()
        self._logged: collections.Counter[int] = collections.Counter()
        self.suppressed: collections.Counter[int] = collections.Counter()
        self._summary: asyncio.TimerHandle | None = None

    def warning(self, uid: int, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._started >= self.window and not self.suppressed:
            self._started = now
            self._logged.clear()
        if self._logged[uid] < self.burst and self._logged.total() < self.burst * TOTAL_BURSTS:
            self._logged[uid] += 1
            self.log.warning(message, *args)
            return
        self.suppressed[uid] += 1
        if self._summary is None and self.loop is not None:
            self._summary = self.loop.call_later(
                max(0.0, self._started + self.window - now), self.flush)

    def flush(self) -> None:
        """Say how many warnings were suppressed, and whose; start a new window."""
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None
        if self.suppressed:
            whose = ", ".join(f"uid {uid}: {count}" for uid, count in
                              self.suppressed.most_common(10))
            more = len(self.suppressed) - 10
            self.log.warning("suppressed %d more warnings about peers in the last %gs (%s%s)",
                             sum(self.suppressed.values()),
                             round(time.monotonic() - self._started, 1), whose,
                             f", and {more} more uids" if more > 0 else "")
        self.suppressed.clear()
        self._logged.clear()
        self._started = time.monotonic()
