"""One worker of the host recycles at a time (``fdapp --max-requests``).

A worker due to recycle asks (``recycle``) and waits for its turn.  fdserver
gives the turn to one worker, and the next turn only once that worker is
gone *and* as many workers are ready again as when it started (its
replacement is up), so capacity never drops by more than one worker.  If no
replacement comes within *patience* seconds, the turns go on anyway (a
supervisor that does not restart exited workers must not stop recycling),
and so they do if the worker given the turn has not started draining within
*patience*, or is not gone within another *patience*, plus the drain it
said it may take (its --graceful-timeout and --shutdown-timeout, counted up
to protocol.MAX_DRAIN), of draining: one worker cannot hold the turn for
ever.  A worker that disconnects leaves the queue at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .peer import Peer

log = logging.getLogger("fdserver")

DEFAULT_PATIENCE = 60.0


class Recycler:
    def __init__(self, loop: asyncio.AbstractEventLoop, ready_count: Callable[[], int],
                 patience: float = DEFAULT_PATIENCE) -> None:
        self._loop = loop
        self._ready_count = ready_count
        self._patience = patience
        # Workers waiting for a turn, in the order they asked, and the drain
        # each said it may take.
        self._queue: dict[Peer, float] = {}
        self._current: Peer | None = None
        self._current_drain = 0.0
        self._ready_before = 0
        self._impatient = False
        self._held_until = 0.0          # no turn before (after an fdserver restart)
        self._timer: asyncio.TimerHandle | None = None       # waiting for a replacement
        self._overdue_timer: asyncio.TimerHandle | None = None

    def ask(self, peer: Peer, drain: float | None = None) -> None:
        """*peer* is due to recycle: queue it, and give it the turn if it is free.
        *drain*: the most its drain and shutdown may take, as it said (the
        caller checks it: at most protocol.MAX_DRAIN)."""
        if peer is self._current:
            self._current_drain = drain or 0.0
        else:
            self._queue[peer] = drain or 0.0        # a worker asking again keeps its place
        self.changed()

    @property
    def queued(self) -> list[Peer]:
        """The workers waiting for a turn, in the order they asked."""
        return list(self._queue)

    def forget(self, peer: Peer) -> None:
        """*peer* disconnected: out of the queue (the turn it holds passes
        once changed() sees it gone)."""
        self._queue.pop(peer, None)

    def hold(self, seconds: float) -> None:
        """Give no turn for *seconds*: after an fdserver restart, a worker that
        was recycling drains unseen (a draining worker does not re-register)."""
        until = self._loop.time() + seconds
        if until > self._held_until:
            self._held_until = until
            self._loop.call_later(seconds, self.changed)

    def changed(self) -> None:
        """A worker came, went or changed state: perhaps the next turn is due."""
        if self._loop.time() < self._held_until:
            return
        current = self._current
        if current is not None:
            if current.state != "gone":
                return                                   # still draining
            if self._ready_count() < self._ready_before and not self._impatient:
                if self._timer is None:
                    self._timer = self._loop.call_later(self._patience, self._give_up_waiting)
                return                                   # its replacement is not ready yet
            self._done()
        while self._queue:
            peer, drain = next(iter(self._queue.items()))
            del self._queue[peer]
            if peer.state == "ready" and peer.channel.usable and not peer.unresponsive:
                self._current = peer
                self._current_drain = drain
                self._ready_before = self._ready_count()
                log.info("worker pid %d may recycle now (%d ready)", peer.pid,
                         self._ready_before)
                peer.channel.send({"type": "recycle"})
                self._overdue_timer = self._loop.call_later(self._patience, self._overdue, peer)
                return

    def _overdue(self, peer: Peer, second_look: bool = False) -> None:
        self._overdue_timer = None
        if self._current is not peer:
            return
        if peer.state == "ready":
            log.warning("worker pid %d had its turn to recycle for %gs and did not drain; "
                        "the next one goes", peer.pid, self._patience)
        elif peer.state == "draining" and not second_look:
            # Draining: as long as its drain may take (fdapp's gives up after
            # its --graceful-timeout), and another patience.
            self._overdue_timer = self._loop.call_later(self._drain_wait(), self._overdue, peer,
                                                        True)
            return
        elif peer.state == "draining":
            log.warning("worker pid %d has drained for its turn to recycle for over %gs; "
                        "the next one goes", peer.pid, self._drain_wait())
        else:
            return              # gone: changed() decides
        self._done()
        self.changed()

    def _drain_wait(self) -> float:
        return self._patience + self._current_drain

    def _give_up_waiting(self) -> None:
        self._timer = None
        log.warning("no replacement for worker pid %d became ready within %gs; recycling "
                    "goes on", self._current.pid if self._current else 0, self._patience)
        self._impatient = True
        self.changed()

    def _done(self) -> None:
        for timer in (self._timer, self._overdue_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._overdue_timer = None
        self._current = None
        self._current_drain = 0.0
        self._impatient = False
