"""Real Tornado apps under fdapp: Tornado's own demos, factories, main(), hooks.

Tornado's websocket and long-poll chat demos (tests/demos, unchanged) run as
a user would run them; small apps written here cover a factory's warm-up,
shutdown hooks and a stuck event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import socket
import threading
import time
import urllib.request

import pytest
from tornado.websocket import websocket_connect

from fdserver.errors import TransportError
from fdserver.transport import Channel, peer_credentials

from conftest import LOOP
from loadclient import LoadClient
from support import PROJECT, http_get, run, script, wait_until

DEMOS = PROJECT / "tests" / "demos"


def workers_of(server) -> list[dict]:
    return server.status()["workers"]


# -- websockets: counted, closed with 1001 at a drain, the worker gone at once -----------------

def test_websocket_chat_demo_rolled_with_clients_connected(start_fdserver, start_fdapp):
    server = start_fdserver()
    cwd = DEMOS / "websocket"
    old = [start_fdapp(server, app="chatdemo:Application", cwd=cwd) for _ in range(4)]
    clients = 40

    async def main() -> None:
        url = f"ws://{server.address}/chatsocket"
        conns = [await websocket_connect(url) for _ in range(clients)]
        closes = [asyncio.ensure_future(read_until_closed(c)) for c in conns]
        loop = asyncio.get_running_loop()
        # Every websocket counts as a connection of its worker (balancing sees them).
        await loop.run_in_executor(None, lambda: wait_until(
            lambda: sum(w["connections"] for w in workers_of(server)) == clients,
            what=f"{clients} websockets counted: {workers_of(server)}"))
        holding = {w["pid"] for w in workers_of(server) if w["connections"]}
        for worker in old:
            started = time.monotonic()
            worker.signal(signal.SIGTERM)
            assert await loop.run_in_executor(None, worker.wait, 30) == 0, worker.output
            took = time.monotonic() - started
            # Not the 30 s graceful timeout: gone as soon as its websockets are.
            assert took < 2, f"worker {worker.pid} took {took:.1f}s to exit"
            await loop.run_in_executor(None, lambda: start_fdapp(
                server, app="chatdemo:Application", cwd=cwd))
            if worker.pid in holding:
                assert worker.wait_for_line(r"draining (\d+) connections").group(1) != "0"
        codes = await asyncio.gather(*closes)
        assert codes == [1001] * clients, codes
        # The demo still works on the new workers: a message comes back to its
        # sender (the demo's waiters are per process).
        conn = await websocket_connect(url)
        await conn.write_message('{"body": "after the roll"}')
        assert "after the roll" in await conn.read_message()
        conn.close()

    asyncio.run(main())


async def read_until_closed(conn) -> int | None:
    while await conn.read_message() is not None:
        pass
    return conn.close_code


WEBSOCKET_APP = """
import tornado.web, tornado.websocket

class Goodbye(tornado.websocket.WebSocketHandler):
    def open(self):
        self.write_message("hello")

    async def on_drain(self):
        self.write_message("moving you to another worker")
        self.close(4000, "come back")

def make_app():
    return tornado.web.Application([("/ws", Goodbye)])
