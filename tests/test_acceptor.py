"""fdapp's acceptor in this process: a real loop, real sockets, a Tornado app."""

from __future__ import annotations

import asyncio
import socket

import tornado.web

from fdserver.acceptor import Acceptor
from fdserver.drain import DrainingHTTPServer

REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"


class Hello(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write("Hello\n")


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return await reader.readexactly(length)


async def wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0)      # one loop pass: the server's callbacks run


def test_connections_keep_nagle_off_between_requests():
    # Tornado turns TCP_NODELAY on at the end of each response and off again
    # once it is written; fdapp turns it on once per connection and leaves it.
    async def main() -> list[int]:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        server = DrainingHTTPServer(tornado.web.Application([("/", Hello)]))
        acceptor = Acceptor(server, lambda message: None)
        acceptor.start([listener])
        reader, writer = await asyncio.open_connection(*listener.getsockname())
        seen = []
        try:
            await wait_for(lambda: server._requests, "the connection accepted")
            (conn, _), = server._requests.items()
            for _ in range(3):
                request = server._requests[conn][0]     # the one that will serve this
                writer.write(REQUEST)
                assert await read_response(reader) == b"Hello\n"
                # Tornado starts the next request once this one's response is
                # written and its own end-of-request steps have run.
                await wait_for(lambda: server._requests[conn][0] is not request,
                               "the connection to wait for its next request")
                seen.append(conn.stream.socket.getsockopt(socket.IPPROTO_TCP,
                                                         socket.TCP_NODELAY))
        finally:
            writer.close()
            acceptor.close()
        return seen

    assert asyncio.run(main()) == [1, 1, 1]
