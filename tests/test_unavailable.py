"""Shared mode with no ready worker: fdserver answers 503 after --unavailable-timeout."""

from __future__ import annotations

import http.client
import socket

from loadclient import LoadClient
from support import replace_by_hand

NO_WORKER = r"no worker has been ready for 0\.5s: answering new connections with 503"


def get(address: str) -> tuple[int, dict[str, str], str]:
    """GET / on a new connection: (status, headers, body).  Bounded: a
    connection left in the kernel queue fails the test instead of hanging it."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


def assert_unavailable(answer: tuple[int, dict[str, str], str]) -> None:
    status, headers, body = answer
    assert status == 503, answer
    assert headers["Retry-After"] == "1" and headers["Connection"] == "close", headers
    assert body == "no app process is ready\n"


def test_no_ready_worker_gets_503_until_one_is_ready(start_fdserver, start_fdapp):
    server = start_fdserver("--unavailable-timeout", "0.5")
    # Queued in the kernel before the timeout, or taken after it: a 503 either way.
    assert_unavailable(get(server.address))
    server.wait_for_line(NO_WORKER)
    assert_unavailable(get(server.address))

    # A client that sends nothing is answered all the same, at once: fdserver
    # never waits on it.
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as silent:
        received = b""
        while chunk := silent.recv(4096):
            received += chunk
    assert received.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), received

    # Once a worker is ready, the queue is the workers' again: no more 503.
    worker = start_fdapp(server)
    server.wait_for_line(r"a worker is ready; it takes the connections again "
                         r"\(3 answered 503 meanwhile\)")
    for _ in range(20):
        status, _, body = get(server.address)
        assert (status, body) == (200, f"Hello from {worker.pid}\n")

    # The last ready worker gone: 503 again, after the timeout.
    seen = len(server.lines)
    worker.kill()
    server.wait_for_line(NO_WORKER, start=seen)
    assert_unavailable(get(server.address))


def test_a_ready_worker_is_never_passed_over_for_a_503(start_fdserver, start_fdapp):
    """Even at --unavailable-timeout 0, and while workers are replaced: as long
    as one is ready, every connection goes to a worker."""
    server = start_fdserver("--unavailable-timeout", "0")
    workers = [start_fdapp(server) for _ in range(2)]
    for _ in range(50):
        status, _, body = get(server.address)
        assert status == 200 and body.startswith("Hello from "), (status, body)
    with LoadClient(server.address, clients=8, mode="close") as load:
        load.wait_started()
        replace_by_hand(workers, lambda: start_fdapp(server), 4)
        report = load.stop()
    assert report["failed"] == 0, report["failures"]
    assert report["ok"] > 100, report
    # Answering started at once (no worker then) and stopped with the first
    # ready one, having answered nothing.
    assert server.output.count("answering new connections with 503") == 1, server.output
    assert "(0 answered 503 meanwhile)" in server.output, server.output
