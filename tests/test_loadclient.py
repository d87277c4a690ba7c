"""The load client counts requests and failures as wrk does, against real servers.

A scripted server in this process answers each request as a test tells it
(ok, 404, reset mid-response, Connection: close, ...) and counts what it did,
so the client's counts can be checked exactly.  The client itself runs as its
own process, as the benches use it.
"""

from __future__ import annotations

import itertools
import socket
import struct
import sys
import threading
from collections.abc import Callable

import pytest

from loadclient import LoadClient
from support import run, wait_until

BODY = b"Hello from 4242\n"


class ScriptedServer:
    """A raw HTTP/1.1 server on 127.0.0.1:0; *script(n)* names the action for request n."""

    def __init__(self, script: Callable[[int], str]) -> None:
        self.script = script
        self.counter = itertools.count(1)
        self.lock = threading.Lock()
        self.done: dict[str, int] = {}          # action -> requests answered
        self.per_connection: list[list[bytes]] = []   # request heads, by connection
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.address = "{}:{}".format(*self.listener.getsockname())
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def requests(self) -> int:
        with self.lock:
            return sum(self.done.values())

    def close(self) -> None:
        self.stopping.set()
        self.threads[0].join(5)             # no new connection threads after this
        for thread in self.threads[1:]:
            thread.join(5)
        self.listener.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        heads: list[bytes] = []
        with self.lock:
            self.per_connection.append(heads)
        conn.settimeout(0.2)
        buffer = b""
        with conn:
            while not self.stopping.is_set():
                if b"\r\n\r\n" not in buffer:
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:
                        return
                    if not data:
                        return
                    buffer += data
                    continue
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                heads.append(head)
                action = self.script(next(self.counter))
                if not self._answer(conn, action):
                    return

    def _answer(self, conn: socket.socket, action: str) -> bool:
        """Send the response *action* names; False once the connection is done."""
        def count() -> None:
            with self.lock:
                self.done[action] = self.done.get(action, 0) + 1

        ok = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(BODY)
        if action == "hang":
            count()
            self.stopping.wait(3)
            return False
        if action == "stall":             # answers, 300 ms late
            self.stopping.wait(0.3)
            conn.sendall(ok + b"\r\n" + BODY)
            count()
            return True
        if action == "reset":
            conn.sendall(ok + b"\r\n" + BODY[:5])
            # SO_LINGER 0: close() sends RST instead of FIN.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            count()
            return False
        responses = {
            "ok": ok + b"\r\n" + BODY,
            "404": b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\nnot found\n",
            "close": ok + b"Connection: close\r\n\r\n" + BODY,
            "chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"6\r\nHello \r\na;ext=1\r\nfrom 4242\n\r\n0\r\nX-Trailer: 1\r\n\r\n"),
            "until-close": b"HTTP/1.1 200 OK\r\n\r\n" + BODY,
            "garbage": b"HTTP/1.1 2x0 What\r\n\r\n",
        }
        conn.sendall(responses[action])
        count()
        return action not in ("close", "until-close", "garbage")


@pytest.fixture
def scripted():
    servers: list[ScriptedServer] = []

    def start(script: Callable[[int], str]) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        return servers[-1]

    try:
        yield start
    finally:
        for server in servers:
            server.close()


@pytest.fixture
def load(tmp_path):
    """load(address, **options) -> a started LoadClient, closed at teardown."""
    clients: list[LoadClient] = []

    def start(address: str, **options) -> LoadClient:
        client = LoadClient(address, workdir=tmp_path / f"load{len(clients)}", **options)
        client.workdir.mkdir()
        clients.append(client)
        return client.start()

    try:
        yield start
    finally:
        for client in clients:
            client.close()


def run_until(server: ScriptedServer, client: LoadClient, requests: int = 200) -> dict:
    wait_until(lambda: server.requests() >= requests, timeout=30,
               what=f"{requests} requests at {server.address}")
    return client.stop()


def test_counts_ok_requests_and_reuses_connections(scripted, load):
    server = scripted(lambda n: "ok")
    client = load(server.address, clients=4)
    client.wait_started()
    result = run_until(server, client)
    assert result["failed"] == 0 and result["failures"] == {}
    assert result["ok"] == result["requests"] == server.done["ok"]
    assert result["pids"] == {"4242": result["ok"]}
    assert result["connections"] == len(server.per_connection) == 4
    latency = result["latency_ms"]
    assert latency["count"] == result["ok"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]


def test_close_mode_opens_a_connection_per_request(scripted, load):
    server = scripted(lambda n: "ok")
    client = load(server.address, clients=2, mode="close")
    result = run_until(server, client, requests=100)
    assert result["failed"] == 0
    assert result["connections"] == result["requests"] == server.done["ok"]
    served = [heads for heads in server.per_connection if heads]
    assert len(served) == result["requests"]
    assert all(len(heads) == 1 and b"\r\nConnection: close" in heads[0] for heads in served)


