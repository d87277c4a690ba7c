"""fdserver can die or be upgraded without losing the port or a request."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import sys

import pytest

import fdserver
from fdserver.client import ReceivedListener, resume

from loadclient import LoadClient
from support import (
    APP_USER,
    OTHER_USER,
    PROJECT,
    free_low_port,
    free_port,
    http_get,
    proc_ids,
    wait_until,
)

AS_USER = str(PROJECT / "tests" / "as_user.py")


def listening_inodes(port: int) -> set[int]:
    """Inodes of the kernel sockets listening on 127.0.0.1:port (/proc/net/tcp)."""
    inodes = set()
    with open("/proc/net/tcp") as table:
        for row in list(table)[1:]:
            fields = row.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state == "0A" and int(local.split(":")[1], 16) == port:
                inodes.add(inode)
    return inodes


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def answered_by(address: str, pid: int) -> None:
    wait_until(lambda: http_get(address)[1] == f"Hello from {pid}\n", timeout=30,
               what=f"an answer from {pid}")


def pids(server) -> list[int]:
    return [w["pid"] for w in server.status()["workers"]]


@pytest.mark.parametrize("mode", ["keepalive", "close"])
def test_sigkill_under_load_then_restart(start_fdserver, start_fdapp, mode):
    port = free_port()
    first = start_fdserver(binds=(f"127.0.0.1:{port}",))
    old = [start_fdapp(first) for _ in range(2)]
    [inode] = listening_inodes(port)
    with LoadClient(first.address, clients=8, mode=mode) as load:
        load.wait_started()
        first.signal(signal.SIGKILL)
        first.wait()
        second = start_fdserver(binds=(f"127.0.0.1:{port}",))
        second.wait_for_line(rf"took back http on 127.0.0.1:{port} from worker pid "
                             rf"({old[0].pid}|{old[1].pid})")
        new = start_fdapp(second)
        answered_by(second.address, new.pid)
        wait_until(lambda: sorted(pids(second)) == sorted([*(w.pid for w in old), new.pid]),
                   what="old and new workers listed")
        report = load.stop()
    assert report["failed"] == 0, report["failures"]
    # The very same kernel socket, now held by the new fdserver too.
    assert listening_inodes(port) == {inode}
    assert inode in socket_inodes(second.pid)
    assert {w["state"] for w in second.status()["workers"]} == {"ready"}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_sigkill_and_restart_with_privilege_separation(start_fdserver, start_fdapp, public_dir):
    port = free_low_port()
    flags = ("--user", "nobody", "--socket-mode", "0666")
    first = start_fdserver(*flags, binds=(f"127.0.0.1:{port}",), dir=public_dir)
    old = start_fdapp(first)
    with LoadClient(first.address, clients=4, mode="close") as load:
        load.wait_started()
        first.signal(signal.SIGKILL)
        first.wait()
        second = start_fdserver(*flags, binds=(f"127.0.0.1:{port}",), dir=public_dir)
        new = start_fdapp(second)
        answered_by(second.address, new.pid)
        report = load.stop()
    assert report["failed"] == 0, report["failures"]
    nobody = pwd.getpwnam("nobody").pw_uid
    assert proc_ids(second.pid)["Uid"] == [nobody] * 4
    assert listening_inodes(port) <= socket_inodes(second.pid)
    assert sorted(pids(second)) == sorted([old.pid, new.pid])


def test_planned_upgrade_under_load(start_fdserver, start_fdapp):
    """Upgrade = stop the old fdserver, start the new code: the workers bridge it."""
    port = free_port()
    first = start_fdserver(binds=(f"127.0.0.1:{port}",))
    old = [start_fdapp(first) for _ in range(2)]
    with LoadClient(first.address, clients=8, mode="close") as load:
        load.wait_started()
        first.signal(signal.SIGTERM)
        assert first.wait() == 0
        second = start_fdserver(binds=(f"127.0.0.1:{port}",))
        new = start_fdapp(second)
        answered_by(second.address, new.pid)
        for worker in old:              # then retire the old workers, gracefully
            worker.signal(signal.SIGTERM)
            assert worker.wait() == 0
        report = load.stop()
    assert report["failed"] == 0, report["failures"]
    assert pids(second) == [new.pid]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as other users")
def test_hostile_handback_is_refused(users, procs, start_fdserver, start_fdapp,
                                     public_dir):
    port = free_port()
    first = start_fdserver("--socket-mode", "0666", binds=(f"127.0.0.1:{port}",),
                           dir=public_dir)
    holder = fdserver.register(first.socket)      # this test process holds the listener
    try:
        holder.report("ready")
        first.signal(signal.SIGKILL)
        first.wait()
        second = start_fdserver_recovering(procs, public_dir, port)

        # 1. An allowed peer offers some other listening socket.
        with socket.socket() as decoy:
            decoy.bind(("127.0.0.1", 0))
            decoy.listen()
            decoy_port = decoy.getsockname()[1]
            fake = ReceivedListener("http", "AF_INET", "decoy", decoy)
            channel, _ = resume(second.socket, "ready", [fake])
            message, _ = channel.receive()
            channel.close()
        assert message["type"] == "error"
        assert message["message"] == (
            f"handback refused: a socket bound to 127.0.0.1:{decoy_port} matches "
            f"no --bind address this fdserver recovers (127.0.0.1:{port})")
        second.wait_for_line(r"refused handback from pid \d+ uid 0: handback refused")

        # 2. A peer that is not allowed offers the real one.
        intruder = procs.start([sys.executable, "-c", INTRUDER, OTHER_USER, second.socket,
                                str(holder.sockets()[0].fileno())],
                               pass_fds=[holder.sockets()[0].fileno()])
        intruder.wait_for_line(r"refused: uid \d+ gid \d+ may not receive the listeners")
        assert intruder.wait() == 0
        assert "serving" not in second.output            # still waiting for a real worker

        # 3. The real holder hands it back; fdserver serves again.
        channel, _ = resume(second.socket, "ready", holder.listeners)
        second.wait_for_line(rf"serving http on 127.0.0.1:{port};")
        worker = start_fdapp(second)
        answered_by(f"127.0.0.1:{port}", worker.pid)
        channel.close()
    finally:
        for sock in holder.sockets():
            sock.close()
        holder.channel.close()


def start_fdserver_recovering(procs, directory, port):
    from conftest import FdserverProc
    from support import script

    path = str(directory / "fd.sock")
    proc = procs.start([script("fdserver"), "--socket", path, "--bind", f"127.0.0.1:{port}",
                        "--allow-user", APP_USER, "--recover-timeout", "60",
                        "--socket-mode", "0666"], cls=FdserverProc)
    proc.wait_for_line(rf"cannot bind 127.0.0.1:{port}: address in use; waiting")
    proc.socket = path
    return proc


INTRUDER = """
import os, pwd, socket, sys
from fdserver.client import ReceivedListener, resume
from fdserver.errors import RefusedError
user, path, fd = sys.argv[1], sys.argv[2], int(sys.argv[3])
record = pwd.getpwnam(user)
os.setgroups([]); os.setresgid(record.pw_gid, record.pw_gid, record.pw_gid)
os.setresuid(record.pw_uid, record.pw_uid, record.pw_uid)
stolen = ReceivedListener("http", "AF_INET", "stolen", socket.socket(fileno=fd))
try:
    resume(path, "ready", [stolen])
