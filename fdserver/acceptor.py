"""How a worker takes connections: from the shared listeners, or from fdserver.

Shared mode.  Tornado's own accept loop takes up to 128 connections per
wakeup (its comment admits this hurts balance across processes): with one
listening socket shared by many processes, whichever process wakes first
grabs a whole burst.  So fdapp accepts itself, a few at a time, and holds
back while it has more than its share of the open connections: the share
comes from fdserver (``share``: total open, ready workers), the own count is
exact.  Holding back leaves the connection in the kernel's queue for another
worker: a process just over its share lets its other events run first (no
idle CPU, which matters when connections are short-lived); one at twice its
share sleeps for PAUSE so that the others get the CPU to accept (which
matters for a burst of keep-alive connections on few cores).  After holding
back one connection is taken, so a worker never starves its clients when
the others are stuck.

With more ready workers than CPUs they cannot all run at once, so taking
one connection per loop pass while over the share hands a burst to the few
that run.  There a worker also reads the kernel's accept queue length at
each wakeup and counts it in the share (a burst is split in proportion),
steps aside (PAUSE, longer with many workers per CPU) as soon as it holds
its share, no slack, while connections wait, and takes the one connection
after stepping aside only when the others seem stuck: the queue did not
shrink meanwhile, and it stepped aside VALVE_PAUSES times in a row.  The
share lags (reports, and fdserver publishing only changes that matter):
right after a wave of short connections it still counts them, and is too
generous for a burst that follows.  So with more connections waiting than workers, one that took its
part of them (what it took plus those waiting, over the workers; not
counting the connections it held when the queue was last short) steps
aside too.  With no more workers than CPUs all that would only leave a core
idle.

fdapp's own IOStream (fewer system calls per request) is
:class:`fdserver._tornado.FastStream`.

Dispatch mode.  fdserver accepts and sends each connection over the
registration channel; the worker wraps it in an IOStream and hands it to
Tornado's ``HTTPServer.handle_stream``.

On a listener marked for the PROXY protocol (``fdserver --proxy-protocol``)
each connection's header is read first (:mod:`fdserver.proxyproto`), off the
event loop's critical path and under a deadline, and the address it carries
is the one the app sees; a connection with a bad header is closed.

Either way the worker reports its open connections (``load``), coalesced to
at most one report per REPORT_INTERVAL in dispatch mode, and in shared mode as
:func:`fdserver.protocol.shared_report_interval` says (fdserver's rebalancing
reads the same rule; see :meth:`Acceptor.changed`).  A heartbeat carries the
load too, when it changed and fdserver takes it there: with so many workers
that a report would wait as long as the next heartbeat, the heartbeat is the
report, and fdserver reads one message a second from each worker, not two.

TLS.  A connection on a listener with a context in ``contexts`` (fdserver's
TLS listeners, or all of them if the app's own HTTPServer has
``ssl_options``) is wrapped as Tornado's TCPServer would, and served with
:class:`fdserver._tornado.FastTLSStream`: the same savings, and a handshake
with fewer detours.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import math
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any, Final

from . import _tornado
from .accept import OUT_OF_DESCRIPTORS, accept_queue, accepted
from .drain import DrainingHTTPServer
from .protocol import HEARTBEAT_INTERVAL, LoadMessage, on_the_tick, shared_report_interval
from .proxyproto import DEFAULT_TIMEOUT, ProxyProtocolError, read_header
from .tls import LISTENER_ATTRIBUTE

log = logging.getLogger("fdapp")

ACCEPT_BATCH = 8            # Tornado takes up to 128 per wakeup
# Stepping aside when at twice the share.  5 ms left cores idle with short
# connections (8 workers: 4k req/s in some runs against 7k); 1 ms still lets
# the others accept a keep-alive burst.
PAUSE = 0.001
# With more workers than CPUs, the pauses in a row after which a worker over
# its share takes a connection anyway if the queue did not shrink (the others
# may be stuck): together about a millisecond per worker per CPU, a round of
# the CPUs (see Acceptor._pause_length).
VALVE_PAUSES = 8
REPORT_INTERVAL = 0.02      # dispatch mode: at most 50 load reports a second
BROKEN_LISTENER_PAUSE = 1.0  # a listener shut down by some holder: try again after
SLACK = 1                   # connections over the share before yielding
CPUS = len(os.sched_getaffinity(0))
MAX_PROXY_PENDING = 1024    # connections waiting for their PROXY header at once
PROXY_LOG_BURST = 10        # bad PROXY headers logged per PROXY_LOG_WINDOW
PROXY_LOG_WINDOW = 10.0


class Excess(enum.IntEnum):
    """How far over its share of the open connections a worker is."""

    NONE = 0        # within it: accept
    OVER = 1        # over it: let the others go first (yield to the loop)
    DOUBLE = 2      # twice it, or its part of a burst taken: step aside for PAUSE


# Looking a member up on its class costs a descriptor call; the accept loop
# runs excess() before every connection, so it uses these.
_NONE: Final = Excess.NONE
_OVER: Final = Excess.OVER
_DOUBLE: Final = Excess.DOUBLE


class _Connection(socket.socket):
    """A connected TCP socket that remembers its family.

    Tornado reads ``family`` for each connection's request context, and
    ``ssl.SSLContext.wrap_socket`` reads ``type``; socket.socket converts
    each to an enum every time.
    """

    __slots__ = ("_family",)

    def __init__(self, family: socket.AddressFamily, type: int = socket.SOCK_STREAM,
                 proto: int = 0, fileno: int | None = None) -> None:
        super().__init__(family, type, proto, fileno)
        self._family = family

    @property
    def family(self) -> socket.AddressFamily:
        return self._family

    @property
    def type(self) -> socket.SocketKind:
        return socket.SOCK_STREAM


class Acceptor:
    """Feeds connections to a DrainingHTTPServer and reports the load."""

    def __init__(self, server: DrainingHTTPServer, report: Callable[[LoadMessage], None], *,
                 balance: bool = True, fast: bool | None = None,
                 proxied: frozenset[str] = frozenset(),
                 proxy_timeout: float = DEFAULT_TIMEOUT) -> None:
        self.server = server
        # Names of the listeners whose connections start with a PROXY header.
        self.proxied = proxied
        self.proxy_timeout = proxy_timeout
        self._proxy_pending: set[asyncio.Task[None]] = set()
        self._proxy_log = (0.0, 0, 0)      # window start, logged in it, suppressed
        self.balance = balance
        # fdapp's own IOStream and accept, unless this Tornado changed what
        # they rely on (see fdserver._tornado).
        self.fast = _tornado.usable() if fast is None else fast
        self._stream_class = _tornado.stream_class(self.fast)
        self._tls_stream_class = _tornado.stream_class(self.fast, tls=True)
        self._report = report
        self._loop = asyncio.get_running_loop()
        # listener name -> the context its connections are served with (TLS)
        self.contexts: dict[str, ssl.SSLContext] = {}
        self._names: dict[int, str] = {}          # a listener's descriptor -> its name
        self._sockets: list[socket.socket] = []
        self._paused = False
        self._valve = False               # one accept allowed right after a pause
        self._waiting = 0                 # in the accept queue, as this wakeup began
        self._accepting: int | None = None  # the listener of this wakeup
        # listener -> its queue length when this worker last stepped aside
        self._queue_at_pause: dict[int, int] = {}
        self._stepped_aside = 0           # times in a row, with connections waiting
        self._share: tuple[int, int] | None = None
        # Open connections when the accept queue was last short: what the
        # worker takes of a burst is what it holds above that.
        self._burst_base = 0
        self._reported = 0                # open connections in our last report
        self._received = 0                # dispatched connections received so far
        self._reported_received = 0       # ... as of our last report
        self._report_pending = False
        self._report_due = 0.0            # the tick of the last report scheduled
        self._failing: set[socket.socket] = set()  # accept failed with EINVAL (said once)
        # fdserver takes the load in heartbeats (its welcome said so)
        self.load_in_beats = False
        server.on_connections_changed = self.changed

    # -- shared mode ---------------------------------------------------------

    def start(self, sockets: list[socket.socket], names: list[str] | None = None) -> None:
        """Accept on *sockets*, the listeners called *names* (for TLS and listener_of)."""
        self._sockets = list(sockets)
        self._names = {sock.fileno(): name for sock, name in zip(sockets, names or [],
                                                                  strict=False)}
        self._watch()

    def close(self) -> None:
        """Stop accepting and close this process's copies (never shutdown())."""
        self._unwatch()
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    def stop_accepting(self) -> None:
        """Stop accepting but keep the sockets open (dispatch mode holds them)."""
        self._unwatch()
        self._sockets = []

    def restart_counts(self) -> None:
        """A new fdserver knows nothing of what the old one sent: count afresh."""
        self._received = 0
        self._reported = -1               # forces the next report
        self._share = None
        self.changed()

    def on_share(self, connections: int, workers: int) -> None:
        self._share = (connections, max(workers, 1))

    def _watch(self) -> None:
        for sock in self._sockets:
            self._watch_one(sock)

    def _watch_one(self, sock: socket.socket) -> None:
        self._loop.add_reader(sock.fileno(), self._accept, sock,
                              _tornado.raw_accept(sock, self.fast), sock.family,
                              self._names.get(sock.fileno(), ""))

    def _unwatch(self) -> None:
        for sock in self._sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())

    def excess(self, waiting: int = 0) -> Excess:
        """How far over its share of the open connections this process is.

        *waiting*: the connections in the kernel's accept queue (read only
        when bursts matter): they count in the share, so that a burst is
        split over the workers.  DOUBLE also when it took its part of a
        burst: stepping aside for a moment gives the others the CPU to accept.
        """
        if not self.balance or self._share is None:
            return _NONE
        total, workers = self._share
        own = self.server.connection_count
        # Of a burst, what it took (not the connections it held before:
        # those the share counts).
        taken = max(0, own - self._burst_base)
        if waiting >= workers and taken >= math.ceil((taken + waiting) / workers) + SLACK:
            return _DOUBLE
        # The others' part of the total, as fdserver last saw it, plus ours
        # now, plus what waits to be taken.
        share = math.ceil((max(0, total - self._reported) + own + waiting) / workers)
        if waiting and workers > CPUS:
            # Taking one connection per loop pass while over the share hands
            # a burst to the few workers that run: at its share (no slack:
            # with as many connections as workers, a slack of one would
            # leave half of them without) a worker steps aside, the others
            # need the CPU to take theirs.
            return _DOUBLE if own >= share else _NONE
        if own >= 2 * share + SLACK:
            return _DOUBLE
        return _OVER if own >= share + SLACK else _NONE

    def _pause_length(self) -> float:
        """PAUSE; with many workers per CPU, longer: a worker stepping aside
        wakes up at each end of it, and hundreds of them waking every
        millisecond would keep the others from the CPU they are waiting for."""
        if self._share is None:
            return PAUSE
        return PAUSE * max(1.0, self._share[1] / (CPUS * VALVE_PAUSES))

    def _bursts_matter(self) -> bool:
        return self.balance and self._share is not None and self._share[1] > CPUS

    def _accept(self, sock: socket.socket, accept: Callable[[], tuple[int, Any]],
                family: socket.AddressFamily, name: str) -> None:
        # At least the one that woke us: with hundreds of workers woken by
        # one connection, the queue read empty a moment ago may not be now.
        waiting = max(1, _accept_queue_length(sock)) if self._bursts_matter() else 0
        in_burst = waiting > 0 and self._share is not None and waiting >= self._share[1]
        if self._valve and self._stepped_aside and self._share is not None:
            # Back from stepping aside.  The one connection taken then is for
            # when the others are stuck, not merely waiting for a CPU: not if
            # the queue shrank meanwhile (they are taking their part), nor
            # before they all could have run once (a round of the CPUs).
            before = self._queue_at_pause.pop(sock.fileno(), 0)
            if waiting < before or self._stepped_aside < VALVE_PAUSES:
                self._valve = False
        self._burst_base = min(self._burst_base, self.server.connection_count)
        self._waiting = waiting
        self._accepting = sock.fileno()
        # *accept* is the socket's raw accept (what socket.accept() calls):
        # wrapping the descriptor here with the family known saves the enum
        # conversions socket.accept() does for every connection.
        for fd, address in accepted(accept, ACCEPT_BATCH,
                                    lambda exc: self._accept_failed(exc, sock),
                                    self._may_take if self.balance else None):
            if self._waiting > 1:       # never below 1 when bursts matter (see above)
                self._waiting -= 1
            self._serve(_Connection(family, fileno=fd), address, name)
        if not in_burst:            # what it holds now is the share's business
            self._burst_base = self.server.connection_count

    def _may_take(self) -> bool:
        """The balancing, before each accept: take, or hold back (see above)."""
        if self._valve:
            self._valve = False
            self._stepped_aside = 0
            return True
        excess = self.excess(self._waiting)
        if excess is _DOUBLE:
            if self._accepting is not None and self._bursts_matter():
                self._queue_at_pause[self._accepting] = self._waiting
                self._stepped_aside += 1
            self._pause(self._pause_length())
        elif not excess:
            self._stepped_aside = 0
        else:
            # Let the events already due run first; the listener is
            # level-triggered, so the loop comes back here at once.
            self._valve = True
        return not excess

    def _accept_failed(self, exc: OSError, sock: socket.socket) -> None:
        if exc.errno == errno.EINVAL:
            # Shut down by some holder (it stays readable: watching it would
            # spin); fdserver listens on it again within GUARD_INTERVAL.
            if sock not in self._failing:       # said once, tried every second
                self._failing.add(sock)
                log.warning("accept on listener fd %d failed: %s (shut down by a process "
                            "holding it?); trying again every %gs", sock.fileno(),
                            exc.strerror, BROKEN_LISTENER_PAUSE)
            self._loop.remove_reader(sock.fileno())
            self._loop.call_later(BROKEN_LISTENER_PAUSE, self._rewatch, sock)
            return
        if exc.errno not in OUT_OF_DESCRIPTORS:
            raise exc
        log.warning("accept failed: %s; pausing", exc.strerror)
        self._pause(0.1)

    def _rewatch(self, sock: socket.socket) -> None:
        # Not while paused (resuming watches them all) or once closed.
        if not self._paused and sock in self._sockets:
            self._watch_one(sock)

    def _pause(self, seconds: float) -> None:
        if self._paused:
            return
        self._paused = True
        self._unwatch()
        self._loop.call_later(seconds, self._resume)

    def _resume(self) -> None:
        self._paused = False
        if self._sockets:
            self._valve = True
            self._watch()

    # -- dispatch mode -------------------------------------------------------

    def on_connection(self, fd: int, peer: Any,
                      family: socket.AddressFamily = socket.AF_INET, name: str = "") -> None:
        self._received += 1
        # Family and type given: no getsockopt calls to find them out.
        conn = _Connection(family, fileno=fd)
        address = tuple(peer) if isinstance(peer, list) and len(peer) == 2 else ("", 0)
        self._serve(conn, address, name)

    # -- both ----------------------------------------------------------------

    def _serve(self, conn: socket.socket, address: Any, name: str = "") -> None:
        if name in self.proxied:
            if len(self._proxy_pending) >= MAX_PROXY_PENDING:
                self._proxy_failed(address, f"{MAX_PROXY_PENDING} connections already wait "
                                            "for their PROXY header")
                conn.close()
                return
            task = asyncio.ensure_future(self._serve_proxied(conn, address, name))
            self._proxy_pending.add(task)
            task.add_done_callback(self._proxy_pending.discard)
            return
        self._serve_stream(conn, address, name)

    async def _serve_proxied(self, conn: socket.socket, address: Any, name: str) -> None:
        conn.setblocking(False)
        try:
            header = await read_header(conn, self.proxy_timeout)
        except ProxyProtocolError as exc:
            self._proxy_failed(address, str(exc))
            conn.close()
            return
        except BaseException:
            conn.close()
            raise
        self._serve_stream(conn, header.source or address, name)

    def _proxy_failed(self, address: Any, why: str) -> None:
        """Log a refused connection, at most PROXY_LOG_BURST lines a window."""
        now = self._loop.time()
        start, logged, suppressed = self._proxy_log
        if now - start >= PROXY_LOG_WINDOW:
            if suppressed:
                log.warning("closed %d more connections with a bad PROXY header in the "
                            "last %gs", suppressed, round(now - start, 1))
            start, logged, suppressed = now, 0, 0
        if logged < PROXY_LOG_BURST:
            peer = address[0] if isinstance(address, tuple) and address else "?"
            log.warning("closed a connection from %s: %s", peer, why)
            logged += 1
        else:
            suppressed += 1
        self._proxy_log = (start, logged, suppressed)

    def _serve_stream(self, conn: socket.socket, address: Any, name: str) -> None:
        """The hand-off point: *conn* carries the client's own bytes from here
        (after any PROXY header, before TLS), and *address* is the client's."""
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass            # already reset by the peer: Tornado finds out on reading
        # IOStream makes the socket non-blocking itself.
        context = self.contexts.get(name) if self.contexts else None
        stream: Any
        if context is None:
            stream = self._stream_class(conn, max_buffer_size=self.server.max_buffer_size,
                                        read_chunk_size=self.server.read_chunk_size)
        else:
            # As Tornado's TCPServer: the handshake happens on the loop.  The
            # context given: without it, the stream would make Tornado's default
            # client context, loading the system's CA certificates, on each
            # worker's first TLS connection.
            stream = self._tls_stream_class(
                context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False),
                ssl_options=context, max_buffer_size=self.server.max_buffer_size,
                read_chunk_size=self.server.read_chunk_size)
        if name:
            setattr(stream, LISTENER_ATTRIBUTE, name)
        self.server.handle_stream(stream, address)

    def changed(self) -> None:
        """Open connections changed: report soon (coalesced).

        In shared mode the interval grows with the workers (the share says
        how many): together they send fdserver about as many reports as
        REPORT_WORKERS workers would, whatever their number.
        """
        if not self._report_pending:
            interval = self.report_interval()
            if self.load_in_beats and interval >= HEARTBEAT_INTERVAL:
                return              # the next heartbeat comes as soon: it carries it
            self._report_pending = True
            # On the tick shared by every worker: fdserver reads them together;
            # after the last report's, even if a coarser timer ran that one early.
            self._report_due = on_the_tick(self._loop.time(), interval, self._report_due)
            self._loop.call_at(self._report_due, self._send_report)

    def report_interval(self) -> float:
        if self._share is None:             # dispatch mode, or no share yet
            return REPORT_INTERVAL
        return shared_report_interval(self._share[1])

    def load_for_beat(self) -> tuple[int, int] | None:
        """(connections, received) for a heartbeat to carry, if they changed
        since the last report and fdserver takes them there; else None."""
        return self._unreported() if self.load_in_beats else None

    def _send_report(self) -> None:
        self._report_pending = False
        load = self._unreported()
        if load is not None:
            self._report({"type": "load", "connections": load[0], "received": load[1]})

    def _unreported(self) -> tuple[int, int] | None:
        """The load, if it changed since the last report (which this now is)."""
        load = (self.server.connection_count, self._received)
        if load == (self._reported, self._reported_received):
            return None
        self._reported, self._reported_received = load
        return load


def _accept_queue_length(sock: socket.socket) -> int:
    """Connections waiting to be accepted on a listener (Linux's TCP_INFO)."""
    queue = accept_queue(sock)
    return queue[0] if queue else 0
