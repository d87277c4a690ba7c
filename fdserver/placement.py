"""Where connections go: the share in shared mode, the chosen worker in dispatch mode.

Shared mode (default): every worker accepts on the shared listeners itself;
fdserver only tells the workers how many connections are open in total and
how many workers are ready (a ``share`` message, coalesced), so that a worker
holding more than its share can stop accepting for a moment (see
:mod:`fdserver.acceptor`).  fdserver stays out of the data path, except
when no worker is ready: once none has been for *unavailable_timeout*
seconds, fdserver accepts on the listeners itself and answers each
connection ``503 Service Unavailable`` (:class:`NoWorkerAnswer`) until a
worker is ready again.

Dispatch mode (``fdserver --dispatch``): fdserver accepts every connection
and passes it to a ready worker: the one with the fewest open connections
(its last report, plus what was sent since), and among those first one that
has read everything sent to it (the kernel says so: SIOCOUTQ on its
channel).  The first rule keeps long-lived connections even; the second
("join the idle queue") keeps a worker that waits for the CPU from being
handed more while an equally loaded one sits idle.  A connection that no
worker can take waits in fdserver at most *wait_timeout* seconds, then gets a
``503 Service Unavailable`` with ``Connection: close``; past *max_waiting*
connections fdserver stops accepting and the kernel's backlog holds the rest.
fdserver runs as SCHED_BATCH (``cli._schedule_as_batch``), so that under
load it accepts in batches instead of preempting the workers.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import itertools
import logging
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from .accept import accepted, raw_accept
from .listeners import GUARD_INTERVAL, Listener, nonblocking_accept
from .metrics import HostMetrics
from .peer import Peer, estimate, takes_connections
from .protocol import Message

log = logging.getLogger("fdserver")

SHARE_DELAY = 0.01          # coalesce share broadcasts: at most ~100 a second
# Connections taken per wakeup of a listener: fewer than MAX_FDS_PER_FRAME,
# so what one wakeup sends a worker always fits in one frame.
ACCEPT_BATCH = 64
UNAVAILABLE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
               b"Content-Length: 24\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
               b"no app process is ready\n")
# A connection answered 503 by NoWorkerAnswer is read from (and what it
# sends dropped) this long after its answer, then closed: a request that
# arrives after the answer does not turn the close into a reset.
LINGER = 2.0
MAX_LINGERING = 1024        # beyond this, answered connections are closed at once


class SharePublisher:
    """Shared mode: tell the ready workers the total load, coalesced.

    Given *listeners*, it also answers 503 on them once no worker has been
    ready for *unavailable_timeout* seconds (:class:`NoWorkerAnswer`).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 workers: Callable[[], Iterable[Peer]],
                 listeners: list[Listener] | None = None, *,
                 unavailable_timeout: float = 10.0) -> None:
        self._loop = loop
        self._workers = workers
        self._scheduled = False
        self._last: tuple[int, int] | None = None
        self._sent: dict[Peer, tuple[int, int]] = {}   # ready worker -> its last share
        self._no_worker = (NoWorkerAnswer(loop, listeners, unavailable_timeout)
                           if listeners is not None else None)
        self._count_ready()

    def close(self) -> None:
        if self._no_worker:
            self._no_worker.close()

    def _count_ready(self) -> None:
        if self._no_worker:
            self._no_worker.ready_workers(sum(p.state == "ready" for p in self._workers()))

    def changed(self) -> None:
        """The load changed: publish soon, coalesced (if it changed enough: _publish)."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_later(SHARE_DELAY, self._coalesced)

    def worker_changed(self) -> None:
        """A worker came, went or changed state: publish now, to every ready worker.

        A worker that just became ready has no share yet and, until it gets
        one, accepts without holding back: a burst arriving in that moment
        would all go to it.
        """
        self._publish(force=True)
        self._count_ready()

    def _coalesced(self) -> None:
        self._scheduled = False
        self._publish()

    def _publish(self, force: bool = False) -> None:
        # Only when what a worker does with it changes: the ready workers, or
        # the total by half a connection per worker or an eighth, whichever
        # is more.  Every load report would otherwise send every worker a
        # share: with N workers, N² messages.
        ready = [p for p in self._workers() if p.state == "ready"]
        share = (sum(p.connections for p in ready), len(ready))
        last = self._last
        if not force and last is not None and last[1] == share[1] and (
                abs(share[0] - last[0]) < max(1, share[1] // 2, last[0] // 8)):
            return
        self._last = share
        message: Message = {"type": "share", "connections": share[0], "workers": share[1]}
        sent, self._sent = self._sent, {}
        for peer in ready:
            if "share" in peer.features:
                if sent.get(peer) != share:     # one that has it needs it not again
                    peer.channel.send(message)
                self._sent[peer] = share


def _set_aside(loop: asyncio.AbstractEventLoop, listener: Listener,
               watch_again: Callable[[Listener], None]) -> None:
    """A listener whose accept failed with EINVAL (a holder shut it down): not
    watched, so that the others go on, and *watch_again* after a check of the
    ListenerGuard, which puts it right."""
    loop.remove_reader(listener.sock.fileno())
    loop.call_later(GUARD_INTERVAL, watch_again, listener)


class NoWorkerAnswer:
    """Shared mode: once no worker has been ready for *timeout* seconds, answer
    new connections on the listeners ``503 Service Unavailable`` until one is.

    The workers accept on the shared listeners themselves; with none ready, a
    connection would wait in the kernel's accept queue for ever.  So when the
    count of ready workers drops to 0 a timer is armed, and if it fires with
    still none ready, fdserver watches the listeners itself: each wakeup
    accepts at most ACCEPT_BATCH connections and answers each one at once
    (a non-blocking send, then the end of its side), never waiting on a
    client.  As soon as a worker is ready, fdserver stops watching and the
    queue is the workers' again.  A listener is never shutdown(): the
    workers share it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, listeners: list[Listener],
                 timeout: float) -> None:
        self._loop = loop
        self._listeners = listeners          # the server's list: recovered ones join it
        self.timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self._answering = False              # the timer fired, no worker is ready
        self._watched: list[Listener] = []   # listeners this loop watches now
        self._lingering: dict[socket.socket, asyncio.TimerHandle] = {}
        self._answered = 0
        self._closed = False

    def ready_workers(self, count: int) -> None:
        """The number of ready workers, whenever a worker changed."""
        if count:
            if self._timer:
                self._timer.cancel()
                self._timer = None
            if self._answering:
                self._answering = False
                self._unwatch()
                log.info("a worker is ready; it takes the connections again (%d answered "
                         "503 meanwhile)", self._answered)
        elif self._timer is None and not self._answering and not self._closed:
            self._timer = self._loop.call_later(self.timeout, self._no_worker_for_long)

    def close(self) -> None:
        self._closed = True
        if self._timer:
            self._timer.cancel()
            self._timer = None
        self._answering = False
        self._unwatch()
        for conn in list(self._lingering):
            self._close(conn)

    def _no_worker_for_long(self) -> None:
        self._timer = None
        self._answering = True
        self._answered = 0
        log.warning("no worker has been ready for %gs: answering new connections with 503 "
                    "until one is", self.timeout)
        self._watch()

    def _watch(self) -> None:
        if self._answering and not self._watched:
            self._watched = list(self._listeners)
            for listener in self._watched:
                self._loop.add_reader(listener.sock.fileno(), self._accept, listener)

    def _unwatch(self) -> None:
        for listener in self._watched:
            self._loop.remove_reader(listener.sock.fileno())
        self._watched = []

    def _watch_again(self, listener: Listener) -> None:
        if listener in self._watched and listener.sock.fileno() >= 0:
            self._loop.add_reader(listener.sock.fileno(), self._accept, listener)

    def _accept(self, listener: Listener) -> None:
        family = listener.sock.family
        accept = nonblocking_accept(listener.sock, raw_accept(listener.sock))
        for fd, _ in accepted(accept, ACCEPT_BATCH,
                              lambda exc: self._accept_failed(listener, exc)):
            conn = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            if listener.tls:
                _read_and_close(conn)   # a TLS client can read no plain 503: it sees the close
            else:
                self._answer(conn)

    def _accept_failed(self, listener: Listener, exc: OSError) -> None:
        if exc.errno == errno.EINVAL:
            _set_aside(self._loop, listener, self._watch_again)
            return
        # Out of descriptors: stop watching for a moment.
        log.warning("accept failed while answering 503: %s", exc.strerror)
        self._unwatch()
        self._loop.call_later(0.1, self._watch)

    def _answer(self, conn: socket.socket) -> None:
        """503, then the end of our side; the client's request may still come."""
        self._answered += 1
        try:
            conn.setblocking(False)
            conn.send(UNAVAILABLE)          # fits a new connection's send buffer
            conn.shutdown(socket.SHUT_WR)   # the connection's, not the listener's
        except OSError:
            conn.close()
            return
        if len(self._lingering) >= MAX_LINGERING:
            _read_and_close(conn)
            return
        self._lingering[conn] = self._loop.call_later(LINGER, self._close, conn)
        self._loop.add_reader(conn.fileno(), self._read, conn)

    def _read(self, conn: socket.socket) -> None:
        # What the client sends is dropped; its EOF (or an error) ends it.
        try:
            for _ in range(4):
                if not conn.recv(65536):
                    break
            else:
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        timer = self._lingering.pop(conn, None)
        if timer is None:
            return
        timer.cancel()
        self._loop.remove_reader(conn.fileno())
        conn.close()


