"""systemd socket activation and readiness notification, with real sockets.

Debian's systemd-socket-activate passes listening sockets exactly as systemd
does (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES), then execs fdserver.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys

import pytest

from support import PROJECT, free_low_port, http_get, proc_ids, run, script

ACTIVATE = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"
AS_USER = str(PROJECT / "tests" / "as_user.py")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def activated(procs, path: str, port: int, *command: str, name: str = "web"):
    """Start fdserver under systemd-socket-activate; returns (proc, first client).

    Like systemd, systemd-socket-activate starts the service on the first
    connection; that client's request waits in the accept queue until a
    worker serves it.
    """
    activator = procs.start([ACTIVATE, "-l", f"127.0.0.1:{port}", f"--fdname={name}",
                             *command, "--socket", path])
    activator.wait_for_line(rf"Listening on 127.0.0.1:{port}")
    first = socket.create_connection(("127.0.0.1", port), timeout=20)
    first.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    activator.wait_for_line(rf"serving {name} on 127.0.0.1:{port};")
    return activator, first


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


def test_socket_activation_end_to_end(procs, sockdir):
    assert os.path.exists(ACTIVATE), "install Debian's systemd package"
    path, port = str(sockdir / "fd.sock"), free_port()
    _, first = activated(procs, path, port, script("fdserver"))
    worker = procs.start([script("fdapp"), "app:make_app", "--socket", path])
    worker.wait_for_line(r"ready: serving web on")
    assert read_all(first).endswith(f"\r\n\r\nHello from {worker.pid}\n".encode())
    assert http_get(f"127.0.0.1:{port}") == (200, f"Hello from {worker.pid}\n")
    status = run([script("fdctl"), "--socket", path, "status"])
    assert f"web       AF_INET  127.0.0.1:{port}" in status.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start as nobody")
def test_socket_activated_fdserver_never_needs_root(users, procs, public_dir):
    path, port = str(public_dir / "fd.sock"), free_low_port()
    os.chown(public_dir, 65534, -1)          # nobody creates its socket there
    # systemd-socket-activate binds the low port as root; fdserver runs as nobody.
    _, first = activated(procs, path, port, sys.executable, AS_USER, "nobody",
                         "fdserver_main", "--socket-mode", "0666")
    # fdserver runs as nobody, not root: the worker must be told to trust it.
    worker = procs.start([script("fdapp"), "app:make_app", "--socket", path,
                          "--server-user", "nobody"])
    worker.wait_for_line(r"ready: serving")
    assert read_all(first).endswith(f"Hello from {worker.pid}\n".encode())
    server = json.loads(run([script("fdctl"), "--socket", path, "status", "--json"]).stdout)
    assert proc_ids(server["server"]["pid"])["Uid"] == [65534] * 4
    assert http_get(f"127.0.0.1:{port}") == (200, f"Hello from {worker.pid}\n")


def test_listen_pid_of_another_process_is_refused(sockdir):
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID="1")
    result = run([script("fdserver"), "--socket", str(sockdir / "fd.sock")], env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == ("fdserver: error: LISTEN_PID=1 is not this process "
                                     f"({result.stderr.split('(')[1].split(')')[0]}); "
                                     "refusing descriptors meant for another")


def test_bind_and_activation_together_are_refused(procs, sockdir):
    port = free_port()
    activator = procs.start([ACTIVATE, "-l", f"127.0.0.1:{port}", script("fdserver"),
                             "--socket", str(sockdir / "fd.sock"), "--bind", "127.0.0.1:0"])
    activator.wait_for_line(rf"Listening on 127.0.0.1:{port}")
    socket.create_connection(("127.0.0.1", port), timeout=20).close()
    activator.wait_for_line(r"fdserver: error: --bind given, but systemd passed listening "
                            r"sockets \(LISTEN_FDS\); use one")


def test_proxy_protocol_names_an_activated_listener(procs, sockdir):
    port = free_port()
    activator = procs.start([ACTIVATE, "-l", f"127.0.0.1:{port}", "--fdname=web",
                             script("fdserver"), "--socket", str(sockdir / "fd.sock"),
                             "--proxy-protocol", "http"])
    activator.wait_for_line(rf"Listening on 127.0.0.1:{port}")
    socket.create_connection(("127.0.0.1", port), timeout=20).close()
    activator.wait_for_line(r"^fdserver: error: --proxy-protocol http: no listener is called "
                            r"http \(systemd passed web; FileDescriptorName=http in the socket "
                            r"unit names one\)$")
    assert activator.wait() != 0 and "Traceback" not in activator.output


def test_notify_ready_status_and_stopping(start_fdserver, start_fdapp, sockdir, monkeypatch):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sockdir / "notify"))
    notify.settimeout(15)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sockdir / "notify"))
    server = start_fdserver()
    ready = notify.recv(4096).decode().split("\n")
    assert "READY=1" in ready and f"MAINPID={server.pid}" in ready
    assert "STATUS=serving 1 listeners; no workers" in ready
    monkeypatch.delenv("NOTIFY_SOCKET")       # for fdserver only, not for the app
    worker = start_fdapp(server)
    messages = [notify.recv(4096).decode() for _ in range(2)]
    assert messages == ["STATUS=serving 1 listeners; 1 starting",
                        "STATUS=serving 1 listeners; 1 ready"]
    assert worker.pid
    server.signal(15)
    assert notify.recv(4096).decode().startswith("STOPPING=1\n")
    assert server.wait() == 0


def test_fdapp_notifies_ready_and_stopping(start_fdserver, procs, sockdir):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sockdir / "app-notify"))
    notify.settimeout(15)
    server = start_fdserver()
    env = dict(os.environ, NOTIFY_SOCKET=str(sockdir / "app-notify"))
    worker = procs.start([script("fdapp"), "app:make_app", "--socket", server.socket], env=env)
    assert notify.recv(4096).decode() == "READY=1\nSTATUS=ready"
    server.wait_state(worker.pid, "ready")
    worker.signal(15)
    assert notify.recv(4096).decode() == "STOPPING=1\nSTATUS=draining"
    assert worker.wait() == 0
