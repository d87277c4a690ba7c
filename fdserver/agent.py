"""HAProxy's agent-check, answered from what fdserver knows of its workers.

HAProxy (``agent-check agent-port N`` on a ``server`` line) connects every
``agent-inter``, reads one line and closes.  The line is words HAProxy acts
on: ``up``/``down`` (operational state), ``ready``/``drain``/``maint``
(administrative state) and ``N%`` (weight, relative to the server's
configured weight).  fdserver answers, in this order of precedence:

* ``drain``: fdserver is shutting down, or the host is drained
  (``fdctl drain``); HAProxy sends no new request, open ones carry on;
* ``down``: no worker is ready;
* ``up ready N%``: N = ready workers over the host's capacity, 1..100.

The capacity is ``--agent-capacity`` if given, else the most workers that
were ready at once in the last ``--agent-window`` seconds: a rolling
restart, which brings the count back to full between replacements, never
shrinks it; a host scaled down for good reaches 100% again after a window.

Each agent connection is answered at once, without waiting for the peer:
the reply is written, the sending side shut, and whatever the peer sends
(HAProxy's optional ``agent-send``) read and dropped until its EOF, for at
most LINGER seconds, at most MAX_OPEN such connections at a time (beyond
that a connection is answered and closed at once).  Nothing a peer sends
is parsed, so a hostile or idle one costs one descriptor for LINGER.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from .accept import accepted
from .listeners import BindSpec, bind_own

log = logging.getLogger("fdserver")

DEFAULT_WINDOW = 600.0
LINGER = 2.0            # seconds an answered peer may take to close its side
MAX_OPEN = 64           # answered connections lingering at once
ACCEPT_BATCH = 16
TOLD_MEMORY = 60.0      # who asked, for `fdctl drain --wait`


def reply(ready: int, capacity: int, drained: bool) -> str:
    """The agent's answer line, without its newline (see the module's docstring)."""
    if drained:
        return "drain"
    if ready <= 0:
        return "down"
    # At least 1%: 0% would mean "drain" to HAProxy.
    percent = max(1, min(100, math.floor(100 * ready / max(capacity, 1) + 0.5)))
    return f"up ready {percent}%"


def bind_agent(given: str, spec: BindSpec) -> socket.socket:
    """The agent's listening socket for ``--agent HOST:PORT`` (before a privilege drop)."""
    return bind_own("--agent", given, spec)


class Capacity:
    """How many workers make this host whole: fixed, or the recent peak of ready ones."""

    def __init__(self, fixed: int | None = None, window: float = DEFAULT_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fixed = fixed
        self.window = window
        self._clock = clock
        # (time, ready workers from then on), oldest first
        self._counts: collections.deque[tuple[float, int]] = collections.deque()

    def observe(self, ready: int) -> None:
        """The number of ready workers changed to *ready*."""
        now = self._clock()
        if self._counts and self._counts[-1][1] == ready:
            return
        self._counts.append((now, ready))
        self._forget(now)

    def _forget(self, now: float) -> None:
        # Keep the last count from before the window: it held into the window.
        while len(self._counts) > 1 and self._counts[1][0] <= now - self.window:
            self._counts.popleft()

    def value(self) -> int:
        if self.fixed:
            return self.fixed
        self._forget(self._clock())
        return max((n for _, n in self._counts), default=0)


@dataclass
class _Open:
    sock: socket.socket
    timer: asyncio.TimerHandle


class Agent:
    """Answers agent-checks on *sock* (bound, listening) with *answer()*."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 answer: Callable[[], str]) -> None:
        self.sock = sock
        self._loop = loop
        self._answer = answer
        self._open: dict[int, _Open] = {}
        # peer host -> (monotonic time of its last question, the answer it got)
        self.asked: dict[str, tuple[float, str]] = {}
        self.on_answer: Callable[[], None] = lambda: None
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept)

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if self.sock.family == socket.AF_INET6 else f"{host}:{port}"

    def close(self) -> None:
        """Stop answering: close the listener and every lingering connection."""
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
        for fd in list(self._open):
            self._drop(fd)

    def recent_askers(self, since: float) -> dict[str, str]:
        """Who asked since *since* (monotonic) -> the answer they last got."""
        now = time.monotonic()
        for host in [h for h, (t, _) in self.asked.items() if t < now - TOLD_MEMORY]:
            del self.asked[host]
        return {host: said for host, (t, said) in self.asked.items() if t >= since}

    def _accept(self) -> None:
        for conn, address in accepted(self.sock.accept, ACCEPT_BATCH, self._accept_failed):
            self._answer_one(conn, address)

    def _accept_failed(self, exc: OSError) -> None:
        log.warning("agent: accept on %s failed: %s; retrying in 0.1s", self.address,
                    exc.strerror)
        fileno = self.sock.fileno()
        self._loop.remove_reader(fileno)
        self._loop.call_later(0.1, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self.sock.fileno() >= 0:
            self._loop.add_reader(self.sock.fileno(), self._accept)

    def _answer_one(self, conn: socket.socket, address: tuple[str, int]) -> None:
        said = self._answer()
        conn.setblocking(False)
        try:
            # A few bytes into an empty send buffer: never blocks.
            conn.send(said.encode() + b"\n")
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()        # gone already
            return
        if len(self.asked) < 1024 or address[0] in self.asked:
            self.asked[address[0]] = (time.monotonic(), said.split()[0])
        self.on_answer()
        if len(self._open) >= MAX_OPEN:
            conn.close()
            return
        # Read until the peer closes, so that closing ours does not reset
        # the connection before the peer has read the answer.
        fd = conn.fileno()
        self._open[fd] = _Open(conn, self._loop.call_later(LINGER, self._drop, fd))
        self._loop.add_reader(fd, self._discard, fd)

    def _discard(self, fd: int) -> None:
        entry = self._open.get(fd)
        if entry is None:
            return
        try:
            data = entry.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)

    def _drop(self, fd: int) -> None:
        entry = self._open.pop(fd, None)
        if entry is None:
            return
        entry.timer.cancel()
        self._loop.remove_reader(fd)
        entry.sock.close()