def test_rate_mode_keeps_its_schedule_and_counts_a_stall_from_when_requests_were_due(
        scripted, load):
    """--rate 50, one client: a request every 20 ms.  Request 20 is answered
    300 ms late; the ~14 due meanwhile go out late and count from when they
    were due, so the slowest tenth all took over 100 ms (counted from when
    they were sent, only the one request would)."""
    server = scripted(lambda n: "stall" if n == 20 else "ok")
    client = load(server.address, clients=1, rate=50)
    client.wait_started()
    result = run_until(server, client, requests=60)
    assert result["failed"] == 0 and result["ok"] == server.done["ok"] + server.done["stall"]
    assert result["requests"] <= 50 * result["elapsed"] + 1        # never ahead of schedule
    assert result["latency_ms"]["p90"] >= 100, result["latency_ms"]


def test_non_200_is_a_failure(scripted, load):
    server = scripted(lambda n: "404" if n % 4 == 0 else "ok")
    client = load(server.address, clients=3)
    result = run_until(server, client)
    assert result["ok"] == server.done["ok"]
    assert result["failures"]["status"]["count"] == server.done["404"] > 0
    assert result["failed"] == server.done["404"]
    assert result["failures"]["status"]["examples"][0].endswith("status 404")
    assert result["requests"] == result["ok"] + result["failed"]


@pytest.mark.parametrize("mode", ["keepalive", "close"])
def test_reset_mid_response_is_a_failure(scripted, load, mode):
    server = scripted(lambda n: "reset" if n % 5 == 0 else "ok")
    client = load(server.address, clients=3, mode=mode)
    result = run_until(server, client)
    assert set(result["failures"]) == {"reset"}, result["failures"]
    assert result["failures"]["reset"]["count"] == server.done["reset"] > 0
    assert result["ok"] == server.done["ok"]


def test_connection_close_after_full_response_is_no_failure(scripted, load):
    server = scripted(lambda n: "close" if n % 3 == 0 else "ok")
    client = load(server.address, clients=3)
    result = run_until(server, client)
    assert result["failed"] == 0, result["failures"]
    assert result["ok"] == server.done["ok"] + server.done["close"]
    assert result["reconnects"]["connection_close"] == server.done["close"]
    assert result["connections"] == len(server.per_connection)
    assert result["connections"] >= server.done["close"]


@pytest.mark.parametrize("action", ["chunked", "until-close"])
def test_chunked_and_close_delimited_bodies_are_parsed(scripted, load, action):
    server = scripted(lambda n: action)
    client = load(server.address, clients=2)
    result = run_until(server, client, requests=50)
    assert result["failed"] == 0, result["failures"]
    assert result["pids"] == {"4242": result["ok"]}


def test_malformed_and_timeout_are_failures(scripted, load):
    server = scripted(lambda n: {7: "garbage", 13: "hang"}.get(n, "ok"))
    client = load(server.address, clients=2, timeout=0.5)
    wait_until(lambda: server.done.get("hang"), timeout=30, what="the hung request")
    result = run_until(server, client, requests=100)
    assert result["failures"]["malformed"]["count"] == 1
    assert "bad status line" in result["failures"]["malformed"]["examples"][0]
    assert result["failures"]["timeout"]["count"] == 1
    assert result["failed"] == 2 and result["ok"] == server.done["ok"]


def test_refused_connections_are_failures(load):
    with socket.create_server(("127.0.0.1", 0)) as probe:
        address = "{}:{}".format(*probe.getsockname())
    client = load(address, clients=1, duration=0.3)
    result = client.stop()
    assert result["ok"] == 0 and result["failures"]["connect"]["count"] > 0
    assert "loadclient: started" not in client.proc.output


def test_only_loopback_addresses(tmp_path):
    result = run([sys.executable, "tests/loadclient.py", "--address", "192.0.2.1:80",
                  "--duration", "1"])
    assert result.returncode == 2
    assert "not a loopback address" in result.stderr


def test_against_fdserver_and_fdapp(start_fdserver, start_fdapp, tmp_path):
    server = start_fdserver()
    workers = {start_fdapp(server).pid for _ in range(2)}
    client = LoadClient(server.address, clients=4, mode="close", duration=1.0,
                        workdir=tmp_path)
    try:
        client.start()
        client.wait_started()
        client.proc.wait(10)                # it stops by itself after 1s
        result = client.stop()
    finally:
        client.close()
    assert result["failed"] == 0 and result["ok"] > 0
    assert {int(pid) for pid in result["pids"]} <= workers
    assert sum(result["pids"].values()) == result["ok"]
