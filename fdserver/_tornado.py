"""Every use of Tornado's private internals (and CPython's), in one place.

fdapp saves system calls per request by overriding private methods of
``IOStream`` and ``SSLIOStream`` (see :class:`FastStream` and
:class:`FastTLSStream`), and drains gracefully by reading a
few private attributes of ``HTTP1Connection``; it accepts with the socket's
private ``_accept`` (as fdserver does in dispatch mode, through
:func:`fdserver.accept.raw_accept`).  Nothing else in fdserver touches a
private name.

:func:`check` verifies that each of these still exists and has the shape
relied on; ``tests/test_tornado_seam.py`` checks each one's behaviour, and CI
runs the suite on the lowest and the newest Tornado of the supported range
(pyproject.toml), plus Tornado's own IOStream and HTTP tests with
:class:`FastStream` in place of ``IOStream`` (``tests/tornado_suite.py``).

If a future Tornado changes one of them, fdapp warns once at start-up and
falls back to stock Tornado: plain ``IOStream`` (``SSLIOStream`` for TLS,
still sending close_notify), ``socket.accept``, and a
drain that closes keep-alive connections only as their requests end or at
the deadline.  The site keeps serving, only slower.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import weakref
from collections.abc import Callable
from typing import Any

from tornado import httputil
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, SSLIOStream
from tornado.log import gen_log

from . import accept

log = logging.getLogger("fdapp")

# How long a response may take before its client's leaving is watched for.
CLOSE_WATCH_DELAY = 0.001

Accept = Callable[[], "tuple[int, Any]"]


# A connection the server ends after a response it chose to close (a
# drain's, a shed's) lingers: its sending side is shut down, and what the
# client still sends is read and dropped until it closes, for at most LINGER
# seconds.  Closed with unread input, the kernel would answer a reset and
# drop the end of the response still in its send buffer (RFC 9112, 9.6).
LINGER = 2.0
MAX_LINGERING = 1024        # beyond this many at once (one loop), a plain close


class _Lingering:
    """One event loop's lingering connections: socket -> (its fd, its deadline)."""

    def __init__(self) -> None:
        self.sockets: dict[socket.socket, tuple[int, asyncio.TimerHandle]] = {}
        self.none_left = asyncio.Event()        # bound to this loop at its first wait


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Lingering] = (
    weakref.WeakKeyDictionary())


def linger(sock: socket.socket, loop: asyncio.AbstractEventLoop) -> bool:
    """Take *sock* over and close it as above, on *loop*; False if not taken."""
    state = _by_loop.get(loop)
    if state is None:
        state = _by_loop[loop] = _Lingering()
    fd = sock.fileno()
    if fd < 0 or len(state.sockets) >= MAX_LINGERING:
        return False
    try:
        _close_notify(sock)
        socket.socket.shutdown(sock, socket.SHUT_WR)     # the TCP socket's own
    except OSError:
        return False            # the peer is gone: a plain close will do
    try:
        loop.add_reader(fd, _drop_input, state, loop, sock)
        timer = loop.call_later(LINGER, _end_lingering, state, loop, sock)
    except Exception:
        with contextlib.suppress(Exception):
            loop.remove_reader(fd)
        return False
    state.sockets[sock] = (fd, timer)
    state.none_left.clear()
    return True


def lingering(loop: asyncio.AbstractEventLoop) -> int:
    """How many connections linger on *loop*."""
    state = _by_loop.get(loop)
    return len(state.sockets) if state else 0


async def lingering_ended(timeout: float) -> None:
    """Until no connection lingers on this loop (see linger()), at most *timeout* seconds."""
    state = _by_loop.get(asyncio.get_running_loop())
    if state and state.sockets:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.none_left.wait(), timeout)