"""


def test_a_websocket_handler_says_goodbye_itself_through_on_drain(start_fdserver, start_fdapp,
                                                                   tmp_path):
    (tmp_path / "goodbye.py").write_text(WEBSOCKET_APP)
    server = start_fdserver()
    worker = start_fdapp(server, app="goodbye:make_app", cwd=tmp_path)

    async def main() -> None:
        conn = await websocket_connect(f"ws://{server.address}/ws")
        assert await conn.read_message() == "hello"
        worker.signal(signal.SIGTERM)
        assert await conn.read_message() == "moving you to another worker"
        assert await conn.read_message() is None
        assert (conn.close_code, conn.close_reason) == (4000, "come back")

    asyncio.run(main())
    assert worker.wait() == 0


# -- long requests: the drain API ----------------------------------------------------------------

def test_a_long_poll_answers_reconnect_when_its_worker_drains(start_fdserver, start_fdapp):
    server = start_fdserver()
    worker = start_fdapp(server)
    answer: dict = {}

    def poll() -> None:
        with urllib.request.urlopen(f"http://{server.address}/poll?seconds=120",
                                    timeout=60) as response:
            answer["body"] = response.read().decode()
            answer["at"] = time.monotonic()

    poller = threading.Thread(target=poll)
    poller.start()
    wait_until(lambda: sum(w["connections"] for w in workers_of(server)) == 1,
               what="the poll under way")
    stopped = time.monotonic()
    worker.signal(signal.SIGTERM)
    poller.join(60)
    assert answer["body"] == f"reconnect: {worker.pid} is going away\n"
    assert answer["at"] - stopped < 1.0
    assert worker.wait() == 0


# -- an app's own main(), with its own command line ---------------------------------------------

def test_the_chat_demos_own_main_served_and_rolled(start_fdserver, start_fdapp):
    server = start_fdserver()
    cwd = DEMOS / "chat"
    # chatdemo.main() parses tornado.options, builds its app, app.listen(options.port),
    # then waits for ever: as the demo's README runs it, port and all.
    flags = ("--", "--debug=false", "--port=1")
    old = [start_fdapp(server, *flags, app="chatdemo:main", cwd=cwd) for _ in range(2)]
    for worker in old:
        worker.wait_for_line(r"asked its HTTPServer to listen on port 1; serving fdserver's")
    status, page = http_get(server.address)
    assert status == 200 and "<title>Tornado Chat Demo</title>" in page
    with LoadClient(server.address, clients=4, mode="close") as load:
        load.wait_started()
        for worker in old:
            worker.signal(signal.SIGTERM)
            start_fdapp(server, *flags, app="chatdemo:main", cwd=cwd)
            assert worker.wait(40) == 0, worker.output
        report = load.stop()
    assert report["failed"] == 0, report["failures"]
    assert report["ok"] > 0


def test_autoreload_is_refused_with_the_way_out(sockdir):
    result = run([script("fdapp"), "chatdemo:main", "--socket", str(sockdir / "x.sock"),
                  "--connect-timeout", "0"], cwd=DEMOS / "chat")       # debug defaults to True
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("fdapp: error: chatdemo:main: the app has autoreload on"), line
    assert "-- --debug=false" in line


# -- factories: inside the loop, warm before ready ----------------------------------------------

WARM_APP = """
import asyncio, os
import tornado.ioloop, tornado.options, tornado.web

tornado.options.define("greeting", default="hello")
ticks = 0

def tick():
    global ticks
    ticks += 1

class Ticks(tornado.web.RequestHandler):
    def get(self):
        self.write(f"{tornado.options.options.greeting} {ticks}")

async def make_app():
    tornado.options.parse_command_line()
    # A PeriodicCallback made in the factory runs: the loop is there.
    tornado.ioloop.PeriodicCallback(tick, 10).start()
    # Warm-up: wait for the test to say go (a FIFO), off the loop.
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: open(os.environ["WARM_FIFO"]).read())
    return tornado.web.Application([("/", Ticks)])
"""


def test_an_async_factory_warms_up_before_the_worker_registers(start_fdserver, procs,
                                                               tmp_path):
    (tmp_path / "warm.py").write_text(WARM_APP)
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    server = start_fdserver()
    worker = procs.start([script("fdapp"), "warm:make_app", "--socket", server.socket,
                          "--", "--greeting=hi"], cwd=tmp_path,
                         env=dict(os.environ, WARM_FIFO=str(fifo)))
    with open(fifo, "w") as go:       # opens once the factory waits on it
        assert workers_of(server) == []          # warming up: not registered, no connection
        go.write("go")
    worker.wait_for_line(r"ready: serving")
    body = wait_until(lambda: (b := http_get(server.address)[1]) != "hi 0" and b,
                      what="the PeriodicCallback ticking")
    assert body.startswith("hi ") and int(body.split()[1]) > 0


def test_a_failing_factory_exits_with_one_line_and_never_registers(start_fdserver, tmp_path):
    (tmp_path / "broken.py").write_text(
        "async def make_app():\n    raise RuntimeError('no database')\n")
    server = start_fdserver()
    result = run([script("fdapp"), "broken:make_app", "--socket", server.socket], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == \
        "fdapp: error: calling broken:make_app failed: RuntimeError: no database"
    assert "Traceback" not in result.stderr
    assert workers_of(server) == []
    assert "connected" not in server.output


# -- shutdown hooks -------------------------------------------------------------------------------

HOOKS_APP = """
import asyncio, logging
import fdserver, tornado.web

log = logging.getLogger("hooks")

@fdserver.on_shutdown
async def close_pool():
    await asyncio.sleep(0)          # inside the loop
    log.warning("pool closed")

@fdserver.on_shutdown
def failing():
    raise RuntimeError("flush failed")

@fdserver.on_shutdown
def last_registered():
    log.warning("first hook to run")

