"""What fdapp relies on in Tornado's (and CPython's) internals, on this Tornado.

Each helper of fdserver._tornado is checked for the behaviour relied on, on
a real loop and real sockets; CI runs this on the lowest and the newest
Tornado of the supported range.  If a release breaks one, this fails, and
fdapp falls back to stock Tornado (checked here too).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import tornado
import tornado.netutil
import tornado.web
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, SSLIOStream

from fdserver import _tornado
from fdserver.acceptor import Acceptor
from fdserver.drain import DrainingHTTPServer

from test_acceptor import REQUEST, held_app, held_connection, read_response, wait_for
from test_tls import certs  # noqa: F401  (the fixture)


def test_nothing_relied_on_is_missing():
    assert _tornado.check() == [], tornado.version
    assert _tornado.usable()


def test_a_missing_name_is_reported_by_name():
    gone = _tornado.METHODS + ((IOStream, "_gone_in_tornado_7"),)
    assert _tornado.check(gone) == ["IOStream._gone_in_tornado_7 is gone"]


def test_headers_arrived_and_response_started_follow_the_request():
    async def main():
        app = held_app()
        async with held_connection(app) as (reader, writer, stream):
            request = _request_of(app)
            # /held's headers were parsed; its handler waits: no response yet.
            assert _tornado.headers_arrived(request)
            assert not _tornado.response_started(request)
            _tornado.close_after_response(request)
            app.settings["release"].set()
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"Connection: close" in head, head
            assert await reader.read() == b"Held\n"       # then EOF: closed after it
    asyncio.run(main())


def test_a_keep_alive_connection_waiting_for_its_next_request_is_idle():
    async def main():
        app = held_app()
        async with held_connection(app) as (reader, writer, stream):
            app.settings["release"].set()
            assert await read_response(reader) == b"Held\n"
            await wait_for(lambda: not _tornado.headers_arrived(_request_of(app)),
                           "the next request awaited")
            assert not _tornado.response_started(_request_of(app))
            # Bytes of the next request, read but not parsed yet, are counted.
            assert _tornado.buffered(stream) == 0
            writer.write(REQUEST[:10])
            await wait_for(lambda: _tornado.buffered(stream) == 10, "10 bytes buffered")
    asyncio.run(main())


def test_an_http10_keep_alive_request_is_promised_close_during_a_drain():
    async def main():
        app = held_app()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        server = DrainingHTTPServer(app)
        acceptor = Acceptor(server, lambda message: None)
        acceptor.start([listener])
        try:
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            writer.write(b"GET /held HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            await asyncio.wait_for(app.settings["entered"].wait(), 10)
            app.settings["server"] = server
            _tornado.promise_no_keep_alive(_request_of(app))
            app.settings["release"].set()
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"Keep-Alive" not in head, head
            writer.close()
        finally:
            acceptor.close()
    asyncio.run(main())


def test_raw_accept_gives_a_descriptor_and_an_address_either_way():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        for fast in (True, False):
            with socket.create_connection(listener.getsockname()) as client:
                fd, address = _tornado.raw_accept(listener, fast)()
                assert isinstance(fd, int)
                assert address == client.getsockname()
                socket.socket(fileno=fd).close()


def test_stock_tornado_fallback_serves_and_drains():
    """What fdapp does when a Tornado release changes what it relies on."""
    async def main():
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        server = DrainingHTTPServer(tornado.web.Application([("/", _Hello)]))
        acceptor = Acceptor(server, lambda message: None, fast=False)
        assert acceptor._stream_class is IOStream
        assert acceptor._tls_stream_class is _tornado.TLSStream
        acceptor.start([listener])
        reader, writer = await asyncio.open_connection(*listener.getsockname())
        for _ in range(3):
            writer.write(REQUEST)
            assert await read_response(reader) == b"Hello\n"
        acceptor.close()
        assert await server.drain(timeout=5.0, grace=0.05) == 0
        assert await reader.read() == b""
        writer.close()
    asyncio.run(main())


def test_a_tls_server_stream_starts_by_reading_the_clients_hello(certs):  # noqa: F811
    """Tornado's SSLIOStream waits for writable first; a server has nothing to
    write before the client's hello.  Either way the connection serves."""
    async def main():
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs.first.cert, certs.first.key)
        for stream_class, watched in ((SSLIOStream, IOLoop.WRITE),
                                      (_tornado.FastTLSStream, IOLoop.READ)):
            left, right = socket.socketpair()
            stream = stream_class(context.wrap_socket(left, server_side=True,
                                                      do_handshake_on_connect=False))
            assert stream._state == IOLoop.ERROR | watched, stream_class
            stream.close()
            right.close()

        # Tornado's default client context, made by a stream given no options,
        # loads the system's CA certificates: a server's streams never need it.
        # (Tornado 6.5 makes it on first use; older ones at import.)
        defaults = tornado.netutil._client_ssl_defaults
        lazy = hasattr(defaults, "cache_clear")
        if lazy:
            defaults.cache_clear()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        server = DrainingHTTPServer(tornado.web.Application([("/", _Hello)]))
        acceptor = Acceptor(server, lambda message: None)
        assert acceptor._tls_stream_class is _tornado.FastTLSStream
        acceptor.contexts["https"] = context
        acceptor.start([listener], ["https"])
        client = ssl.create_default_context(cafile=str(certs.ca))
        reader, writer = await asyncio.open_connection(*listener.getsockname(), ssl=client,
                                                       server_hostname="localhost")
        for _ in range(3):
            writer.write(REQUEST)
            assert await read_response(reader) == b"Hello\n"
        writer.write(REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        assert await read_response(reader) == b"Hello\n"
        assert await reader.read() == b""
        writer.close()
        acceptor.close()
        if lazy:
            assert defaults.cache_info().currsize == 0
    asyncio.run(main())


class _Hello(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write("Hello\n")


def _request_of(app):
    """The request the app's one connection is on (DrainingHTTPServer notes it)."""
    (_, (request, _, _)), = app.settings["server"]._requests.items()
    return request


class _Big(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write(b"x" * BIG)


BIG = 512 << 10         # the kernel's socket buffers take it all: the server is done first
SHEDDING_APP = [("/", _Hello), ("/big", _Big)]


@contextlib.asynccontextmanager
async def shedding_server():
    """fdapp's server and acceptor on 127.0.0.1, told to shed one connection:
    (server, its address)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    server = DrainingHTTPServer(tornado.web.Application(SHEDDING_APP))
    acceptor = Acceptor(server, lambda message: None)
    acceptor.start([listener])
    server.shed(1)
    try:
        yield server, listener.getsockname()
    finally:
        acceptor.close()


def test_a_response_that_ends_its_connection_is_read_to_the_end():
    """The server ends a keep-alive connection after a response it chose to
    close (a shed's; a drain's the same way), and the client, not yet done
    reading, sends its next request: the response still arrives whole, then
    the end.  Closed outright with that request unread, the socket would
    answer a reset and the end of the response still on its way would be lost."""
    async def main():
        async with shedding_server() as (server, address):
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"GET /big HTTP/1.1\r\nHost: test\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"Connection: close" in head, head
            # The server is done with it (its response is in the kernel's buffers).
            await wait_for(lambda: server.connection_count == 0, "the connection ended")
            writer.write(b"GET /big HTTP/1.1\r\nHost: test\r\n\r\n")
            assert len(await reader.readexactly(BIG)) == BIG
            assert await reader.read() == b""       # the end, not a reset
            writer.close()
            await _tornado.lingering_ended(5.0)
            assert _tornado.lingering(asyncio.get_running_loop()) == 0
    asyncio.run(main())
    asyncio.run(main())         # each event loop has its own lingering connections


def test_a_shed_passes_over_a_response_with_a_pipelined_request_behind_it():
    """Two requests sent at once while the server sheds one connection: the
    first response keeps the connection (the request behind it would be
    lost), the second ends it."""
    async def main():
        async with shedding_server() as (_, address):
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n" * 2)
            heads = []
            for _ in range(2):
                heads.append(await reader.readuntil(b"\r\n\r\n"))
                assert await reader.readexactly(6) == b"Hello\n"
            assert b"Connection: close" not in heads[0], heads[0]
            assert b"Connection: close" in heads[1], heads[1]
            assert await reader.read() == b""
            writer.close()
    asyncio.run(main())


def test_a_shed_is_spent_only_on_a_connection_that_would_stay_open():
    """A request that ends its connection anyway ("Connection: close") does
    not count toward a shed: the next keep-alive one does."""
    async def main():
        async with shedding_server() as (_, address):
            heads = []
            for connection in ("close", "keep-alive", "keep-alive"):
                reader, writer = await asyncio.open_connection(*address)
                writer.write(f"GET / HTTP/1.1\r\nHost: test\r\nConnection: {connection}"
                             "\r\n\r\n".encode())
                heads.append(await reader.readuntil(b"\r\n\r\n"))
                writer.close()
            assert [b"Connection: close" in head for head in heads] == [True, True, False]
    asyncio.run(main())


def test_a_shed_reaches_a_connection_idle_when_it_was_asked():
    """A keep-alive connection that was waiting for its next request when the
    shed came (a pool's, a browser's) is ended after that next response."""
    async def main():
        async with shedding_server() as (server, address):
            server.shed(0)
            reader, writer = await asyncio.open_connection(*address)
            heads = []
            for ask in (False, True):
                if ask:
                    await wait_for(lambda: not _tornado.headers_arrived(
                        next(iter(server._requests.values()))[0]), "the connection idle")
                    server.shed(1)
                writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                heads.append(await reader.readuntil(b"\r\n\r\n"))
                assert await reader.readexactly(6) == b"Hello\n"
            assert [b"Connection: close" in head for head in heads] == [False, True]
            writer.close()
    asyncio.run(main())
