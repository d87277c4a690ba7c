"""Keep-alive connections moved off the most loaded workers (``shed``).

A keep-alive connection stays with the worker that took it.  So after a
rolling restart under keep-alive load the last replacement holds none (its
predecessor's clients reconnected to the others while it started), and
balancing at accept time cannot fix that: nobody connects.  fdserver knows
every ready worker's open connections; when they stay uneven (the most
loaded at least two over the least loaded) for two checks in a row,
REBALANCE_INTERVAL apart, it asks the most loaded workers to shed a few
(``shed``).  Such a worker answers its next requests ``Connection: close``
and closes after the response, a clean end every HTTP client expects; the
client's next connection is placed again, on the emptier workers (shared
mode: the fuller ones hold back; dispatch mode: the fewest first).

Nothing is cut: only a response closes its connection, and a connection
taken over from HTTP (a websocket) is never asked.  A worker is asked again
only after SHED_COOLDOWN, once its reports show what it did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from .peer import Peer

# How long an imbalance must last before workers are asked to shed; checks
# run this often while one lasts, and not at all while the load is even.
REBALANCE_INTERVAL = 0.25
# A worker is asked again only after this long: with many workers its load
# reaches fdserver in heartbeats, a second apart.
SHED_COOLDOWN = 1.25


def shed_plan(counts: list[int]) -> list[tuple[int, int]]:
    """Which workers should shed how many connections: ``[(index, n), ...]``.

    Only while the most loaded holds at least two more than the least loaded
    (one apart is as even as whole connections get).  Those at least two over
    the least loaded and at or over the mean shed down to the mean (at least
    one each), most loaded first, no more in all than the others lack to
    reach the mean (at least one).
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
                 count: Callable[[Peer], int]) -> None:
        self._loop = loop
        self._workers = workers
        self._count = count
        self._timer: asyncio.TimerHandle | None = None
        self._over: set[Peer] = set()       # over in the last check
        self._asked: dict[Peer, float] = {}  # worker -> when it was last asked

    def changed(self) -> None:
        """The load or the workers changed: check soon (at most once an interval)."""
        if self._timer is None:
            self._timer = self._loop.call_later(REBALANCE_INTERVAL, self._check)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        ready = [p for p in self._workers() if p.state == "ready"]
        plan = shed_plan([self._count(p) for p in ready])
        over = {ready[i] for i, _ in plan}
        now = self._loop.time()
        for i, n in plan:
            peer = ready[i]
            if "shed" not in peer.features or not peer.channel.usable:
                continue        # counted all the same: it holds connections
            # Over in two checks in a row: not a moment's count of short
            # connections, which evens out by itself.
            if peer in self._over and now >= self._asked.get(peer, 0.0) + SHED_COOLDOWN:
                self._asked[peer] = now
                peer.channel.send({"type": "shed", "connections": n})
        self._over = over
        self._asked = {p: t for p, t in self._asked.items()
                       if p.state == "ready" and now < t + SHED_COOLDOWN}
        if plan:
            self.changed()          # while uneven, look again even if nothing reports