class Dispatcher:
    """Dispatch mode: accept on the listeners, pass each connection to a worker."""

    def __init__(self, loop: asyncio.AbstractEventLoop, listeners: list[Listener],
                 workers: Callable[[], Iterable[Peer]], *, wait_timeout: float = 10.0,
                 max_waiting: int = 1024, metrics: HostMetrics | None = None) -> None:
        self._loop = loop
        self._metrics = metrics or HostMetrics()
        self._listeners = listeners
        self._workers = workers
        self.wait_timeout = wait_timeout
        self.max_waiting = max_waiting
        # (since when, listener name, connection, peer address)
        self._waiting: collections.deque[tuple[float, str, socket.socket, Any]] = \
            collections.deque()
        self._accepting = False
        self._backing_off = False         # accept failed (no descriptors left)
        self._closed = False
        self._sequence = itertools.count()
        self._expiry: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if not self._accepting and not self._closed:
            self._accepting = True
            for listener in self._listeners:
                self._loop.add_reader(listener.sock.fileno(), self._accept, listener)

    def pause(self) -> None:
        if self._accepting:
            self._accepting = False
            for listener in self._listeners:
                self._loop.remove_reader(listener.sock.fileno())

    def _watch_again(self, listener: Listener) -> None:
        if self._accepting and listener in self._listeners and listener.sock.fileno() >= 0:
            self._loop.add_reader(listener.sock.fileno(), self._accept, listener)

    def close(self) -> None:
        self._closed = True
        self.pause()
        if self._expiry:
            self._expiry.cancel()
        while self._waiting:
            _, name, conn, _ = self._waiting.popleft()
            self._unavailable(name, conn)

    def _unavailable(self, name: str, conn: socket.socket) -> None:
        tls = any(listener.tls for listener in self._listeners if listener.name == name)
        _unavailable(conn, plain=not tls)

    def worker_changed(self) -> None:
        self.changed()

    def changed(self) -> None:
        """A worker's state or load changed: place what waits, if anyone can take it."""
        ready, busy = self._ready() if self._waiting else ([], set())
        while self._waiting:
            worker = self._choose(ready, busy)
            if worker is None:
                return
            since, name, conn, address = self._waiting.popleft()
            self._metrics.dispatch_waited(time.monotonic() - since)
            self._assign(worker, busy)
            self._send(worker, name, conn.family, [(conn.detach(), address)])
        if not self._backing_off:
            self.start()

    def _accept(self, listener: Listener) -> None:
        # The raw accept: a descriptor is all fdserver passes on, so no
        # socket object is built (and detached) for each connection.
        taken = list(accepted(nonblocking_accept(listener.sock, raw_accept(listener.sock)),
                              ACCEPT_BATCH, lambda exc: self._accept_failed(listener, exc)))
        # Of this listener, not of its name: IPv4 and IPv6 ones may share one.
        family = listener.sock.family
        # One message per worker for what this wakeup accepted.
        batches: dict[Peer, list[tuple[int, Any]]] = {}
        ready, busy = self._ready()
        for fd, address in taken:
            worker = self._choose(ready, busy)
            if worker is None:
                self._wait(listener.name, socket.socket(family, socket.SOCK_STREAM, 0, fd),
                           address)
                continue
            self._assign(worker, busy)       # counts at once for the next choice
            batches.setdefault(worker, []).append((fd, address))
        for worker, batch in batches.items():
            self._metrics.dispatched_at_once += len(batch)
            self._send(worker, listener.name, family, batch)

    def _accept_failed(self, listener: Listener, exc: OSError) -> None:
        if exc.errno == errno.EINVAL:
            _set_aside(self._loop, listener, self._watch_again)
            return
        # Out of descriptors: stop for a moment, the backlog holds the rest.
        log.warning("accept on %s failed: %s", listener.address, exc.strerror)
        self.pause()
        self._backing_off = True
        self._loop.call_later(0.1, self._back_on)

    def _back_on(self) -> None:
        self._backing_off = False
        if len(self._waiting) < self.max_waiting:
            self.start()

    def _ready(self) -> tuple[list[Peer], set[Peer]]:
        """The workers that can take connections, and those of them still busy
        reading what they were sent."""
        ready = [p for p in self._workers() if takes_connections(p, dispatch=True)]
        return ready, {p for p in ready if p.channel.peer_has_unread()}

    @staticmethod
    def _choose(ready: list[Peer], busy: set[Peer]) -> Peer | None:
        # The fewest open connections (keep-alive ones stay where they are
        # placed, so the counts must stay even), then idle first, then the
        # one served longest ago.  A send that failed closes a worker between
        # _ready() and here: it no longer counts.
        return min((p for p in ready if p.channel.usable),
                   key=lambda p: (estimate(p), p in busy, p.last_dispatch), default=None)

    def _assign(self, worker: Peer, busy: set[Peer]) -> None:
        worker.dispatched += 1
        worker.last_dispatch = next(self._sequence)
        busy.add(worker)                     # it has this one to read now

    def _send(self, worker: Peer, name: str, family: socket.AddressFamily,
              batch: list[tuple[int, Any]]) -> None:
        peers = [[a[0], a[1]] if isinstance(a, tuple) else [str(a), 0] for _, a in batch]
        worker.channel.send(
            {"type": "connections", "listener": name, "family": family.name,
             "peers": peers, "fds": len(batch)},
            [fd for fd, _ in batch], owned=True)

    def take_back(self, messages: list[tuple[Message, list[int]]]) -> None:
        """Connections sent to a worker whose channel closed before they went
        out: place them again, first in line."""
        # As old as the oldest waiting, so the line stays in order of age.
        since = self._waiting[0][0] if self._waiting else time.monotonic()
        for message, fds in messages[::-1]:
            if message["type"] != "connections" or self._closed:
                for fd in fds:
                    self._unavailable(str(message.get("listener")), socket.socket(fileno=fd))
                continue
            family = socket.AddressFamily[str(message.get("family"))]
            # One peer per descriptor: _send built both from one batch.
            for fd, peer in reversed(list(zip(fds, message["peers"], strict=True))):
                conn = socket.socket(family, socket.SOCK_STREAM, 0, fd)
                self._waiting.appendleft((since, message["listener"], conn, tuple(peer)))
        self._waiting_grew()
        self._loop.call_soon(self.changed)

    def _wait(self, name: str, conn: socket.socket, address: Any) -> None:
        self._waiting.append((time.monotonic(), name, conn, address))
        self._waiting_grew()

    def _waiting_grew(self) -> None:
        """Stop accepting once the line is full; expire what waits too long."""
        if len(self._waiting) >= self.max_waiting:
            self.pause()
        if self._expiry is None and self._waiting:
            self._expiry = self._loop.call_later(self.wait_timeout, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        deadline = time.monotonic() - self.wait_timeout
        expired = 0
        while self._waiting and self._waiting[0][0] <= deadline:
            _, name, conn, _ = self._waiting.popleft()
            self._unavailable(name, conn)
            expired += 1
        if expired:
            self._metrics.dispatch_expired += expired
            log.warning("no ready worker: answered %d waiting connections with 503", expired)
            if not self._backing_off:
                self.start()
        if self._waiting:
            self._expiry = self._loop.call_later(
                self._waiting[0][0] + self.wait_timeout - time.monotonic(), self._expire)


def _unavailable(conn: socket.socket, plain: bool = True) -> None:
    """Answer 503 (a TLS client, *plain* False, can read none) and close,
    reading first so the close sends FIN, not RST."""
    try:
        conn.setblocking(False)
    except OSError:
        pass
    else:
        _read_pending(conn)
    if plain:
        try:
            conn.send(UNAVAILABLE)
        except OSError:
            pass
    conn.close()


def _read_and_close(conn: socket.socket) -> None:
    """Close a non-blocking *conn*, reading what it sent first (FIN, not RST)."""
    _read_pending(conn)
    conn.close()


def _read_pending(conn: socket.socket) -> None:
    """Read and drop what a non-blocking *conn* has sent so far (bounded)."""
    try:
        for _ in range(16):
            if not conn.recv(65536):
                break
    except OSError:
        pass
