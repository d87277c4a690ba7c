"""What fdserver knows of each process connected to its socket.

Its own module so that both the server and the placement of connections
(:mod:`fdserver.placement`) can name the type.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .protocol import PeerState, Reported, Role, WorkerState
from .transport import LoopChannel


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
    timer: asyncio.TimerHandle | None = None
    waits: list[Wait] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "state": self.state,
                "connections": estimate(self), "connected_at": iso_time(self.connected_at),
                "ready_at": iso_time(self.ready_at) if self.ready_at else None}


@dataclass(eq=False)
class Wait:
    """An fdctl waiting for worker *pid* to reach *state*."""

    asker: Peer
    pid: int
    state: WorkerState
    timer: asyncio.TimerHandle | None = None


def estimate(peer: Peer) -> int:
    """Open connections of a worker: its last report plus what is in flight to it."""
    return peer.connections + (peer.dispatched - peer.received)


def iso_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")
