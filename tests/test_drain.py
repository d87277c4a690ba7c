"""fdapp's graceful drain, against real sockets and real processes."""

from __future__ import annotations

import http.client
import signal
import socket
import threading

import pytest

from support import http_get, script, wait_until


def connect(address: str) -> http.client.HTTPConnection:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    conn.connect()
    return conn


def get(conn: http.client.HTTPConnection, path: str = "/") -> http.client.HTTPResponse:
    conn.request("GET", path)
    response = conn.getresponse()
    response.body = response.read()
    return response


def raw_get(sock: socket.socket) -> http.client.HTTPResponse:
    """One keep-alive GET on a socket we own (http.client would close it itself)."""
    sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    return response


def raw_response(sock: socket.socket) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    return response


def patient_worker(start_fdserver, start_fdapp) -> tuple:
    """fdserver, a worker that keeps idle connections through a drain for 30 s,
    and a raw connection to it."""
    server = start_fdserver()
    worker = start_fdapp(server, "--keepalive-grace", "30")
    host, port = server.address.rsplit(":", 1)
    return server, worker, socket.create_connection((host, int(port)), timeout=20)


def server_read_all(sock: socket.socket) -> bool:
    """The server's end of this IPv4 connection has nothing left to read
    (its receive queue in /proc/net/tcp is empty)."""
    def hex_address(address: tuple) -> str:
        ip = int.from_bytes(socket.inet_aton(address[0]), "little")
        return f"{ip:08X}:{address[1]:04X}"

    server_end, client_end = hex_address(sock.getpeername()), hex_address(sock.getsockname())
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1:3] == [server_end, client_end]:
                return int(fields[4].split(":")[1], 16) == 0
    return False


def in_background(fn, *args) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run():
        try:
            result["value"] = fn(*args)
        except Exception as exc:           # reported by the test's assertion
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def assert_closed_by_server(conn: http.client.HTTPConnection) -> None:
    conn.sock.settimeout(20)
    assert conn.sock.recv(1) == b"", "server should have closed the connection"


def test_in_flight_request_finishes_and_worker_exits_zero(start_fdserver, start_fdapp):
    server = start_fdserver()
    # A grace far shorter than the request: busy is not idle.
    worker = start_fdapp(server, "--keepalive-grace", "0.1")
    conn = connect(server.address)
    thread, result = in_background(get, conn, "/slow?seconds=1")
    wait_connected(server, worker)
    worker.signal(signal.SIGTERM)
    server.wait_state(worker.pid, "draining")
    thread.join(20)
    response = result["value"]
    assert response.status == 200 and response.body.startswith(f"Hello from {worker.pid}".encode())
    # In flight when the drain began: its connection ends with it, no grace wait.
    assert response.getheader("Connection") == "close"
    assert worker.wait() == 0
    server.wait_state(worker.pid, "gone")


def test_request_on_kept_alive_connection_during_drain_gets_connection_close(
        start_fdserver, start_fdapp):
    server, worker, sock = patient_worker(start_fdserver, start_fdapp)
    assert raw_get(sock).getheader("Connection") is None   # kept alive
    worker.signal(signal.SIGTERM)
    server.wait_state(worker.pid, "draining")
    response = raw_get(sock)                                # idle < grace: still served
    assert response.status == 200
    assert response.getheader("Connection") == "close"
    assert sock.recv(1) == b"", "server should close after the response"
    sock.close()
    assert worker.wait() == 0


def test_response_under_way_when_the_drain_starts_keeps_its_keep_alive_promise(
        start_fdserver, start_fdapp):
    # Its headers went out without "Connection: close": the client may send
    # its next request on the connection, and that one must be answered.
    server, worker, sock = patient_worker(start_fdserver, start_fdapp)
    sock.sendall(b"GET /slow?seconds=1&stream=1 HTTP/1.1\r\nHost: test\r\n\r\n")
    response = http.client.HTTPResponse(sock)
    response.begin()                                        # headers are out
    assert response.getheader("Connection") is None
    worker.signal(signal.SIGTERM)
    server.wait_state(worker.pid, "draining")
    assert response.read().endswith(b"after 1s\n")
    following = raw_get(sock)
    assert following.status == 200 and following.getheader("Connection") == "close"
    assert sock.recv(1) == b"", "server should close after the response"
    sock.close()
    assert worker.wait() == 0


