"""What fdserver knows of each process connected to its socket.

Its own module so that both the server and the placement of connections
(:mod:`fdserver.placement`) can name the type.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import ProtocolError
from .protocol import (
    HEARTBEAT_INTERVAL,
    LATE_BEATS,
    PeerState,
    Reported,
    Role,
    WorkerState,
    one_of,
)
from .transport import LoopChannel

# A worker's request rate is taken over this many heartbeats (seconds).
RATE_BEATS = 5

# The states a worker may report next, from each it can be in.
NEXT_STATES: dict[PeerState, tuple[Reported, ...]] = {
    "starting": ("ready", "draining"), "ready": ("draining",), "draining": ()}


@dataclass(eq=False)
class Peer:
    pid: int
    uid: int
    gid: int
    connected_at: float
    channel: LoopChannel
    role: Role | None = None         # None until the hello arrives
    state: PeerState = "handshake"   # workers: starting -> ready -> draining
    ready_at: float | None = None
    connections: int = 0             # open, as last reported by the worker
    received: int = 0                # dispatched connections it reported receiving
    dispatched: int = 0              # dispatched connections sent to it
    last_dispatch: int = -1
    features: frozenset[str] = frozenset()   # optional messages it reads
    token: str | None = None         # its welcome asked for a handback with this
    resumed: Reported | None = None  # the state it says it resumes in, until shown
    holds: bool = False              # was given, or has shown, this fdserver's listeners
    shown: set[tuple[int, int]] = field(default_factory=set)   # sockets it handed back
    handbacks: int = 0               # handback frames it sent (bounded: see server)
    beat_at: float = 0.0             # monotonic time of its last heartbeat (feature)
    lag: float = 0.0                 # how late its loop ran, as it last said
    tls_given: bool = False          # was sent TLS material: it is sent every renewal
    # (monotonic time, requests served) of its last heartbeats: its rate
    served_at: collections.deque[tuple[float, int]] = field(
        default_factory=lambda: collections.deque(maxlen=RATE_BEATS + 1))
    timer: asyncio.TimerHandle | None = None
    waits: list[Wait] = field(default_factory=list)
    waits_drain: bool = False        # an fdctl drain --wait, until the balancers know

    def report(self, wanted: str) -> Reported | None:
        """Move to the state the worker reports; None if it is in it already.

        Raises ProtocolError for a move a worker cannot make.
        """
        if wanted == self.state:
            return None
        state = one_of(wanted, NEXT_STATES.get(self.state, ()))
        if state is None:
            raise ProtocolError(f"worker cannot go from {self.state} to {wanted}")
        if state == "ready" and not self.holds:
            # Only a worker that can serve may count: dispatch would send it
            # connections, a rolling restart would move on.
            raise ProtocolError("worker cannot be ready: it holds none of this fdserver's "
                                "listeners")
        self.state = state
        if state == "ready":
            self.ready_at = time.time()
        return state

    def served(self, requests: int, now: float) -> None:
        """Its heartbeat says it has served *requests* so far."""
        if self.served_at and requests < self.served_at[-1][1]:
            self.served_at.clear()          # not a count that only grows: start again
        self.served_at.append((now, requests))

    @property
    def rate(self) -> float | None:
        """Requests a second over its last RATE_BEATS heartbeats; None if unknown."""
        if len(self.served_at) < 2:
            return None
        (then, first), (now, last) = self.served_at[0], self.served_at[-1]
        return (last - first) / (now - then) if now > then else None

    @property
    def silent_for(self) -> float:
        """Seconds since a heartbeat was due and did not come; 0 if none is late."""
        if "heartbeat" not in self.features or not self.beat_at:
            return 0.0
        late = time.monotonic() - self.beat_at
        return late if late > HEARTBEAT_INTERVAL * LATE_BEATS else 0.0

    @property
    def unresponsive(self) -> bool:
        """A ready worker whose event loop has not run for a while (it is stuck)."""
        return self.state == "ready" and self.silent_for > 0

    def describe(self) -> dict[str, Any]:
        silent = self.silent_for if self.state == "ready" else 0.0
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid,
                "state": "unresponsive" if silent else self.state,
                "connections": estimate(self), "connected_at": iso_time(self.connected_at),
                "ready_at": iso_time(self.ready_at) if self.ready_at else None,
                "silent_for": round(silent, 1), "lag": round(self.lag, 4),
                "rate": None if (rate := self.rate) is None else round(rate, 1)}


@dataclass(eq=False)
class Wait:
    """An fdctl waiting for worker *pid* to reach *state*."""

    asker: Peer
    pid: int
    state: WorkerState
    timer: asyncio.TimerHandle | None = None


def takes_connections(peer: Peer, dispatch: bool) -> bool:
    """Whether a worker can take connections now: ready, its heartbeats on
    time, its channel open, and in dispatch mode able to be sent them."""
    return (peer.state == "ready" and peer.channel.usable and not peer.unresponsive
            and (not dispatch or "dispatch" in peer.features))


def estimate(peer: Peer) -> int:
    """Open connections of a worker: its last report plus what is in flight to it."""
    return peer.connections + (peer.dispatched - peer.received)


def iso_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")
