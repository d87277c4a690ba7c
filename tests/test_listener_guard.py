"""A worker changing the shared listening sockets for everyone.

Every worker holds the very sockets fdserver listens on: the non-blocking
flag, the listening state and the options are shared by all holders.  One
worker's ``setblocking(True)``, ``shutdown()`` or ``setsockopt()`` must not
stall fdserver, nor outlive that worker (fdserver.listeners' ListenerGuard
puts them right).
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket

import pytest

import fdserver
from fdserver.listeners import put_right

from support import free_port, http_get, tuple_of, wait_until

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


def unusable(sock: socket.socket) -> None:
    """Shut down, then connected to itself: it cannot listen again until
    disconnected (connect(AF_UNSPEC), which Python's connect() cannot say)."""
    sock.shutdown(socket.SHUT_RDWR)
    sock.setblocking(True)
    sock.connect(sock.getsockname())


def test_put_right_undoes_blocking_and_shutdown():
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
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


def test_a_backlog_over_somaxconn_is_not_taken_for_a_changed_one():
    # listen() caps the limit at net.core.somaxconn: a handback of a listener
    # bound with a larger --backlog was said to be "given another backlog".
    with open("/proc/sys/net/core/somaxconn") as f:
        over = int(f.read()) + 1000
    with socket.create_server(("127.0.0.1", 0), backlog=over) as listener:
        listener.setblocking(False)
        assert put_right(listener, over) == []
        listener.listen(8)
        assert put_right(listener, over) == ["given another backlog"]
        assert put_right(listener, over) == []


def test_an_option_put_back_once_is_not_put_back_again():
    # TCP_MAXSEG reads what a connect left when no MSS is set: unsetting the
    # holder's must not count as "put back" at every check (a log line a second).
    from fdserver.listeners import options_of, put_back_options

    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        held = options_of(listener)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 88)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        assert put_back_options(listener, held) == (["TCP_CORK", "TCP_MAXSEG"], [])
        assert put_back_options(listener, held) == ([], [])
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) != 88


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


@pytest.mark.parametrize("mode", ["shared", "dispatch"])
def test_a_listener_shut_down_then_connected_is_listened_on_again(start_fdserver, start_fdapp,
                                                                  mode):
    # Connected, a socket cannot listen; disconnected (connect(AF_UNSPEC)) it
    # can, on the same port.  Before, the dead socket kept failing: dispatch
    # mode starved the other listener, and new workers were refused it.
    dead, live = free_port(), free_port()
    flags = ("--dispatch",) if mode == "dispatch" else ()
    server = start_fdserver(*flags, binds=(f"http=127.0.0.1:{dead}", f"b=127.0.0.1:{live}"))
    worker = start_fdapp(server)
    tamper(server, lambda sock: unusable(sock) if sock.getsockname()[1] == dead else None)
    server.wait_for_line(rf"listener http 127\.0\.0\.1:{dead} was made blocking, shut down, "
                         r"connected by a process holding it \(a worker\); put right")
    for port in (live, dead):
        wait_until(lambda port=port: answered(f"127.0.0.1:{port}", worker.pid), timeout=10,
                   what=f"port {port} served again")
    newcomer = start_fdapp(server)      # handed the listener put right, not refused
    assert newcomer.pid in [w["pid"] for w in server.status()["workers"]]


@pytest.mark.child_errors("a listener that cannot be put right yet is an error fdserver logs")
def test_a_port_taken_while_its_listener_was_shut_down_is_taken_back_once_free(
        start_fdserver, start_fdapp):
    # Shut down, the listener no longer holds its port against a new socket
    # bound with SO_REUSEADDR.  fdserver says so once, and tries every second
    # (before: it gave the listener up for good).
    server = start_fdserver()
    worker = start_fdapp(server)
    address = tuple_of(server.address)
    thief = socket.socket()
    try:
        tamper(server, lambda sock: sock.shutdown(socket.SHUT_RDWR))
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        thief.bind(address)
        thief.listen()
        server.wait_for_line(r"listener http 127\.0\.0\.1:\d+ was changed by a process "
                             r"holding it, and cannot be put right now: address already in use")
    finally:
        thief.close()
    server.wait_for_line(r"listener http 127\.0\.0\.1:\d+ is put right")
    wait_until(lambda: answered(server.address, worker.pid), timeout=10,
               what="the worker serving again")
    assert len([line for line in server.lines if "cannot be put right now" in line]) == 1


@pytest.mark.child_errors("a locked filter is an error fdserver logs")
def test_a_locked_filter_does_not_keep_other_options_from_being_put_back(start_fdserver,
                                                                         start_fdapp):
    import struct

    server = start_fdserver()
    worker = start_fdapp(server)

    def lock_and_linger(sock: socket.socket) -> None:
        attach_accept_all_filter(sock)
        sock.setsockopt(socket.SOL_SOCKET, 44, 1)                    # SO_LOCK_FILTER
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tamper(server, lock_and_linger)
    server.wait_for_line(r"cannot be put right now: a socket filter is locked on it")
    server.wait_for_line(r"was given another SO_LINGER by a process holding it \(a worker\); "
                         r"put right")
    assert answered(server.address, worker.pid)


def attach_accept_all_filter(sock: socket.socket, instructions: int = 4) -> None:
    import ctypes

    class Instruction(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Instruction))]

    code = (Instruction * instructions)(*[Instruction(0x06, 0, 0, 0xFFFFFFFF)] * instructions)
    program = Program(instructions, code)                              # ret #-1, each
    sock.setsockopt(socket.SOL_SOCKET, 26, bytes(program))             # SO_ATTACH_FILTER


def test_a_socket_filter_a_worker_attached_is_taken_off(start_fdserver, start_fdapp):
    # Four instructions: reading the filter back with a 4-byte buffer (its
    # length counts instructions) overflowed fdserver's stack and killed it.
    server = start_fdserver()
    worker = start_fdapp(server)
    tamper(server, attach_accept_all_filter)
    server.wait_for_line(r"listener http 127\.0\.0\.1:\d+ was given a socket filter by a process "
                         r"holding it \(a worker\); put right")
    assert server.popen.poll() is None
    assert answered(server.address, worker.pid)


def test_options_a_worker_set_on_a_listener_are_put_back(start_fdserver, start_fdapp):
    # Accepted connections inherit them: SO_LINGER 0 resets every one at its
    # close, TCP_CORK holds responses back; listen(0) shrinks the queue.
    import struct

    server = start_fdserver()
    worker = start_fdapp(server)

    def sabotage(sock: socket.socket) -> None:
        sock.listen(0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    tamper(server, sabotage)
    server.wait_for_line(r"listener http 127\.0\.0\.1:\d+ was given another backlog, given "
                         r"another SO_LINGER, given another TCP_CORK by a process holding it")
    check = fdserver.register(server.socket)
    try:
        [sock] = check.sockets()
        assert struct.unpack("ii", sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)) == \
            (0, 0)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
        from fdserver.listeners import queue_limit
        assert queue_limit(sock) == 1024
    finally:
        for sock in check.sockets():
            sock.close()
        check.channel.close()
    assert answered(server.address, worker.pid)