@pytest.mark.parametrize("when", ["in flight", "arriving"])
def test_http10_keep_alive_client_is_not_promised_keep_alive_during_drain(
        start_fdserver, start_fdapp, when):
    # Tornado answers "Connection: Keep-Alive" to an HTTP/1.0 client that asks,
    # even when it is about to close: that client's next request would fail.
    server, worker, sock = patient_worker(start_fdserver, start_fdapp)

    def send(path: str) -> None:
        sock.sendall(f"GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())

    send("/")
    assert raw_response(sock).getheader("Connection") == "Keep-Alive"   # before the drain
    if when == "in flight":
        send("/slow?seconds=1")
        wait_until(lambda: server_read_all(sock), what="the request read by the worker")
    worker.signal(signal.SIGTERM)
    server.wait_state(worker.pid, "draining")
    if when == "arriving":
        send("/")
    response = raw_response(sock)
    assert response.status == 200 and response.getheader("Connection") is None
    assert sock.recv(1) == b"", "server should close after the response"
    sock.close()
    assert worker.wait() == 0


def test_idle_keepalive_connection_is_closed_after_grace(start_fdserver, start_fdapp):
    server = start_fdserver()
    worker = start_fdapp(server, "--keepalive-grace", "0.2")
    conn = connect(server.address)
    assert get(conn).status == 200
    worker.signal(signal.SIGTERM)
    assert_closed_by_server(conn)
    assert worker.wait() == 0
    worker.wait_for_line(r"drained; exiting")


@pytest.mark.child_errors("requests cut on purpose: Tornado logs each as a 500, and "
                          "6.3 also logs its handler's cancelled task")
def test_graceful_timeout_closes_what_remains(start_fdserver, start_fdapp):
    server = start_fdserver()
    worker = start_fdapp(server, "--graceful-timeout", "0.5")
    conn = connect(server.address)
    conn.request("GET", "/slow?seconds=60")
    wait_connected(server, worker)
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    worker.wait_for_line(r"graceful timeout: closed 1 connections")
    assert_closed_by_server(conn)


def wait_connected(server, worker) -> None:
    # The worker is the only one: once it answers a second connection, the
    # first (sent earlier, on the same accept queue) has been accepted too.
    assert http_get(server.address) == (200, f"Hello from {worker.pid}\n")


@pytest.mark.child_errors("requests cut on purpose: Tornado logs each as a 500, and "
                          "6.3 also logs its handler's cancelled task")
def test_second_sigint_exits_at_once(start_fdserver, start_fdapp):
    server = start_fdserver()
    worker = start_fdapp(server)
    conn = connect(server.address)
    conn.request("GET", "/slow?seconds=60")
    wait_connected(server, worker)
    worker.signal(signal.SIGINT)
    server.wait_state(worker.pid, "draining")
    worker.signal(signal.SIGINT)
    assert worker.wait(timeout=10) == 1
    worker.wait_for_line(r"SIGINT: exiting at once, cutting 1 connections")


@pytest.mark.child_errors("requests cut on purpose: Tornado logs each as a 500, and "
                          "6.3 also logs its handler's cancelled task")
def test_sigquit_exits_at_once(start_fdserver, start_fdapp):
    server = start_fdserver()
    worker = start_fdapp(server)
    conn = connect(server.address)
    conn.request("GET", "/slow?seconds=60")
    wait_connected(server, worker)
    worker.signal(signal.SIGQUIT)
    assert worker.wait(timeout=10) == 1


def test_connections_queued_while_a_worker_leaves_are_served_by_the_next(
        start_fdserver, start_fdapp):
    """The accept queue outlives a leaving worker: fdserver still holds the socket."""
    server = start_fdserver()
    leaving = start_fdapp(server)
    slow = connect(server.address)
    thread, slow_result = in_background(get, slow, "/slow?seconds=2")
    wait_connected(server, leaving)
    leaving.signal(signal.SIGTERM)
    server.wait_state(leaving.pid, "draining")
    # Nobody accepts now: these connections wait in the kernel's queue.
    host, port = server.address.rsplit(":", 1)
    queued = []
    for _ in range(20):
        sock = socket.create_connection((host, int(port)), timeout=20)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        queued.append(sock)
    assert leaving.wait() == 0           # gone, its copy of the listener closed
    thread.join(20)
    assert slow_result["value"].status == 200
    newcomer = start_fdapp(server)
    for sock in queued:
        with sock:
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 200
            assert response.read() == f"Hello from {newcomer.pid}\n".encode()


def test_sigterm_while_starting_exits_zero(procs, sockdir):
    # A socket that accepts but never answers: the worker is stuck in its
    # handshake, not yet serving, when it is told to stop.
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(sockdir / "silent.sock"))
    silent.listen()
    worker = procs.start([script("fdapp"), "app:make_app", "--socket",
                          str(sockdir / "silent.sock")])
    silent.settimeout(15)
    conn, _ = silent.accept()
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    conn.close()
    silent.close()