except RefusedError as exc:
    print(exc, flush=True)
"""


def test_worker_out_of_descriptors_keeps_trying_to_reconnect(start_fdserver, start_fdapp):
    import resource

    port = free_port()
    first = start_fdserver(binds=(f"127.0.0.1:{port}",))
    worker = start_fdapp(first)
    soft, hard = resource.prlimit(worker.pid, resource.RLIMIT_NOFILE)
    # Below what it has open: every new descriptor fails with EMFILE.
    resource.prlimit(worker.pid, resource.RLIMIT_NOFILE, (3, hard))
    first.signal(signal.SIGKILL)
    first.wait()
    worker.wait_for_line(r"WARNING reconnecting: cannot create a socket to reach fdserver "
                         r".*: Too many open files")
    resource.prlimit(worker.pid, resource.RLIMIT_NOFILE, (soft, hard))
    second = start_fdserver(binds=(f"127.0.0.1:{port}",))
    worker.wait_for_line(r"re-registered with fdserver")
    wait_until(lambda: pids(second) == [worker.pid], what="the worker listed again")
    answered_by(second.address, worker.pid)


def test_sigterm_during_re_registration_serves_what_the_new_fdserver_sent(
        start_fdserver, start_fdapp):
    """SIGTERM while a dispatch worker re-registers: the new fdserver counts it
    ready as the handshake ends and may already send it connections.  This
    test plays that fdserver, to hold the handshake open at will."""
    from fdserver.transport import Channel

    server = start_fdserver("--dispatch")
    worker = start_fdapp(server)
    server.signal(signal.SIGKILL)
    server.wait()
    worker.wait_for_line(r"lost fdserver")
    os.unlink(server.socket)                        # the dead fdserver's file
    played = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    web = socket.create_server(("127.0.0.1", 0))
    client = conn = None
    try:
        played.bind(server.socket)
        played.listen()
        played.settimeout(10)
        sock, _ = played.accept()
        sock.settimeout(10)
        channel = Channel(sock, server_side=True)
        hello, _ = channel.receive()
        assert hello["type"] == "hello" and hello["resume"] == {"state": "ready"}
        worker.signal(signal.SIGTERM)               # in the middle of the handshake
        worker.wait_for_line(r"SIGTERM: draining")
        channel.send({"type": "welcome", "version": 1, "server_pid": os.getpid(),
                      "listeners": 1, "handback": False, "mode": "dispatch"})
        client = socket.create_connection(web.getsockname(), timeout=10)
        conn, peer = web.accept()
        channel.send({"type": "connections", "listener": "http", "family": "AF_INET",
                      "peers": [list(peer)], "fds": 1}, [conn.fileno()])
        conn.close()
        while (message := channel.receive()[0])["type"] != "state":
            pass                                    # load reports
        assert message["state"] == "draining"
        channel.send({"type": "released"})
        client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        assert client.recv(4096).endswith(f"Hello from {worker.pid}\n".encode())
        assert worker.wait() == 0
    finally:
        for s in (played, web, client):
            if s is not None:
                s.close()
