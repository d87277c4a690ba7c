"""fdapp's acceptor in this process: a real loop, real sockets, a Tornado app."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import socket

import pytest
import tornado.web

from fdserver.acceptor import ACCEPT_BATCH, CPUS, REPORT_INTERVAL, SLACK, Acceptor
from fdserver.drain import DrainingHTTPServer
from fdserver.protocol import (
    MAX_REPORT_INTERVAL,
    REPORT_WORKERS,
    SHARED_REPORT_INTERVAL,
    on_the_tick,
)

REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"


class Hello(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write("Hello\n")


class Held(tornado.web.RequestHandler):
    """Answers once the test lets it: the worker is busy, not reading, meanwhile."""

    async def get(self) -> None:
        # Run as the handler starts, right after the request was read.
        fileno = self.request.connection.stream.socket.fileno()
        self.settings["watched_at_start"] = fileno in watched_fds()
        self.settings["entered"].set()
        await self.settings["release"].wait()
        self.write("Held\n")

    def on_connection_close(self) -> None:
        self.settings["client_left"].set()


def held_app() -> tornado.web.Application:
    return tornado.web.Application([("/", Hello), ("/held", Held)], entered=asyncio.Event(),
                                   release=asyncio.Event(), client_left=asyncio.Event())


def watched_fds() -> set[int]:
    """The descriptors this process's epoll instances watch, as the kernel lists them."""
    watched = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as info:
                watched.update(int(tfd) for tfd in re.findall(r"^tfd:\s*(\d+)", info.read(), re.M))
        except OSError:
            continue        # closed meanwhile
    return watched