def make_app():
    return tornado.web.Application([])
"""


@pytest.mark.child_errors("the failing hook's error is logged on purpose")
def test_shutdown_hooks_run_after_the_drain_in_order_and_a_failure_is_logged(
        start_fdserver, start_fdapp, tmp_path):
    (tmp_path / "hooks.py").write_text(HOOKS_APP)
    server = start_fdserver()
    worker = start_fdapp(server, app="hooks:make_app", cwd=tmp_path)
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    lines = worker.lines
    order = [next(i for i, line in enumerate(lines) if text in line) for text in (
        "draining 0 connections", "running 3 shutdown hooks", "first hook to run",
        "shutdown hook failing failed: RuntimeError: flush failed", "pool closed",
        "drained; exiting")]
    assert order == sorted(order), "\n".join(lines)


# -- a stuck worker --------------------------------------------------------------------------

STUCK_APP = """
import time
import tornado.web

class Stuck(tornado.web.RequestHandler):
    def get(self):
        time.sleep(3600)           # blocks the event loop

def make_app():
    return tornado.web.Application([("/stuck", Stuck)])
"""


def test_a_worker_whose_loop_is_blocked_dumps_its_stacks_and_exits(start_fdserver,
                                                                   start_fdapp, tmp_path):
    (tmp_path / "stuck.py").write_text(STUCK_AND_HELLO_APP)
    server = start_fdserver("--dispatch")
    workers = [start_fdapp(server, "--timeout", "1", app="stuck:make_app", cwd=tmp_path)
               for _ in range(2)]
    with pytest.raises(OSError):         # one of them takes it, and dies of it
        urllib.request.urlopen(f"http://{server.address}/stuck", timeout=30)
    stuck = wait_until(lambda: next((w for w in workers if w.popen.poll() is not None), None),
                       what="the stuck worker gone")
    assert stuck.wait() == 1
    stuck.wait_for_line(r"Timeout \(0:00:01\)!")
    stuck.wait_for_line(r'File ".*stuck\.py", line \d+ in get')
    [other] = [w for w in workers if w is not stuck]
    for _ in range(10):                   # the other kept serving all along
        assert http_get(server.address) == (200, f"Hello from {other.pid}\n")


# -- HTTPServer settings ----------------------------------------------------------------------

def test_httpserver_settings_reach_tornado(start_fdserver, start_fdapp):
    server = start_fdserver()
    start_fdapp(server, "--max-body-size", "1000")

    def post(size: int) -> int:
        request = urllib.request.Request(f"http://{server.address}/", data=b"x" * size)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0                   # Tornado closes the connection on a body too large

    assert post(10) == 405             # the example app has no POST: the body was read
    assert post(100_000) in (0, 400)


# -- an unresponsive worker, as fdserver sees it ------------------------------------------------

STUCK_AND_HELLO_APP = STUCK_APP.replace(
    'return tornado.web.Application([("/stuck", Stuck)])',
    'return tornado.web.Application([("/stuck", Stuck), ("/", Hello)])').replace(
    "def make_app():", '''class Hello(tornado.web.RequestHandler):
    def get(self):
        import os
        self.write(f"Hello from {os.getpid()}\\n")

def make_app():''')


def test_a_stuck_worker_shows_unresponsive_and_gets_no_dispatched_connection(
        start_fdserver, start_fdapp, tmp_path):
    (tmp_path / "stuck.py").write_text(STUCK_AND_HELLO_APP)
    server = start_fdserver("--dispatch")
    stuck = start_fdapp(server, app="stuck:make_app", cwd=tmp_path)     # no --timeout
    blocked = threading.Thread(target=lambda: _get_quietly(f"http://{server.address}/stuck"),
                               daemon=True)
    blocked.start()
    healthy = start_fdapp(server)
    states = wait_until(lambda: (s := {w["pid"]: w["state"] for w in workers_of(server)})
                        .get(stuck.pid) == "unresponsive" and s,
                        what="the stuck worker shown unresponsive")
    assert states == {stuck.pid: "unresponsive", healthy.pid: "ready"}
    table = run([script("fdctl"), "--socket", server.socket, "status"]).stdout
    assert re.search(rf"^{stuck.pid}\s+\d+\s+unresponsive \d+s\s", table, re.M), table
    for _ in range(20):              # dispatch sends nothing more to the stuck one
        assert http_get(server.address, timeout=5) == (200, f"Hello from {healthy.pid}\n")


def _get_quietly(url: str) -> None:
    try:
        urllib.request.urlopen(url, timeout=60).read()
    except OSError:
        pass


def test_the_file_upload_demo_receives_multipart_and_streamed_uploads(start_fdserver,
                                                                     start_fdapp, tmp_path):
    import functools
    import sys
    import uuid

    from tornado.httpclient import AsyncHTTPClient

    server = start_fdserver()
    worker = start_fdapp(server, app="file_receiver:main", cwd=DEMOS / "file_upload")
    payload = tmp_path / "upload.bin"
    payload.write_bytes(os.urandom(300_000))
    sys.path.insert(0, str(DEMOS / "file_upload"))
    try:
        import file_uploader  # the demo's own request body producers
    finally:
        sys.path.remove(str(DEMOS / "file_upload"))

    async def main() -> None:
        client = AsyncHTTPClient()
        boundary = uuid.uuid4().hex
        posted = await client.fetch(
            f"http://{server.address}/post", method="POST",
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            body_producer=functools.partial(file_uploader.multipart_producer, boundary,
                                            [str(payload)]))
        put = await client.fetch(
            f"http://{server.address}/upload.bin", method="PUT",
            headers={"Content-Type": "application/octet-stream"},
            body_producer=functools.partial(file_uploader.raw_producer, str(payload)))
        assert (posted.body, put.body) == (b"OK", b"OK")

    asyncio.run(main())
    worker.wait_for_line(rf'POST "{payload}" "application/octet-stream" 300000 bytes')
    worker.wait_for_line(r'PUT "upload.bin" "application/octet-stream" 300000 bytes')


# -- edges found by a review --------------------------------------------------------------

def test_a_websocket_whose_handshake_arrives_during_the_drain_gets_1001(start_fdserver,
                                                                        start_fdapp, tmp_path):
    import base64
    import socket

    (tmp_path / "goodbye.py").write_text(WEBSOCKET_APP.replace("async def on_drain",
                                                               "async def not_on_drain"))
    server = start_fdserver()
    worker = start_fdapp(server, app="goodbye:make_app", cwd=tmp_path)
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        wait_until(lambda: workers_of(server)[0]["connections"] == 1, what="accepted")
        worker.signal(signal.SIGTERM)
        worker.wait_for_line(r"draining 1 connections")
        key = base64.b64encode(os.urandom(16)).decode()
        raw.sendall(f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                    f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
        received = b""
        while not received.endswith(b"\x03\xe9going away"):     # close frame, code 1001
            chunk = raw.recv(4096)
            assert chunk, received
            received += chunk
    head = received.split(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 101 "), head
    assert "Connection: Upgrade" in head and "Connection: close" not in head, head
    assert worker.wait() == 0


@pytest.mark.child_errors("the app's failing on_drain() is logged on purpose")
def test_an_on_drain_that_fails_is_logged_and_the_websocket_still_told_1001(
        start_fdserver, start_fdapp, tmp_path):
    (tmp_path / "failing.py").write_text(WEBSOCKET_APP.replace(
        'self.write_message("moving you to another worker")', 'raise ValueError("oops")'))
    server = start_fdserver()
    worker = start_fdapp(server, app="failing:make_app", cwd=tmp_path)

    async def main() -> None:
        conn = await websocket_connect(f"ws://{server.address}/ws")
        assert await conn.read_message() == "hello"
        worker.signal(signal.SIGTERM)
        assert await conn.read_message() is None
        assert conn.close_code == 1001

    asyncio.run(main())
    assert worker.wait() == 0
    worker.wait_for_line(r"ERROR on_drain of Goodbye failed: ValueError: oops; closing it")
    assert "Traceback" not in worker.output


MAINS = """
import asyncio
import tornado.ioloop, tornado.web

