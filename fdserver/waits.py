"""fdctl's waits for a worker to reach a state (``fdctl rolling-restart``).

fdserver answers a ``wait`` the moment the worker is in the state asked for
(``gone`` included), or with ``"ok": false`` at the wait's timeout: the
rolling restart moves on by these answers, not by polling.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .errors import ProtocolError
from .peer import Peer, Wait
from .protocol import WAITABLE_STATES, PeerState, WaitMessage, one_of

MAX_WAITS_PER_CTL = 16          # fdctl waits for one worker at a time
MAX_WAIT = 3600.0


class Waits:
    """The waits under way, in the order they came.

    *state_of(pid)* is a worker's state now; *idle(asker)* runs when an
    asker has no wait left, so that its idle timeout runs again.
    """

    def __init__(self, state_of: Callable[[int], PeerState],
                 idle: Callable[[Peer], None]) -> None:
        self._state_of = state_of
        self._idle = idle
        self._waits: dict[Wait, None] = {}

    def add(self, asker: Peer, message: WaitMessage) -> None:
        state = one_of(message["state"], WAITABLE_STATES)
        if state is None:
            raise ProtocolError(f"cannot wait for state {message['state'][:40]!r}")
        if len(asker.waits) >= MAX_WAITS_PER_CTL:
            raise ProtocolError(f"too many waits at once on one connection "
                                f"(at most {MAX_WAITS_PER_CTL})")
        timeout = min(max(float(message["timeout"]), 0.0), MAX_WAIT)   # bounded by validate()
        wait = Wait(asker, message["pid"], state)
        wait.timer = asyncio.get_running_loop().call_later(
            timeout, lambda: self.end(wait, ok=False))
        asker.waits.append(wait)
        self._waits[wait] = None
        if asker.timer:             # waiting is not idling
            asker.timer.cancel()
            asker.timer = None
        if self._state_of(wait.pid) == wait.state:      # already there
            self.end(wait, ok=True)

    def changed(self, worker: Peer) -> None:
        """*worker*'s state changed: answer those waiting for it."""
        for wait in list(self._waits):
            if wait.pid == worker.pid and self._state_of(wait.pid) == wait.state:
                self.end(wait, ok=True)

    def drop(self, asker: Peer) -> None:
        """*asker* went away: its waits end unanswered."""
        for wait in list(asker.waits):
            self.end(wait, ok=False, answer=False)

    def end(self, wait: Wait, ok: bool, answer: bool = True) -> None:
        if wait not in self._waits:
            return
        del self._waits[wait]
        wait.asker.waits.remove(wait)
        if wait.timer:
            wait.timer.cancel()
        if answer:
            wait.asker.channel.send({"type": "waited", "pid": wait.pid,
                                     "state": self._state_of(wait.pid), "ok": ok})
            if not wait.asker.waits:
                self._idle(wait.asker)
