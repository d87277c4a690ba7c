"""Graceful drain for a Tornado HTTPServer whose listeners are shared.

Tornado's own ``close_all_connections`` aborts in-flight work, so a drain
here is done by hand:

* accepting stops first: fdapp's acceptor (:mod:`fdserver.acceptor`) closes
  this process's copies of the listeners, and ``drain()`` calls ``stop()``
  for any added with ``add_sockets`` (close, never ``shutdown()``: the kernel
  socket and its accept queue live on in fdserver and the other workers, so
  nothing queued is lost);
* a request whose headers arrive during the drain is answered with
  ``Connection: close`` and its connection closed after the response;
* a keep-alive connection is closed only once it has been idle for *grace*
  seconds with no bytes pending, so a client in the middle of sending its
  next request is not cut off;
* at the deadline whatever remains is closed.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, Callable

from tornado import httputil
from tornado.http1connection import HTTP1Connection, HTTP1ServerConnection
from tornado.httpserver import HTTPServer


class DrainingHTTPServer(HTTPServer):
    """An HTTPServer that knows which of its connections are idle."""

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        # connection -> monotonic time it went idle, or None while busy
        self._idle_since: dict[HTTP1ServerConnection, float | None] = {}
        self._draining = False
        self._grace = 0.0
        self._drained: asyncio.Future[None] | None = None
        # Called whenever a connection opens or closes (load reports).
        self.on_connections_changed: Callable[[], None] = lambda: None

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def draining(self) -> bool:
        return self._draining

    def start_request(self, server_conn: object,
                      request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        # Tornado calls this when a connection is ready for its next request:
        # from now until headers arrive, the connection is idle.
        now = time.monotonic()
        self._idle_since[server_conn] = now
        if self._draining:
            self._check_idle_later(server_conn, now)
        delegate = super().start_request(server_conn, request_conn)
        return _BusyTracker(self, server_conn, request_conn, delegate)

    def handle_stream(self, stream: Any, address: tuple) -> None:
        super().handle_stream(stream, address)
        self.on_connections_changed()

    def on_close(self, server_conn: object) -> None:
        self._idle_since.pop(server_conn, None)
        super().on_close(server_conn)
        self.on_connections_changed()
        if self._drained and not self._connections and not self._drained.done():
            self._drained.set_result(None)

    async def drain(self, timeout: float, grace: float) -> int:
        """Stop accepting and wait for the connections to end.

        Returns how many connections were still open at the deadline (and
        were closed then).
        """
        self._draining = True
        self._grace = grace
        self._drained = asyncio.get_running_loop().create_future()
        self.stop()
        for conn, since in list(self._idle_since.items()):
            if since is not None:
                self._check_idle_later(conn, since)
        if not self._connections:
            return 0
        try:
            await asyncio.wait_for(asyncio.shield(self._drained), timeout)
            return 0
        except asyncio.TimeoutError:
            left = list(self._connections)
            for conn in left:
                conn.stream.close()
            return len(left)

    def _check_idle_later(self, conn: object, since: float) -> None:
        delay = max(0.0, since + self._grace - time.monotonic())
        asyncio.get_running_loop().call_later(delay, self._close_if_idle, conn, since)

    def _close_if_idle(self, conn: HTTP1ServerConnection, since: float) -> None:
        if self._idle_since.get(conn) != since:
            return          # busy again, or gone; a later idle period re-arms
        # Bytes buffered by Tornado or waiting in the kernel mean a request is
        # on its way in: serve it (with Connection: close) rather than cut it.
        if getattr(conn.stream, "_read_buffer_size", 0) or _input_waiting(conn.stream.socket):
            self._check_idle_later(conn, time.monotonic())
            return
        conn.stream.close()

    def _mark_busy(self, server_conn: object, request_conn: httputil.HTTPConnection) -> None:
        self._idle_since[server_conn] = None
        if self._draining and isinstance(request_conn, HTTP1Connection):
            # Tornado's own flag: adds "Connection: close" to an HTTP/1.1
            # response and closes the connection once it is written.
            request_conn._disconnect_on_finish = True


def _input_waiting(sock: socket.socket | None) -> bool:
    if sock is None:
        return False
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return False            # reset: closing it is all that is left


class _BusyTracker(httputil.HTTPMessageDelegate):
    """Passes a request through, telling the server when its headers arrive."""

    def __init__(self, server: DrainingHTTPServer, server_conn: object,
                 request_conn: httputil.HTTPConnection,
                 delegate: httputil.HTTPMessageDelegate) -> None:
        self._server = server
        self._server_conn = server_conn
        self._request_conn = request_conn
        self._delegate = delegate

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> Any:
        self._server._mark_busy(self._server_conn, self._request_conn)
        return self._delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        return self._delegate.data_received(chunk)

    def finish(self) -> None:
        self._delegate.finish()

    def on_connection_close(self) -> None:
        self._delegate.on_connection_close()