def app():
    return tornado.web.Application([])

def uses_run_sync():
    app().listen(8888)
    tornado.ioloop.IOLoop.current().run_sync(asyncio.sleep)

def fails_after_listen():
    app().listen(8888)
    raise RuntimeError("no config")

async def async_fails_after_listen():
    app().listen(8888)
    await asyncio.sleep(0)
    raise ValueError("lost the database")

class Hi(tornado.web.RequestHandler):
    def get(self):
        self.write("hi from amain")

async def amain():
    tornado.web.Application([("/", Hi)]).listen(8888)
    await asyncio.Event().wait()

def console_script():           # what an entry point in pyproject.toml names
    asyncio.run(amain())

DB = {}

async def init_db():
    return {"users": 3}

def sets_up_with_asyncio_run():
    DB.update(asyncio.run(init_db()))
    tornado.web.Application([("/", Hi)]).listen(8888)
    tornado.ioloop.IOLoop.current().start()
"""


@pytest.mark.child_errors("the app's main() failing after it listened is logged on purpose")
@pytest.mark.parametrize("main, expected", [
    ("uses_run_sync", "mains:uses_run_sync calls IOLoop.run_sync(), which would stop fdapp's "
                      "running loop"),
    ("fails_after_listen", "calling mains:fails_after_listen failed: RuntimeError: no config"),
    ("async_fails_after_listen", None),
    *[(main, f"mains:{main} calls asyncio.run(), which cannot run inside fdapp's running "
             "event loop: make main() async and await that coroutine, or point fdapp at the "
             "async function it runs") for main in ("console_script", "sets_up_with_asyncio_run")],
])
def test_a_main_that_cannot_run_under_fdapp_says_why(start_fdserver, tmp_path, procs, main,
                                                     expected):
    (tmp_path / "mains.py").write_text(MAINS)
    server = start_fdserver()
    if expected:
        result = run([script("fdapp"), f"mains:{main}", "--socket", server.socket],
                     cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1].startswith(f"fdapp: error: {expected}")
        assert "Traceback" not in result.stderr
        return
    worker = procs.start([script("fdapp"), f"mains:{main}", "--socket", server.socket],
                         cwd=tmp_path)
    worker.wait_for_line(r"ERROR mains:async_fails_after_listen failed after it listened: "
                         r"ValueError: lost the database; draining")
    assert worker.wait() == 1


def test_the_async_function_a_console_script_runs_is_served(start_fdserver, start_fdapp,
                                                             tmp_path):
    (tmp_path / "mains.py").write_text(MAINS)
    server = start_fdserver()
    start_fdapp(server, app="mains:amain", cwd=tmp_path)
    assert http_get(server.address) == (200, "hi from amain")


def test_sigterm_while_connecting_exits_at_once(sockdir, procs):
    worker = procs.start([script("fdapp"), "app:make_app", "--socket",
                          str(sockdir / "nobody-here.sock"), "--connect-timeout", "60"])
    # No fdserver: it retries.  Wait until the app is loaded and it connects.
    wait_until(lambda: _threads(worker.pid) >= 2, what="fdapp connecting, in its thread")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=5) == 0


def _threads(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))
    except OSError:
        return 0


def test_workers_send_their_heartbeats_on_the_same_whole_seconds(procs, sockdir):
    """Each worker's heartbeat is due on a whole second of the monotonic clock
    (system-wide), so fdserver reads them all in one wakeup.  A minimal
    fdserver here (the project's own Channel) records when each heartbeat
    came and how late the worker says it ran it."""
    path = str(sockdir / "beats.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(path)
    unix.listen()
    listener = socket.create_server(("127.0.0.1", 0))
    due: dict[int, list[float]] = {}            # worker pid -> when its heartbeats were due

    def serve_one() -> None:
        conn, _ = unix.accept()
        channel = Channel(conn, server_side=True)
        channel.receive()                   # the hello
        pid, _, _ = peer_credentials(conn)
        channel.send({"type": "welcome", "version": 1, "server_pid": os.getpid(),
                      "listeners": 1, "handback": False, "mode": "shared"})
        channel.send({"type": "listeners", "more": False, "fds": 1, "listeners": [
            {"name": "http", "family": "AF_INET", "address": "127.0.0.1:0"}]},
            [listener.fileno()])
        while True:
            try:
                message, _ = channel.receive()
            except TransportError:
                return                      # the worker was stopped
            if message["type"] == "heartbeat":
                # Received now; the worker ran it lag seconds after it was due.
                due.setdefault(pid, []).append(time.monotonic() - message["lag"])

    threads = [threading.Thread(target=serve_one, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        workers = [procs.start([script("fdapp"), "app:make_app", "--socket", path, *LOOP])
                   for _ in range(2)]
        wait_until(lambda: len(due) == 2 and all(len(d) >= 3 for d in due.values()),
                   timeout=20, what="three heartbeats from each worker")
        for times in due.values():
            for t in times:
                # What remains is the trip from the worker to this thread.
                assert min(t % 1, 1 - t % 1) < 0.25, (t, due)
            # One a second: a timer run a moment early does not beat twice.
            assert all(b - a > 0.5 for a, b in itertools.pairwise(times)), due
        for worker in workers:
            assert "Traceback" not in worker.output
    finally:
        unix.close()
        listener.close()