@contextlib.asynccontextmanager
async def held_connection(app: tornado.web.Application, **server_options):
    """A client whose request to /held is being handled: (reader, writer, stream).

    The request is sent before the server accepts, so it is read at once
    (as from most clients that connect for one request).
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    reader, writer = await asyncio.open_connection(*listener.getsockname())
    writer.write(b"GET /held HTTP/1.1\r\nHost: test\r\n\r\n")
    await writer.drain()
    server = DrainingHTTPServer(app, **server_options)
    app.settings["server"] = server         # for tests that look inside
    acceptor = Acceptor(server, lambda message: None)
    acceptor.start([listener])
    try:
        await asyncio.wait_for(app.settings["entered"].wait(), 10)
        (conn, _), = server._requests.items()
        yield reader, writer, conn.stream
    finally:
        app.settings["release"].set()
        writer.close()
        acceptor.close()


async def send_next_request(writer: asyncio.StreamWriter, stream) -> None:
    """Send another request while /held is handled; wait until it is read ahead."""
    writer.write(REQUEST)
    await wait_for(lambda: stream._read_buffer_size == len(REQUEST),
                   "the next request read ahead")


async def release_and_read(app: tornado.web.Application, reader: asyncio.StreamReader,
                           more: int = 1) -> None:
    """Let /held answer; then *more* answers from GET / must follow."""
    app.settings["release"].set()
    assert await read_response(reader) == b"Held\n"
    for _ in range(more):
        assert await read_response(reader) == b"Hello\n"


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
                await wait_for(lambda request=request: server._requests[conn][0] is not request,
                               "the connection to wait for its next request")
                seen.append(conn.stream.socket.getsockopt(socket.IPPROTO_TCP,
                                                         socket.TCP_NODELAY))
        finally:
            writer.close()
            acceptor.close()
        return seen

    assert asyncio.run(main()) == [1, 1, 1]


def test_a_request_arriving_while_the_worker_is_busy_keeps_its_socket_watched():
    # Tornado reads such a request into its buffer, stops watching the socket,
    # and watches it again once it serves the request: two epoll_ctl calls
    # per keep-alive request, which fdapp saves.
    async def main() -> None:
        app = held_app()
        async with held_connection(app) as (reader, writer, stream):
            await send_next_request(writer, stream)
            assert stream.socket.fileno() in watched_fds()
            await release_and_read(app, reader)

    asyncio.run(main())


def test_a_client_pipelining_while_the_worker_is_busy_is_read_no_further():
    # What Tornado's rule is for: a client may not make the worker buffer
    # without limit.  fdapp reads ahead into an empty buffer only, so even
    # a max_buffer_size of two chunks is never reached.
    async def main() -> None:
        app = held_app()
        chunk = 65536
        padded = b"GET / HTTP/1.1\r\nHost: test\r\nX-Pad: " + b"x" * 1000 + b"\r\n\r\n"
        count = 4 * chunk // len(padded)
        async with held_connection(app, max_buffer_size=2 * chunk,
                                   chunk_size=chunk) as (reader, writer, stream):
            writer.write(padded * count)
            fd = stream.socket.fileno()
            await wait_for(lambda: stream._read_buffer_size and fd not in watched_fds(),
                           "reading to stop")
            assert stream._read_buffer_size <= chunk
            await release_and_read(app, reader, more=count)

    asyncio.run(main())


def test_a_client_that_half_closes_after_its_next_request_gets_both_answers():
    # The FIN arrives after the request was read ahead: reading on would
    # meet it and close the connection with the request unserved.
    async def main() -> None:
        app = held_app()
        async with held_connection(app) as (reader, writer, stream):
            await send_next_request(writer, stream)
            writer.write_eof()
            fd = stream.socket.fileno()
            await wait_for(lambda: fd not in watched_fds(), "reading to stop")
            await release_and_read(app, reader)

    asyncio.run(main())


def test_a_client_leaving_while_the_worker_is_busy_is_noticed():
    # Tornado watches the socket for it from the moment the request is read:
    # an epoll_ctl to start and one to stop, for nothing when the response
    # is quick.  fdapp starts once the response has taken CLOSE_WATCH_DELAY.
    async def main() -> None:
        app = held_app()
        async with held_connection(app) as (reader, writer, stream):
            assert app.settings["watched_at_start"] is False
            fd = stream.socket.fileno()
            await wait_for(lambda: fd in watched_fds(), "the socket watched")
            writer.close()
            await asyncio.wait_for(app.settings["client_left"].wait(), 10)
            assert stream.closed()

    asyncio.run(main())


def burst_in_one_pass(workers: int, held: int = 0) -> tuple[int, bool]:
    """A worker of *workers* holding *held* connections, its share saying 20
    each (a moment ago), meets a burst queued at once: how many of it the
    worker takes in one pass of its loop, and whether it still watches the
    listener.
    """
    burst = 3 * workers + ACCEPT_BATCH
    listener = socket.create_server(("127.0.0.1", 0), backlog=held + burst + 8)
    listener.setblocking(False)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(held)]
    loop = asyncio.new_event_loop()

    async def make() -> tuple[DrainingHTTPServer, Acceptor]:
        server = DrainingHTTPServer(tornado.web.Application([("/", Hello)]))
        acceptor = Acceptor(server, lambda message: None)
        acceptor.start([listener])
        await wait_for(lambda: server.connection_count == held, "the held connections")
        acceptor.on_share(20 * workers, workers)
        return server, acceptor

    server, acceptor = loop.run_until_complete(make())
    try:
        clients += [socket.create_connection(listener.getsockname()) for _ in range(burst)]
        loop.call_soon(loop.stop)
        loop.run_forever()          # one pass of the loop: no pause can end meanwhile
        return server.connection_count - held, listener.fileno() in watched_fds()
    finally:
        acceptor.close()
        for client in clients:
            client.close()
        # The connections taken in that pass are not served yet: close them,
        # or their sockets and serving tasks are reported when collected.
        loop.run_until_complete(server.close_all_connections())
        loop.close()


def test_a_burst_right_after_a_wave_is_taken_in_parts():
    # The share still counts a wave of connections that just ended, so it
    # would let this worker take a whole batch of the burst.  With more
    # workers than CPUs, the others may not run in time to take theirs: the
    # worker takes its part of what waits and steps aside.
    workers = CPUS + 6
    part = math.ceil((3 * workers + ACCEPT_BATCH) / workers) + SLACK
    assert burst_in_one_pass(workers) == (part, False)
    # Its part is of the burst: connections it held before, the share counts.
    assert burst_in_one_pass(workers, held=10) == (part, False)


def test_with_no_more_workers_than_cpus_a_burst_is_taken_on_the_share():
    # They all run at once; stepping aside would only leave a core idle.
    assert burst_in_one_pass(CPUS) == (ACCEPT_BATCH, True)


def test_with_hundreds_of_workers_the_heartbeat_carries_the_load():
    """A report would wait as long as the next heartbeat: the heartbeat is the
    report, one message a second from each worker instead of two."""
    async def main():
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        reports: list[dict] = []
        server = DrainingHTTPServer(tornado.web.Application([("/", Hello)]))
        acceptor = Acceptor(server, reports.append)
        acceptor.start([listener])
        try:
            for workers, in_beats, separate in ((256, True, False), (256, False, True),
                                                (2, True, True)):
                reports.clear()
                acceptor.load_in_beats = in_beats
                acceptor.on_share(0, workers)
                reader, writer = await asyncio.open_connection(*listener.getsockname())
                writer.write(REQUEST)
                assert await read_response(reader) == b"Hello\n"
                if separate:
                    await wait_for(lambda: reports, "a load report")
                    assert reports[-1]["connections"] == 1
                    assert acceptor.load_for_beat() is None     # reported already
                else:
                    # Longer than a report waits with 256 workers without the
                    # heartbeat (capped at a second), had one been scheduled.
                    assert not acceptor._report_pending
                    assert acceptor.load_for_beat() == (1, 0)
                    assert acceptor.load_for_beat() is None     # once per change
                    assert not reports
                writer.close()
                await wait_for(lambda: server.connection_count == 0, "the connection closed")
                acceptor.load_in_beats = False
                acceptor._send_report()         # back to no connection, for the next case
        finally:
            acceptor.close()
    asyncio.run(main())


def test_shared_mode_reports_load_at_most_every_50_ms_a_worker_pair():
    """fdserver's wakeups under load stay few whatever the number of workers:
    busy workers' reports seldom share a tick, so two of them reporting every
    20 ms woke fdserver 100 times a second (2% of a core).  Dispatch mode,
    whose placement reads every report, keeps 20 ms."""
    async def main() -> None:
        acceptor = Acceptor(DrainingHTTPServer(tornado.web.Application([("/", Hello)])),
                            lambda report: None)
        assert acceptor.report_interval() == REPORT_INTERVAL == 0.02     # no share: dispatch
        intervals = {}
        for workers in (1, 2, 8, 40, 256):
            acceptor.on_share(0, workers)
            intervals[workers] = round(acceptor.report_interval(), 6)
        assert intervals == {1: 0.05, 2: 0.05, 8: 0.2, 40: 1.0, 256: 1.0}
        # Together at most 40 reports a second reach fdserver, until a report
        # waits as long as the heartbeat, which then carries it.
        assert max(workers / interval for workers, interval in intervals.items()
                   if interval < 1.0) == pytest.approx(40)
    asyncio.run(main())


def test_a_load_report_that_ran_early_does_not_get_its_tick_again():
    """uvloop's timers are in ms: a report may run a moment before its tick.
    A change right after it waits for the next tick, not the same one (two
    reports at once), as heartbeats and metrics reports do."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        acceptor = Acceptor(DrainingHTTPServer(tornado.web.Application([("/", Hello)])),
                            lambda report: None)
        acceptor.on_share(0, 2)
        interval = acceptor.report_interval()
        tick = on_the_tick(loop.time(), interval)
        acceptor._report_due = tick             # the last report's tick...
        now = tick - 0.0005                     # ...and its timer ran just before it
        loop.time = lambda: now                 # type: ignore[method-assign]
        acceptor.changed()
        assert acceptor._report_due == pytest.approx(tick + interval, rel=0, abs=1e-9)
    asyncio.run(main())


