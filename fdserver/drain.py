"""Graceful drain for a Tornado HTTPServer whose listeners are shared.

Tornado's own ``close_all_connections`` aborts in-flight work, so a drain
here is done by hand:

* accepting stops first: fdapp's acceptor (:mod:`fdserver.acceptor`) closes
  this process's copies of the listeners, and ``drain()`` calls ``stop()``
  for any added with ``add_sockets`` (close, never ``shutdown()``: the kernel
  socket and its accept queue live on in fdserver and the other workers, so
  nothing queued is lost);
* a request in flight when the drain starts, or arriving during it, is
  answered with ``Connection: close`` (HTTP/1.0: without ``Keep-Alive``) and
  its connection closed after the response; one whose response had already
  started (and so promised keep-alive) finishes, then its connection is
  treated as idle;
* a keep-alive connection is closed only once it has been idle for *grace*
  seconds with no bytes pending, so a client in the middle of sending its
  next request is not cut off;
* a connection its handler took over from HTTP (a websocket) is counted
  until it closes; at the start of the drain its handler says goodbye: its
  ``on_drain()`` if it has one, else a close frame 1001 Going Away (the
  client may reconnect at once: the other workers are up);
* at the deadline whatever remains is closed.

docs/drain.md tells the whole story.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

# tornado.websocket is imported at the top on purpose: apps that only `import
# tornado` (Tornado's own websocket demo) find tornado.websocket through it.
from tornado import httputil
from tornado.http1connection import HTTP1ServerConnection
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream
from tornado.websocket import WebSocketHandler

from ._tornado import (
    buffered,
    close_after_response,
    close_if_kept_alive,
    detached,
    handler_of,
    headers_arrived,
    lingering_ended,
    promise_no_keep_alive,
    response_started,
    trust_forwarded_from,
)

log = logging.getLogger("fdapp")

# A shed is done within this long, or not at all (a connection of a pool
# may carry a request every few seconds); a new ask replaces it.
SHED_WINDOW = 10.0
# How often connections taken over from HTTP (websockets) are checked for
# having closed: they have no close callback of ours to tell.
DETACHED_CHECK = 1.0
DETACHED_CHECK_DRAINING = 0.05


class DrainingHTTPServer(HTTPServer):
    """An HTTPServer that knows which of its connections are idle."""

    def initialize(self, *args: Any, forwarded_allow_ips: Any = None, **kwargs: Any) -> None:
        # With xheaders: the peers (fdserver.forwarded.TrustedProxies) whose
        # X-Forwarded-For is believed; None believes anyone (Tornado's way).
        super().initialize(*args, **kwargs)
        self._forwarded_allow_ips = forwarded_allow_ips
        # connection -> (its current request, monotonic time that request
        # began waiting for its headers, the app's delegate for it)
        self._requests: dict[HTTP1ServerConnection, tuple[Any, float, Any]] = {}
        # streams taken over from HTTP (websockets) -> their handler, if known
        self._detached: dict[IOStream, Any] = {}
        self._checking: asyncio.TimerHandle | None = None
        self._goodbyes: set[asyncio.Future[Any]] = set()    # on_drain() under way
        # Counted here rather than read off Tornado's private set: every
        # handle_stream ends in exactly one on_close.
        self._open = 0
        # Requests whose headers arrived (fdapp --max-requests counts them).
        self.requests = 0
        self._draining = False
        self._shed = 0              # keep-alive connections still to end (shed())
        self._shed_until = 0.0
        self._grace = 0.0
        self._drained: asyncio.Future[None] | None = None
        # Called whenever a connection opens or closes (load reports).
        self.on_connections_changed: Callable[[], None] = lambda: None

    @property
    def connection_count(self) -> int:
        return self._open + len(self._detached)

    @property
    def draining(self) -> bool:
        return self._draining

    def start_request(self, server_conn: object,
                      request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        # Tornado calls this when a connection is ready for its next request;
        # it is idle until that request's headers arrive.  Only the request
        # is noted: whether its headers came is read off it when it matters
        # (headers_arrived), so serving a request costs no wrapper.
        conn = cast(HTTP1ServerConnection, server_conn)     # what Tornado passes
        now = time.monotonic()
        previous = self._requests.get(conn)
        if previous is not None and headers_arrived(previous[0]):
            self.requests += 1
        if self.xheaders and self._forwarded_allow_ips is not None:
            # HTTPServer reads xheaders right here, for this request only.
            self.xheaders = trust_forwarded_from(request_conn, self._forwarded_allow_ips)
            try:
                delegate = super().start_request(server_conn, request_conn)
            finally:
                self.xheaders = True
        else:
            delegate = super().start_request(server_conn, request_conn)
        self._requests[conn] = (request_conn, now, delegate)
        if self._draining:
            self._check_idle_later(conn, request_conn, now)
            promise_no_keep_alive(request_conn)
        elif self._shed and now < self._shed_until:
            close_if_kept_alive(request_conn, self._shed_one)
        return delegate

    def shed(self, connections: int) -> None:
        """End *connections* keep-alive connections after their next
        responses ("Connection: close"), within SHED_WINDOW: fdserver saw
        this process hold more than its part, and their clients' next
        connections go to the others.  Replaces what an earlier shed left."""
        self._shed = max(0, connections)
        self._shed_until = time.monotonic() + SHED_WINDOW
        # The requests under way, and the connections waiting for their next
        # one (an idle pool's), decide as their responses start.
        for request, _, _ in self._requests.values():
            if not response_started(request):
                close_if_kept_alive(request, self._shed_one)

    def _shed_one(self, stream: IOStream) -> bool:
        """As a keep-alive response starts: end its connection after it?"""
        if self._draining or self._shed <= 0 or time.monotonic() >= self._shed_until:
            return False
        if _input_pending(stream):
            return False        # its client's next request is here already: serve it
        self._shed -= 1
        return True

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        self._open += 1
        super().handle_stream(stream, address)
        self.on_connections_changed()

    def on_close(self, server_conn: object) -> None:
        conn = cast(HTTP1ServerConnection, server_conn)
        self._open -= 1
        entry = self._requests.pop(conn, None)
        if entry is not None and headers_arrived(entry[0]):
            self.requests += 1
        if entry is not None and detached(entry[0]) and not conn.stream.closed():
            # Taken over (a websocket): HTTP is done with it, the client is not.
            handler = handler_of(entry[2])
            self._detached[conn.stream] = handler
            if self._draining:
                self._say_goodbye(handler)
            self._check_detached_later()
        super().on_close(server_conn)
        self.on_connections_changed()
        self._maybe_drained()

    def _maybe_drained(self) -> None:
        if (self._drained and not self._open and not self._detached
                and not self._drained.done()):
            self._drained.set_result(None)

    def _check_detached_later(self) -> None:
        if self._checking is None and self._detached:
            delay = DETACHED_CHECK_DRAINING if self._draining else DETACHED_CHECK
            self._checking = asyncio.get_running_loop().call_later(delay, self._check_detached)

    def _check_detached(self) -> None:
        self._checking = None
        closed = [stream for stream in self._detached if stream.closed()]
        for stream in closed:
            del self._detached[stream]
        if closed:
            self.on_connections_changed()
            self._maybe_drained()
        self._check_detached_later()

    def _say_goodbye(self, handler: Any) -> None:
        """A taken-over connection's last word: the handler's on_drain(), or
        a websocket's close frame 1001 Going Away."""
        if handler is None:
            return          # not a handler we know: it ends by itself or at the deadline
        try:
            on_drain = getattr(handler, "on_drain", None)
            if not callable(on_drain):
                _going_away(handler)
                return
            result = on_drain()
            if inspect.isawaitable(result):
                goodbye = asyncio.ensure_future(result)
                self._goodbyes.add(goodbye)
                goodbye.add_done_callback(lambda done: self._said_goodbye(handler, done))
        except Exception as exc:
            self._goodbye_failed(handler, exc)

    def _said_goodbye(self, handler: Any, done: asyncio.Future[Any]) -> None:
        self._goodbyes.discard(done)
        if not done.cancelled() and done.exception() is not None:
            self._goodbye_failed(handler, done.exception())

    def _goodbye_failed(self, handler: Any, exc: BaseException | None) -> None:
        log.error("on_drain of %s failed: %s: %s; closing it with 1001",
                  type(handler).__name__, type(exc).__name__, exc)
        _going_away(handler)

    async def drain(self, timeout: float, grace: float) -> int:
        """Stop accepting and wait for the connections to end.

        Returns how many connections were still open at the deadline (and
        were closed then).
        """
        began = time.monotonic()
        self._draining = True
        self._grace = grace
        self._drained = asyncio.get_running_loop().create_future()
        # Tornado's own option, read as each request's headers are parsed:
        # from now on a response says "Connection: close" and ends its
        # connection.  Requests already past their headers are told below.
        self.conn_params.no_keep_alive = True
        self.stop()
        for handler in list(self._detached.values()):
            self._say_goodbye(handler)
        if self._checking is not None:       # check more often from now on
            self._checking.cancel()
            self._checking = None
        self._check_detached_later()
        for conn, (request, since, _) in list(self._requests.items()):
            if not headers_arrived(request):
                self._check_idle_later(conn, request, since)
                promise_no_keep_alive(request)
            elif not response_started(request):
                close_after_response(request)
                promise_no_keep_alive(request)
            # else its headers went out saying keep-alive: closing right after
            # the response would fail the client's next request.  Once done,
            # the connection waits for that request as an idle one does.
        if self._open or self._detached:
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), timeout)
            except TimeoutError:
                left = self.connection_count
                for conn in list(self._requests):
                    conn.stream.close()
                for stream in list(self._detached):
                    stream.close()
                return left
        # Connections ended after a response linger until their clients have
        # read it (see _tornado.LINGER): exiting would reset them.
        await lingering_ended(max(0.0, began + timeout - time.monotonic()))
        return 0

    def _check_idle_later(self, conn: HTTP1ServerConnection, request: Any, since: float) -> None:
        delay = max(0.0, since + self._grace - time.monotonic())
        asyncio.get_running_loop().call_later(delay, self._close_if_idle, conn, request)

    def _close_if_idle(self, conn: HTTP1ServerConnection, request: Any) -> None:
        current = self._requests.get(conn)
        if current is None or current[0] is not request or headers_arrived(request):
            return      # gone, busy (no_keep_alive ends it), or on to its next request
        # Bytes buffered by Tornado or waiting in the kernel mean a request is
        # on its way in: serve it (with Connection: close) rather than cut it.
        if _input_pending(conn.stream):
            self._check_idle_later(conn, request, time.monotonic())
            return
        conn.stream.close()


def _going_away(handler: Any) -> None:
    if isinstance(handler, WebSocketHandler):
        handler.close(1001, "going away")


def _input_pending(stream: IOStream) -> bool:
    """Bytes of a client's next request: buffered by Tornado, or in the kernel."""
    return bool(buffered(stream)) or _input_waiting(stream.socket)


def _input_waiting(sock: socket.socket | None) -> bool:
    if sock is None:
        return False
    try:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True         # decrypted, not yet read by Tornado
        # The TCP socket's own recv: an SSLSocket's refuses flags.
        return bool(socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return False            # reset: closing it is all that is left
