"""A worker changing the shared listening sockets for everyone.

Every worker holds the very sockets fdserver listens on: the non-blocking
flag and the listening state are shared by all holders.  One worker's
``setblocking(True)`` or ``shutdown()`` must not stall fdserver, nor outlive
that worker (fdserver.listeners' ListenerGuard puts them right).
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket

import fdserver
from fdserver.listeners import put_right

from support import free_port, http_get, wait_until

PUT_RIGHT = r"listener http 127\.0\.0\.1:\d+ was {} by a process holding it \(a worker\); put right"


def blocking(sock: socket.socket) -> bool:
    return not fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK


def tamper(server, how) -> None:
    """Register as a worker, do *how* to every listener, and leave."""
    holder = fdserver.register(server.socket)
    try:
        for sock in holder.sockets():
            how(sock)
    finally:
        for sock in holder.sockets():
            sock.close()
        holder.channel.close()


def answered(address: str, pid: int) -> bool:
    try:
        return http_get(address, timeout=3)[1] == f"Hello from {pid}\n"
    except OSError:
        return False


def test_put_right_undoes_blocking_and_shutdown():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        address = listener.getsockname()
        assert put_right(listener, 16, address) == []
        listener.setblocking(True)
        listener.shutdown(socket.SHUT_RDWR)
        # A port the kernel chose is let go by the shutdown: bound again.
        assert put_right(listener, 16, address) == ["made blocking", "shut down"]
        assert listener.getsockname() == address
        assert not blocking(listener)
        with socket.create_connection(address, timeout=5):
            conn, _ = listener.accept()
            conn.close()


def test_a_listener_made_blocking_by_a_worker_does_not_stall_fdserver(start_fdserver,
                                                                      start_fdapp):
    # Dispatch mode: fdserver accepts every connection.  Before the guard, its
    # accept loop blocked once the queue was empty: a lone request hung.
    server = start_fdserver("--dispatch")
    worker = start_fdapp(server)
    tamper(server, lambda sock: sock.setblocking(True))
    for _ in range(5):
        assert http_get(server.address, timeout=5)[1] == f"Hello from {worker.pid}\n"
    assert server.status()["workers"][0]["pid"] == worker.pid
    server.wait_for_line(PUT_RIGHT.format("made blocking"))
    check = fdserver.register(server.socket)
    try:
        assert not any(blocking(sock) for sock in check.sockets())
    finally:
        for sock in check.sockets():
            sock.close()
        check.channel.close()


def test_a_listener_shut_down_by_a_worker_is_listened_on_again(start_fdserver, start_fdapp):
    server = start_fdserver()
    worker = start_fdapp(server)
    tamper(server, lambda sock: sock.shutdown(socket.SHUT_RDWR))
    server.wait_for_line(PUT_RIGHT.format("shut down"))
    # The worker's accept failed meanwhile (EINVAL): it waits, then serves
    # again, without spinning on the listener (a traceback fails the test).
    wait_until(lambda: answered(server.address, worker.pid), timeout=10,
               what="the worker serving again")
    newcomer = start_fdapp(server)
    wait_until(lambda: answered(server.address, newcomer.pid), timeout=10,
               what="a new worker serving")


def test_a_handback_with_a_listener_shut_down_meanwhile_keeps_the_others(
        start_fdserver, start_fdapp, procs, public_dir):
    # fdserver is dead, so nobody puts it right: a holder shuts one listener
    # down.  Its port is free, the next fdserver binds it afresh; the
    # workers' handback still carries the dead socket with the live one.
    # Before, that refused the whole handback, and the live port was lost.
    from conftest import FdserverProc
    from support import script

    dead, live = free_port(), free_port()
    binds = ("--bind", f"http=127.0.0.1:{dead}", "--bind", f"other=127.0.0.1:{live}")
    path = str(public_dir / "fd.sock")
    first = procs.start([script("fdserver"), "--socket", path, *binds], cls=FdserverProc)
    first.wait_for_line(r"serving http")
    first.socket = path
    worker = start_fdapp(first)
    holder = fdserver.register(path)
    try:
        first.signal(signal.SIGKILL)
        first.wait()
        [shut] = [s for s in holder.sockets() if s.getsockname()[1] == dead]
        shut.shutdown(socket.SHUT_RDWR)
        second = procs.start([script("fdserver"), "--socket", path, *binds,
                              "--recover-timeout", "60"], cls=FdserverProc)
        second.wait_for_line(rf"ignored the socket handed back for 127\.0\.0\.1:{dead}: a "
                             r"process holding it had shut it down")
        second.wait_for_line(rf"took back other on 127\.0\.0\.1:{live} from worker pid "
                             rf"{worker.pid}")
        second.wait_for_line(r"serving http on")
        second.socket = path
        wait_until(lambda: answered(f"127.0.0.1:{live}", worker.pid), timeout=10,
                   what="the old worker serving the live port")
        newcomer = start_fdapp(second)
        wait_until(lambda: answered(f"127.0.0.1:{dead}", newcomer.pid), timeout=10,
                   what="a new worker serving the port bound afresh")
    finally:
        for sock in holder.sockets():
            sock.close()
        holder.channel.close()
