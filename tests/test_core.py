"""End to end: fdserver hands its listeners to independently started fdapps."""

from __future__ import annotations

import os
import re
import signal
import socket

import pytest

from support import http_get, pid_alive, run, script, wait_until


def test_several_workers_answer_with_their_own_pids(start_fdserver, start_fdapp):
    server = start_fdserver()
    workers = [start_fdapp(server) for _ in range(3)]
    expected = {w.pid for w in workers}
    seen = set()

    def all_answered():
        # New connection each time: the kernel spreads them over the workers.
        status, body = http_get(server.address)
        assert status == 200 and body.startswith("Hello from ") and body.endswith("\n")
        seen.add(int(body.split()[-1]))
        return seen == expected

    wait_until(all_answered, timeout=30, what=f"answers from all of {expected}")
    assert seen <= expected


def test_ipv4_and_ipv6_listeners_are_handed_over(start_fdserver, start_fdapp):
    server = start_fdserver(binds=("127.0.0.1:0", "v6=[::1]:0"))
    worker = start_fdapp(server)
    listeners = server.status()["listeners"]
    assert [(one["name"], one["family"]) for one in listeners] == [("http", "AF_INET"),
                                                                   ("v6", "AF_INET6")]
    for listener in listeners:
        assert http_get(listener["address"]) == (200, f"Hello from {worker.pid}\n")


def test_status_tracks_start_ready_and_sigkill(start_fdserver, start_fdapp):
    server = start_fdserver()
    assert server.status()["workers"] == []
    first = start_fdapp(server)
    second = start_fdapp(server)
    workers = {w["pid"]: w for w in server.status()["workers"]}
    assert set(workers) == {first.pid, second.pid}
    for w in workers.values():
        assert w["state"] == "ready" and w["uid"] == os.getuid() and w["gid"] == os.getgid()
        assert w["connected_at"] <= w["ready_at"]

    second.signal(signal.SIGKILL)
    server.wait_state(second.pid, "gone", timeout=1.0)   # within a second, as promised
    assert [w["pid"] for w in server.status()["workers"]] == [first.pid]
    assert http_get(server.address) == (200, f"Hello from {first.pid}\n")


def test_status_table_is_readable(start_fdserver, start_fdapp):
    server = start_fdserver()
    worker = start_fdapp(server)
    result = run([script("fdctl"), "--socket", server.socket, "status"])
    assert result.returncode == 0, result.stderr
    assert f"fdserver pid {server.pid}" in result.stdout
    assert server.address in result.stdout
    assert any(line.split()[:3] == [str(worker.pid), str(os.getuid()), "ready"]
               for line in result.stdout.splitlines())
    assert result.stdout.rstrip().endswith("1 worker: 1 ready")


def test_worker_state_before_ready_is_starting(start_fdserver):
    # A bare client registration, not yet ready: fdserver lists it as starting.
    import fdserver

    server = start_fdserver()
    registration = fdserver.register(server.socket)
    try:
        [worker] = server.status()["workers"]
        assert (worker["pid"], worker["state"]) == (os.getpid(), "starting")
        [sock] = registration.sockets()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert not sock.get_inheritable()
        registration.report("ready")
        server.wait_state(os.getpid(), "ready")
    finally:
        for s in registration.sockets():
            s.close()
        registration.channel.close()
    server.wait_state(os.getpid(), "gone")


def test_fdserver_sigterm_removes_its_socket_and_workers_keep_serving(start_fdserver, start_fdapp):
    server = start_fdserver()
    worker = start_fdapp(server)
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert not os.path.exists(server.socket)
    worker.wait_for_line(r"lost fdserver")
    assert pid_alive(worker.pid)
    assert http_get(server.address) == (200, f"Hello from {worker.pid}\n")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_fdapp_exits_zero_on_stop_signal(start_fdserver, start_fdapp, signum):
    server = start_fdserver()
    worker = start_fdapp(server)
    worker.signal(signum)
    assert worker.wait() == 0
    server.wait_state(worker.pid, "gone")


def test_fdapp_starts_before_fdserver(procs, start_fdserver, sockdir):
    path = str(sockdir / "fd.sock")
    worker = procs.start([script("fdapp"), "app:make_app", "--socket", path])
    # It says what it waits for (before, nothing: it looked hung).
    worker.wait_for_line(rf"INFO waiting up to 10s for fdserver at {re.escape(path)} "
                         r"\(no such file\)$")
    server = start_fdserver()        # same path: the worker's retries find it
    worker.wait_for_line(r"ready: serving")
    server.wait_state(worker.pid, "ready")
    assert http_get(server.address) == (200, f"Hello from {worker.pid}\n")