def _drop_input(state: _Lingering, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    try:
        data = socket.socket.recv(sock, 65536)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        data = b""
    if not data:
        _end_lingering(state, loop, sock)


def _end_lingering(state: _Lingering, loop: asyncio.AbstractEventLoop,
                   sock: socket.socket) -> None:
    entry = state.sockets.pop(sock, None)
    if entry is None:
        return
    fd, timer = entry
    timer.cancel()
    try:
        loop.remove_reader(fd)
        sock.close()
    finally:
        if not state.sockets:
            state.none_left.set()


def _close_notify(sock: socket.socket) -> None:
    if isinstance(sock, ssl.SSLSocket):
        try:
            sock.unwrap()       # sends close_notify; the peer's never awaited
        except (ssl.SSLError, OSError, ValueError):
            pass                # no handshake yet, the peer gone, or the buffer full


class FastStream(IOStream):
    """Tornado's IOStream, without system calls most requests do not need.

    Nagle: Tornado turns TCP_NODELAY on at the end of each response and off
    again once it is written: two setsockopt calls per request.  fdapp turns
    it on once per connection (as asyncio, Go's net/http and nginx on
    keep-alive connections do); a response still goes out as soon as it is
    written.

    Between requests: a keep-alive client's next request usually arrives
    while Tornado is still finishing the last one, not yet reading.  Tornado
    then reads it into its buffer and stops watching the socket (so that a
    client cannot make it buffer without limit), only to watch it again a
    moment later: two epoll_ctl calls and a wasted recv per request.  Here
    such a read, into an empty buffer, takes one chunk and keeps watching.
    If more comes (or the client's FIN) before Tornado takes what is
    buffered, watching stops unread, as Tornado's rule has it: what is
    buffered is served first, and the buffer holds at most one chunk.

    Watching for the client leaving: while a handler runs, Tornado watches
    the socket so that a client that leaves is noticed.  For a connection
    whose request came with it, that means an epoll_ctl to start and one to
    stop, though a quick response (and with "Connection: close", the end of
    the connection) mostly comes first.  Here the watch starts only once the
    response has taken CLOSE_WATCH_DELAY.
    """

    _close_watch: asyncio.TimerHandle | None = None
    linger_on_close = False     # set for a response that ends its connection: see LINGER

    def set_nodelay(self, value: bool) -> None:
        pass

    def close_fd(self) -> None:
        if (self.linger_on_close and self.socket is not None
                and linger(self.socket, self.io_loop.asyncio_loop)):  # type: ignore[attr-defined]
            self.socket = None  # type: ignore[assignment]   # as IOStream.close_fd leaves it
            return
        super().close_fd()

    def _handle_events(self, fd: Any, events: int) -> None:
        if events & IOLoop.READ and not self.reading() and not self.closed():
            if self._read_buffer_size:
                # Reading on could meet a FIN and close before the buffered
                # request is served.  (Tornado's own rule for what to watch.)
                state = IOLoop.ERROR | (IOLoop.WRITE if self.writing() else 0)
                if state != self._state:
                    self._state = state
                    self.io_loop.update_handler(fd, state)
                return
            try:
                self._read_to_buffer()      # closes the stream on EOF or reset
            except Exception as exc:        # as Tornado's _handle_read does
                gen_log.warning("error on read: %s", exc)
                self.close(exc_info=exc)
            return
        super()._handle_events(fd, events)

    def _maybe_add_error_listener(self) -> None:
        if self._state is None and not self.closed():      # not watched yet
            if self._close_watch is None:
                # The stream's own loop: it may be written to before that
                # loop runs.  Its asyncio loop directly: no wrapper per call.
                self._close_watch = self.io_loop.asyncio_loop.call_later(  # type: ignore[attr-defined]
                    CLOSE_WATCH_DELAY, self._watch_for_close)
            return
        super()._maybe_add_error_listener()

    def _watch_for_close(self) -> None:
        self._close_watch = None
        super()._maybe_add_error_listener()     # checks again: closed, reading...


class TLSStream(SSLIOStream):
    """Tornado's SSLIOStream, saying goodbye properly.

    Python closes a TLS socket without a close_notify alert, so a client
    cannot tell a clean close (a drained keep-alive connection, a
    ``Connection: close`` response) from a cut one.  Here the alert is sent
    first, as far as the socket takes it without waiting.  (``close_fd`` is
    public: a stream class's own way to close its descriptor.)
    """

    def close_fd(self) -> None:
        _close_notify(self.socket)
        super().close_fd()


class FastTLSStream(FastStream, TLSStream):
    """FastStream's savings on a TLS connection, and a server's handshake
    without Tornado's detours.

    Once the handshake is done, a TLS stream reads and writes as a plain one
    does, and FastStream's changes apply as they are (OpenSSL reads one
    record at a time, so what epoll reports is still what waits).  During
    the handshake Tornado's own rules hold, with two exceptions on the
    server side:

    * Tornado starts every handshake by waiting for the socket to be
      writable; a server's starts by reading the client's hello.  Watching
      for reading from the start saves an epoll_ctl each way and a
      handshake step that can only fail with "want read".
    * When the handshake completes on a read, what the client sent with its
      last handshake message (its request, as a rule) is read at once, not
      after another turn of the loop.
    """

    def _add_io_state(self, state: int) -> None:
        if (state == IOLoop.WRITE and self._state is None and self._ssl_accepting
                and getattr(self.socket, "server_side", False)):
            state = IOLoop.READ
        super()._add_io_state(state)

    def _handle_events(self, fd: Any, events: int) -> None:
        if self._ssl_accepting:
            TLSStream._handle_events(self, fd, events)     # Tornado's, handshake and all
        else:
            super()._handle_events(fd, events)

    def _handle_read(self) -> None:
        if self._ssl_accepting:
            self._do_ssl_handshake()
            if self._ssl_accepting or self.closed() or not self.reading():
                return
        super()._handle_read()


# -- the check ------------------------------------------------------------------------

# (what, the private name, what it must be): methods overridden or called,
# attributes read or written on a fresh instance.
METHODS = (
    (IOStream, "_handle_events"), (IOStream, "_maybe_add_error_listener"),
    (IOStream, "_read_to_buffer"), (IOStream, "_add_io_state"),
    (SSLIOStream, "_handle_read"), (SSLIOStream, "_do_ssl_handshake"),
    (socket.socket, "_accept"), (HTTP1Connection, "write_headers"),
)
STREAM_ATTRIBUTES = (("_read_buffer_size", int), ("_state", type(None)))
# On a stream over a connected socket (SSLIOStream watches it at once).
TLS_STREAM_ATTRIBUTES = (("_read_buffer_size", int), ("_ssl_accepting", bool),
                         ("_state", int))
CONNECTION_ATTRIBUTES = (("_request_start_line", type(None)),
                         ("_response_start_line", type(None)),
                         ("_disconnect_on_finish", bool), ("_request_headers", type(None)))


def check(methods: tuple[tuple[type, str], ...] = METHODS) -> list[str]:
    """What this Tornado (and Python) lacks of what fdapp relies on; [] if nothing.

    *methods* is a seam for tests: a name no release has shows a failure.
    """
    problems = [f"{owner.__name__}.{name} is gone" for owner, name in methods
                if not callable(getattr(owner, name, None))]
    left, right = socket.socketpair()
    tls_left, tls_right = socket.socketpair()
    try:
        stream = IOStream(left)
        # Options given: Tornado's default client context would load the CA store.
        tls_stream = SSLIOStream(tls_left, ssl_options={})
        connection = HTTP1Connection(stream, False, HTTP1ConnectionParameters())
        for obj, expected in ((stream, STREAM_ATTRIBUTES), (tls_stream, TLS_STREAM_ATTRIBUTES),
                              (connection, CONNECTION_ATTRIBUTES)):
            for name, kind in expected:
                if not isinstance(getattr(obj, name, _MISSING), kind):
                    problems.append(f"{type(obj).__name__}().{name} is not a fresh "
                                    f"{kind.__name__}")
        stream.close()
        tls_stream.close()
    finally:
        for sock in (left, right, tls_left, tls_right):
            sock.close()
    return problems


_MISSING = object()


@functools.cache
def usable() -> bool:
    """Whether fdapp may use the private names; warns once if not."""
    problems = check()
    if problems:
        log.warning("this Tornado changed what fdapp relies on (%s); serving with stock "
                    "Tornado: correct, only slower", "; ".join(problems))
    return not problems


# -- helpers: each private access, named ------------------------------------------------

def stream_class(fast: bool, tls: bool = False) -> type[IOStream]:
    if tls:
        return FastTLSStream if fast else TLSStream
    return FastStream if fast else IOStream


def raw_accept(sock: socket.socket, fast: bool) -> Accept:
    """The listener's accept returning (descriptor, address).

    socket.accept() wraps each connection in a new socket object and
    converts its family to an enum: fdapp wraps it itself, family known.
    """
    return accept.raw_accept(sock) if fast else accept.public_accept(sock)


def buffered(stream: Any) -> int:
    """Bytes Tornado has read from the client and not yet parsed (0 if unknown)."""
    value = getattr(stream, "_read_buffer_size", 0)
    return value if isinstance(value, int) else 0


def headers_arrived(request: Any) -> bool:
    """Whether the request's headers have been parsed (True if unknown: busy).

    HTTP1Connection sets _request_start_line once it has parsed them.
    """
    return not (isinstance(request, HTTP1Connection)
                and getattr(request, "_request_start_line", _MISSING) is None)


def detached(request: Any) -> bool:
    """Whether the request's handler took its connection over (a websocket).

    HTTP1Connection.detach() hands the stream over and forgets it.
    """
    return isinstance(request, HTTP1Connection) and request.stream is None


def handler_of(delegate: Any) -> Any:
    """The RequestHandler an Application's request delegate created, or None.

    Application.start_request returns a _RoutingDelegate whose ``delegate``
    is a _HandlerDelegate, whose ``handler`` is the handler.
    """
    return getattr(getattr(delegate, "delegate", None), "handler", None)


def trust_forwarded_from(request: Any, proxies: Any) -> bool:
    """Whether *request*'s peer is one of *proxies*; if so, also have Tornado skip
    them when it reads the client's address out of X-Forwarded-For.

    The peer is the connection's request context's ``address``; Tornado's
    ``trusted_downstream`` (an HTTPServer option) is read off that context,
    per request, with ``in``.
    """
    context = getattr(request, "context", None)
    address = getattr(context, "address", None)
    trusted = isinstance(address, tuple) and bool(address) and address[0] in proxies
    if trusted and context is not None:
        context.trusted_downstream = proxies
    return trusted


def response_started(request: Any) -> bool:
    """Whether the response's headers went out (True if unknown)."""
    return not (isinstance(request, HTTP1Connection)
                and getattr(request, "_response_start_line", _MISSING) is None)


def close_after_response(request: Any) -> None:
    """Tornado's own flag: "Connection: close" on an HTTP/1.1 response not yet
    started, and the connection closed once the response is written.

    Tornado sets it from the request's headers, so this must come after them.
    """
    if isinstance(request, HTTP1Connection) and hasattr(request, "_disconnect_on_finish"):
        request._disconnect_on_finish = True


def promise_no_keep_alive(request: Any) -> None:
    """Stop Tornado promising keep-alive to an HTTP/1.0 client it will close.

    Tornado answers ``Connection: Keep-Alive`` whenever an HTTP/1.0 request
    asked for it, even with keep-alive off: it reads the request's header as
    the response starts.  So, for a drain's requests only, that header is
    turned into "close" just before; to HTTP/1.0, no header means close.
    """
    if not isinstance(request, HTTP1Connection):
        return
    write_headers = request.write_headers

    def write_headers_saying_close(start_line: Any, headers: httputil.HTTPHeaders,
                                   chunk: bytes | None = None) -> Any:
        if getattr(start_line, "code", None) == 101:
            # A websocket accepted during the drain: "Connection: close" would
            # break its handshake. It is taken over, then told 1001 at once.
            request._disconnect_on_finish = False
            return write_headers(start_line, headers, chunk)
        _closing(request)
        return write_headers(start_line, headers, chunk)

    request.write_headers = write_headers_saying_close    # type: ignore[method-assign]


_MAY_CLOSE = "_fdapp_may_close"        # set on a request close_if_kept_alive wrapped


def close_if_kept_alive(request: Any, decide: Callable[[Any], bool]) -> None:
    """As the response starts: if it would keep its connection open and
    ``decide(stream)`` agrees, it ends the connection instead
    ("Connection: close"; to HTTP/1.0, no Keep-Alive), which then lingers."""
    if not isinstance(request, HTTP1Connection) or getattr(request, _MAY_CLOSE, False):
        return                  # not one of Tornado's, or wrapped already
    setattr(request, _MAY_CLOSE, True)
    write_headers = request.write_headers

    def write_headers_maybe_closing(start_line: Any, headers: httputil.HTTPHeaders,
                                    chunk: bytes | None = None) -> Any:
        # Unknown (another Tornado): as if it closed anyway.  A stream of
        # events lasts as long as its connection: nothing to gain there.
        if (getattr(start_line, "code", None) != 101
                and not getattr(request, "_disconnect_on_finish", True)
                and request.stream is not None
                and not headers.get("Content-Type", "").startswith("text/event-stream")
                and decide(request.stream)):
            request._disconnect_on_finish = True
            _closing(request)
        return write_headers(start_line, headers, chunk)

    request.write_headers = write_headers_maybe_closing    # type: ignore[method-assign]


def _closing(request: HTTP1Connection) -> None:
    """This response ends its connection: say so to an HTTP/1.0 client that
    asked for keep-alive (Tornado would promise it), and let it linger."""
    line = getattr(request, "_request_start_line", None)
    asked = getattr(request, "_request_headers", None)
    if (line is not None and line.version == "HTTP/1.0" and asked is not None
            and asked.get("Connection", "").lower() == "keep-alive"):
        asked["Connection"] = "close"
    if isinstance(request.stream, FastStream):
        request.stream.linger_on_close = True


def response_length(handler: Any) -> int | None:
    """The body size of a finished response, from its Content-Length (None if
    it had none: a chunked response).  RequestHandler keeps its response
    headers in ``_headers``."""
    headers = getattr(handler, "_headers", None)
    value = headers.get("Content-Length") if isinstance(headers, httputil.HTTPHeaders) else None
    return int(value) if isinstance(value, str) and value.isdigit() else None
