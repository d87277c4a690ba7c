"""The host's counts, as fdserver keeps them: what every worker served, and fdserver's own.

Standard library only: the daemon keeps these whether or not it serves
them (``fdserver --metrics``, :mod:`fdserver.exposition`, turns them into
Prometheus metrics).

Workers report the responses they wrote since their last report
(:mod:`fdserver.requestlog`); the reports are added here, to totals that
belong to the host, not to a worker: a worker that exits takes nothing with
it, and the totals only grow for as long as this fdserver runs.

A report is checked whole before any of it counts: a status outside
100..599, a method or listener fdserver does not know, a negative or huge
count, a histogram of the wrong shape, too many rows: the report is
refused (ProtocolError: the worker's registration is closed).  The series
are bounded by construction: status x method x listener.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import ProtocolError
from .peer import Peer
from .protocol import DURATION_BUCKETS, METHODS, MetricsMessage

MAX_ROWS = 1024              # request rows per report (fdapp sends at most 512)
MAX_COUNT = 10 ** 9          # responses one report may add to one row
MAX_SECONDS = 1e12           # seconds one report may add to a histogram's sum
# Drain durations: seconds from "draining" to gone.
DRAIN_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Dispatch waits: seconds a connection waited in fdserver for a ready worker.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)


@dataclass
class Histogram:
    """Per-bucket counts (the last one for +Inf) and the sum of what was observed."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus's buckets: (le, observations <= le), +Inf last."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == math.inf else repr(float(bound)), running))
        return out


class HostMetrics:
    """Everything fdserver counts for ``/metrics``.

    *listener_names* are what a report may name (fdserver's listeners).
    """

    def __init__(self) -> None:
        self.listener_names: set[str] = set()
        # (status, method, listener) -> responses written
        self.requests: dict[tuple[int, str, str], int] = {}
        self.durations: dict[str, Histogram] = {}
        self.worker_starts = 0               # registrations as a worker (resumed ones too)
        # by the state it was in when it went: "draining" is a drained exit
        self.worker_exits: dict[str, int] = {}
        self.drains = Histogram(DRAIN_BUCKETS)
        # Dispatch mode: waits of the connections that found no ready worker
        # at once; those that did, and those that waited in vain (503).
        self.dispatch_waits = Histogram(WAIT_BUCKETS)
        self.dispatched_at_once = 0
        self.dispatch_expired = 0
        self.refused = 0                     # connections refused before or at their hello
        self.shed_asked = 0                  # keep-alive connections workers were asked to end
        self._draining_since: dict[Peer, float] = {}
        self._states: dict[Peer, str] = {}      # each worker's last state seen

    # -- reports from workers ---------------------------------------------------

    def add(self, report: MetricsMessage) -> None:
        """Add a worker's report; ProtocolError (nothing added) if any of it is bad."""
        rows = report["requests"]
        durations = report["durations"]
        if len(rows) > MAX_ROWS or len(durations) > len(self.listener_names) + 1:
            raise ProtocolError(f"metrics report of {len(rows)} rows and {len(durations)} "
                                f"histograms: too many")
        checked: list[tuple[tuple[int, str, str], int]] = []
        for row in rows:
            if not (isinstance(row, list) and len(row) == 4):
                raise ProtocolError("metrics report: a request row is not "
                                    "[status, method, listener, count]")
            code, method, listener, n = row
            if not (_count(code) and 100 <= code <= 599):
                raise ProtocolError(f"metrics report: bad status {str(code)[:16]!r}")
            if not (method == "other" or method in METHODS):
                raise ProtocolError(f"metrics report: unknown method {str(method)[:16]!r}")
            self._check_listener(listener)
            if not (_count(n) and n <= MAX_COUNT):
                raise ProtocolError(f"metrics report: bad count {str(n)[:24]!r}")
            checked.append(((code, method, listener), n))
        histograms: list[tuple[str, list[int], float]] = []
        for entry in durations:
            if not (isinstance(entry, list) and len(entry) == 3):
                raise ProtocolError("metrics report: a histogram is not "
                                    "[listener, counts, sum]")
            listener, counts, total = entry
            self._check_listener(listener)
            if not (isinstance(counts, list) and len(counts) == len(DURATION_BUCKETS) + 1
                    and all(_count(n) and n <= MAX_COUNT for n in counts)):
                raise ProtocolError("metrics report: bad histogram counts")
            if not (isinstance(total, (int, float)) and not isinstance(total, bool)
                    and 0 <= total <= MAX_SECONDS):
                raise ProtocolError("metrics report: bad histogram sum")
            histograms.append((listener, counts, float(total)))
        for key, n in checked:
            self.requests[key] = self.requests.get(key, 0) + n
        for listener, counts, total in histograms:
            histogram = self.durations.get(listener)
            if histogram is None:
                histogram = self.durations[listener] = Histogram(DURATION_BUCKETS)
            for i, n in enumerate(counts):
                histogram.counts[i] += n
            histogram.total += total

    def _check_listener(self, name: object) -> None:
        if not (isinstance(name, str) and (name in self.listener_names or name == "other")):
            raise ProtocolError(f"metrics report: unknown listener {str(name)[:40]!r}")

    # -- fdserver's own events -----------------------------------------------------

    def worker_changed(self, peer: Peer) -> None:
        """Call on every state a worker enters: its start, its drain, its end."""
        last = self._states.get(peer)
        if peer.state == "gone":
            self._states.pop(peer, None)
            since = self._draining_since.pop(peer, None)
            if since is not None:
                self.drains.observe(time.monotonic() - since)
            was = last or "starting"
            self.worker_exits[was] = self.worker_exits.get(was, 0) + 1
            return
        if last is None:
            self.worker_starts += 1
        if peer.state == "draining" and peer not in self._draining_since:
            self._draining_since[peer] = time.monotonic()
        self._states[peer] = peer.state

    def dispatch_waited(self, seconds: float) -> None:
        self.dispatch_waits.observe(max(0.0, seconds))


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def states(workers: Iterable[Peer]) -> dict[str, int]:
    """Workers per state as /metrics shows them: a stuck ready one is unresponsive."""
    counts = {"starting": 0, "ready": 0, "draining": 0, "unresponsive": 0}
    for peer in workers:
        state = "unresponsive" if peer.unresponsive else peer.state
        if state in counts:
            counts[state] += 1
    return counts
