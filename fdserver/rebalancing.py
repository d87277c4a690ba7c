"""Keep-alive connections moved off the most loaded workers (``shed``).

A keep-alive connection stays with the worker that took it.  So after a
rolling restart under keep-alive load the last replacement holds none (its
predecessor's clients reconnected to the others while it started), and
balancing at accept time cannot fix that: nobody connects.  fdserver knows
every worker's open connections; when they stay uneven (the most loaded at
least two over the least loaded) for two checks in a row, a report interval
apart, it asks the most loaded workers to shed a few (``shed``).  Such a
worker ends that many keep-alive connections after their next responses
(``Connection: close``, then a lingering close), a clean end every HTTP
client expects; the client's next connection is placed again, on the
emptier workers (shared mode: the fuller ones hold back; dispatch mode: the
fewest first).

Only workers that can take connections count (ready, responsive, and in
dispatch mode able to be sent them).  A worker is asked only if it also
serves more requests a second than the mean (its heartbeats say): one that
holds many idle connections (or websockets) is not busier, and shedding
would only move its active clients.  It is asked again only after
SHED_COOLDOWN, and after an ask that did not lower its count, twice as long
each time up to MAX_SHED_COOLDOWN.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from .metrics import HostMetrics
from .peer import Peer, takes_connections
from .protocol import shared_report_interval

# How long an imbalance must last before workers are asked to shed (longer
# when the workers report less often: see check_interval).  A check follows
# a change in the load or the workers, at most one an interval, and checks
# go on while a worker that could be asked is over.
REBALANCE_INTERVAL = 0.25
# A worker is asked again only after this long (its reports must show what
# it did), and after asks that changed nothing, up to MAX_SHED_COOLDOWN.
SHED_COOLDOWN = 1.25
MAX_SHED_COOLDOWN = 10.0


def shed_plan(counts: list[int]) -> list[tuple[int, int]]:
    """Which workers should shed how many connections: ``[(index, n), ...]``.

    Only while the most loaded holds at least two more than the least loaded
    (one apart is as even as whole connections get).  Those at least two over
    the least loaded and at or over the mean rounded up shed down to it (at
    least one each), most loaded first, no more in all than the others lack
    to reach the mean rounded down (at least one).
    """
    if len(counts) < 2:
        return []
    low = min(counts)
    if max(counts) - low < 2:
        return []
    total, workers = sum(counts), len(counts)
    ceiling = -(-total // workers)
    room = max(1, sum(max(0, total // workers - count) for count in counts))
    plan = []
    for i in sorted(range(workers), key=lambda i: -counts[i]):
        count = counts[i]
        if room <= 0 or count < low + 2 or count < ceiling:
            break
        n = min(room, max(1, count - ceiling))
        plan.append((i, n))
        room -= n
    return plan


class Rebalancer:
    """Asks workers to shed keep-alive connections while the load stays uneven.

    *count* gives a worker's open connections as fdserver sees them (shared
    mode: its last report; dispatch mode: plus those on their way to it).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, workers: Callable[[], Iterable[Peer]],
                 count: Callable[[Peer], int], dispatch: bool = False,
                 metrics: HostMetrics | None = None) -> None:
        self._loop = loop
        self._metrics = metrics
        self._workers = workers
        self._count = count
        self._dispatch = dispatch
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._over: set[Peer] = set()       # over in the last check
        # worker -> (when it was last asked, its count then, its cooldown)
        self._asked: dict[Peer, tuple[float, int, float]] = {}

    def changed(self) -> None:
        """The load or the workers changed: check soon (at most once an interval)."""
        if self._timer is None and not self._closed:
            self._timer = self._loop.call_later(self._interval, self._check)

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def _interval(self) -> float:
        return check_interval(sum(1 for _ in self._eligible()), self._dispatch)

    def _eligible(self) -> Iterable[Peer]:
        return (p for p in self._workers() if takes_connections(p, self._dispatch))

    def _check(self) -> None:
        self._timer = None
        ready = list(self._eligible())
        counts = [self._count(p) for p in ready]
        plan = shed_plan(counts)
        over = {ready[i] for i, _ in plan}
        now = self._loop.time()
        rates = [p.rate for p in ready]
        mean_rate = sum(r or 0.0 for r in rates) / max(1, len(ready))
        waiting = False
        for i, n in plan:
            peer = ready[i]
            if "shed" not in peer.features:
                continue        # counted all the same: it holds connections
            waiting = True      # its rate may rise (a report comes only with a new count)
            rate = rates[i]
            if rate is not None and rate <= mean_rate:
                continue        # not busier, only holding more (idle ones, websockets)
            # Over in two checks in a row: not a moment's count of short
            # connections, which evens out by itself.
            if peer not in self._over:
                continue
            cooldown = SHED_COOLDOWN
            last = self._asked.get(peer)
            if last is not None:
                when, count_then, cooldown = last
                if now < when + cooldown:
                    continue
                # An ask that did not lower its count: wait longer next time.
                cooldown = (min(2 * cooldown, MAX_SHED_COOLDOWN) if counts[i] >= count_then
                            else SHED_COOLDOWN)
            self._asked[peer] = (now, counts[i], cooldown)
            peer.channel.send({"type": "shed", "connections": n})
            if self._metrics is not None:
                self._metrics.shed_asked += n
        self._over = over
        self._asked = {p: v for p, v in self._asked.items()
                       if p in over or (p.state == "ready" and now < v[0] + v[2])}
        if waiting:
            self.changed()      # while some worker may be asked, look again
        else:
            self._over = set()  # the next check is not the second in a row


def check_interval(workers: int, dispatch: bool) -> float:
    """Time between checks: at least a report interval, so that two checks
    in a row see two reports (shared mode: longer with more workers, up to a
    second, when heartbeats carry the load)."""
    if dispatch:
        return REBALANCE_INTERVAL
    return max(REBALANCE_INTERVAL, shared_report_interval(workers) + REBALANCE_INTERVAL / 5)
