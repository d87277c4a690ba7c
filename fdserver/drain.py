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
* at the deadline whatever remains is closed.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any, cast

from tornado import httputil
from tornado.http1connection import HTTP1ServerConnection
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream

from ._tornado import (
    buffered,
    close_after_response,
    headers_arrived,
    promise_no_keep_alive,
    response_started,
)


class DrainingHTTPServer(HTTPServer):
    """An HTTPServer that knows which of its connections are idle."""

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        # connection -> (its current request, monotonic time that request
        # began waiting for its headers)
        self._requests: dict[HTTP1ServerConnection, tuple[Any, float]] = {}
        # Counted here rather than read off Tornado's private set: every
        # handle_stream ends in exactly one on_close.
        self._open = 0
        self._draining = False
        self._grace = 0.0
        self._drained: asyncio.Future[None] | None = None
        # Called whenever a connection opens or closes (load reports).
        self.on_connections_changed: Callable[[], None] = lambda: None

    @property
    def connection_count(self) -> int:
        return self._open

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
        self._requests[conn] = (request_conn, now)
        if self._draining:
            self._check_idle_later(conn, request_conn, now)
            promise_no_keep_alive(request_conn)
        return super().start_request(server_conn, request_conn)

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        self._open += 1
        super().handle_stream(stream, address)
        self.on_connections_changed()

    def on_close(self, server_conn: object) -> None:
        self._open -= 1
        self._requests.pop(cast(HTTP1ServerConnection, server_conn), None)
        super().on_close(server_conn)
        self.on_connections_changed()
        if self._drained and not self._open and not self._drained.done():
            self._drained.set_result(None)

    async def drain(self, timeout: float, grace: float) -> int:
        """Stop accepting and wait for the connections to end.

        Returns how many connections were still open at the deadline (and
        were closed then).
        """
        self._draining = True
        self._grace = grace
        self._drained = asyncio.get_running_loop().create_future()
        # Tornado's own option, read as each request's headers are parsed:
        # from now on a response says "Connection: close" and ends its
        # connection.  Requests already past their headers are told below.
        self.conn_params.no_keep_alive = True
        self.stop()
        for conn, (request, since) in list(self._requests.items()):
            if not headers_arrived(request):
                self._check_idle_later(conn, request, since)
                promise_no_keep_alive(request)
            elif not response_started(request):
                close_after_response(request)
                promise_no_keep_alive(request)
            # else its headers went out saying keep-alive: closing right after
            # the response would fail the client's next request.  Once done,
            # the connection waits for that request as an idle one does.
        if not self._open:
            return 0
        try:
            await asyncio.wait_for(asyncio.shield(self._drained), timeout)
            return 0
        except TimeoutError:
            left = self._open
            for conn in list(self._requests):
                conn.stream.close()
            return left

    def _check_idle_later(self, conn: HTTP1ServerConnection, request: Any, since: float) -> None:
        delay = max(0.0, since + self._grace - time.monotonic())
        asyncio.get_running_loop().call_later(delay, self._close_if_idle, conn, request)

    def _close_if_idle(self, conn: HTTP1ServerConnection, request: Any) -> None:
        current = self._requests.get(conn)
        if current is None or current[0] is not request or headers_arrived(request):
            return      # gone, busy (no_keep_alive ends it), or on to its next request
        # Bytes buffered by Tornado or waiting in the kernel mean a request is
        # on its way in: serve it (with Connection: close) rather than cut it.
        if buffered(conn.stream) or _input_waiting(conn.stream.socket):
            self._check_idle_later(conn, request, time.monotonic())
            return
        conn.stream.close()


def _input_waiting(sock: socket.socket | None) -> bool:
    if sock is None:
        return False
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return False            # reset: closing it is all that is left