def test_load_reports_of_all_workers_go_on_the_same_tick():
    """Workers whose connections change at different moments report together,
    on the next whole multiple of the report interval: fdserver reads them in
    one wakeup.  Each acceptor here is one worker."""
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        workers = 20                        # a report interval of 0.5 s (see changed())
        interval = min(SHARED_REPORT_INTERVAL * workers / REPORT_WORKERS, MAX_REPORT_INTERVAL)
        sent_at: list[float] = []
        acceptors, listeners, clients = [], [], []
        for _ in range(2):
            listener = socket.create_server(("127.0.0.1", 0))
            listener.setblocking(False)
            server = DrainingHTTPServer(tornado.web.Application([("/", Hello)]))
            acceptor = Acceptor(server, lambda report: sent_at.append(loop.time()))
            acceptor.on_share(0, workers)
            acceptor.start([listener])
            acceptors.append(acceptor)
            listeners.append(listener)
        # Start just after a tick, so that both changes fall before the next
        # (the spacing under test, not a wait for something to happen).
        await asyncio.sleep(on_the_tick(loop.time(), interval) + 0.01 - loop.time())
        try:
            for acceptor, listener in zip(acceptors, listeners, strict=True):  # 50 ms apart
                clients.append(socket.create_connection(listener.getsockname()))
                server = acceptor.server
                await wait_for(lambda: server.connection_count == 1,  # noqa: B023 (awaited here)
                               "a connection")
                await asyncio.sleep(0.05)
            await wait_for(lambda: len(sent_at) == 2, "both reports")
            return sent_at
        finally:
            for acceptor in acceptors:
                acceptor.close()
            for client in clients:
                client.close()
    first, second = asyncio.run(main())
    # Both due on the same tick, so run in the same pass of the loop; called
    # 50 ms apart, a report that waited the interval from its change would not.
    assert abs(second - first) < 0.01, (first, second)
