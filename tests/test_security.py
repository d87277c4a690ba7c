"""Attacks by local users, each reproduced for real (docs/security.md).

Each test plays the attack the security review found and checks that it
fails now: the attacker gets no descriptor, no file changes owner or mode,
no listener from another network namespace is served, and so on.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import signal
import socket
import stat
import sys

import pytest

from fdserver.client import ReceivedListener, resume
from fdserver.client import connect as client_connect
from fdserver.errors import SocketFileError

from support import APP_USER, GROUP, OTHER_USER, PROJECT, free_port, http_get, run, script
from test_hostile import assert_refused, connect, read_until_closed

AS_USER = str(PROJECT / "tests" / "as_user.py")
SYSTEM_PYTHON = "/usr/bin/python3"      # readable by every user, unlike the venv's base

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")


def as_user(name: str) -> dict:
    record = pwd.getpwnam(name)
    return {"user": record.pw_uid, "group": record.pw_gid, "extra_groups": []}


# A stand-alone peer (standard library only: it runs as other users and in
# other namespaces).  Frames are built by hand, as an attacker would.
PEER_LIB = r"""
import array, json, socket, struct, sys
HEADER = struct.Struct("!2sBBI")
def frame(message):
    payload = json.dumps(message).encode()
    return HEADER.pack(b"FD", 1, 0, len(payload)) + payload
LEFT = {}         # bytes read past a frame, per socket
def read_frame(sock):
    data = LEFT.pop(sock.fileno(), b"")
    fds = []
    while len(data) < 8 or len(data) < 8 + HEADER.unpack_from(data)[3]:
        chunk, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(252 * 4))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i"); got.frombytes(payload[:len(payload) - len(payload) % 4])
                fds.extend(got)
        if not chunk:
            return None, fds
        data += chunk
    end = 8 + HEADER.unpack_from(data)[3]
    if data[end:]:
        LEFT[sock.fileno()] = data[end:]
    return json.loads(data[8:end]), fds
"""


# -- 1. a worker hands its listener only to its own fdserver --------------------------

IMPOSTOR = PEER_LIB + r"""
import os
path = sys.argv[1]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen()
print("listening", flush=True)
for n in range(1, 4):
    conn, _ = server.accept()
    conn.settimeout(5)
    hello, fds = None, []
    try:
        hello, fds = read_frame(conn)
        if hello:
            conn.sendall(frame({"type": "welcome", "version": 1, "server_pid": os.getpid(),
                                "listeners": 1, "handback": True, "token": "t",
                                "mode": "shared"}))
            _, more = read_frame(conn)
            fds += more
    except (OSError, ValueError):
        pass
    listening = sum(socket.socket(fileno=fd).getsockopt(socket.SOL_SOCKET,
                                                         socket.SO_ACCEPTCONN) for fd in fds)
    print(f"connection {n}: hello={hello is not None} fds={len(fds)} listening={listening}",
          flush=True)
    conn.close()
"""


@root_only
def test_a_worker_hands_nothing_to_an_impostor_at_the_socket_path(
        users, procs, start_fdserver, start_fdapp, public_dir):
    port = free_port()
    first = start_fdserver("--socket-mode", "0666", binds=(f"127.0.0.1:{port}",),
                           dir=public_dir)
    worker = start_fdapp(first)
    # A planned restart removes the socket file; in a folder anyone may write
    # to (the unsafe set-up fdserver now refuses), a local user binds the path.
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    os.chmod(public_dir, 0o1777)
    impostor = procs.start([SYSTEM_PYTHON, "-c", IMPOSTOR, first.socket], cwd="/",
                           **as_user(OTHER_USER))
    impostor.wait_for_line("listening")
    for n in (1, 2, 3):            # the worker keeps retrying, and hands over nothing
        line = impostor.wait_for_line(rf"connection {n}: ").string
        assert line.endswith("hello=False fds=0 listening=0"), impostor.output
    worker.wait_for_line(rf"reconnecting: the process serving {re.escape(first.socket)} "
                         rf"\(pid {impostor.pid}\) runs as uid {users[OTHER_USER]}, not as "
                         rf"fdserver's user")
    assert http_get(f"127.0.0.1:{port}") == (200, f"Hello from {worker.pid}\n")

    # The impostor goes; the real fdserver takes the listener back from the worker.
    impostor.kill()
    os.unlink(first.socket)
    os.chmod(public_dir, 0o755)
    second = start_fdserver("--socket-mode", "0666", binds=(f"127.0.0.1:{port}",),
                            dir=public_dir)
    second.wait_for_line(rf"took back http on 127.0.0.1:{port} from worker pid {worker.pid}")
    second.wait_state(worker.pid, "ready")
    assert "Traceback" not in worker.output


@root_only
def test_a_worker_registers_only_with_a_trusted_user(users, procs, public_dir):
    os.chown(public_dir, users[OTHER_USER], -1)
    path = str(public_dir / "fd.sock")
    server = procs.start([sys.executable, AS_USER, OTHER_USER, "fdserver_main", "--socket",
                          path, "--bind", "127.0.0.1:0", "--socket-mode", "0666"])
    address = server.wait_for_line(r"serving http on (\S+);").group(1)
    refused = run([script("fdapp"), "app:make_app", "--socket", path])
    assert refused.returncode == 1
    assert "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"fdapp: error: the process serving {path} (pid {server.pid}) runs as uid "
        f"{users[OTHER_USER]}, not as fdserver's user (uid 0); refusing to talk to it (if "
        f"fdserver runs as that user, pass --server-user)")
    trusting = procs.start([script("fdapp"), "app:make_app", "--socket", path,
                            "--server-user", OTHER_USER])
    trusting.wait_for_line(r"ready: serving")
    assert http_get(address) == (200, f"Hello from {trusting.pid}\n")


@root_only
@pytest.mark.parametrize("layout, fragment", [
    ("sticky world-writable", r"is writable by users other than its owner \(mode 1777\)"),
    ("group-writable", r"is writable by users other than its owner \(mode 0775\)"),
    ("owned by another user", rf"belongs to user {OTHER_USER} \(uid \d+\), who could "
                              r"replace the socket"),
    ("under a writable folder", r"is writable by users other than its owner \(mode 0777\), "
                                r"so .* could be replaced"),
    ("a '..' after a link", rf"belongs to user {OTHER_USER} \(uid \d+\), who could "
                           r"replace the socket"),
])
def test_fdserver_refuses_a_socket_folder_others_can_write_to(users, public_dir, layout,
                                                              fragment):
    folder = public_dir / "run"
    folder.mkdir(mode=0o755)
    if layout == "sticky world-writable":
        os.chmod(folder, 0o1777)
    elif layout == "group-writable":
        os.chmod(folder, 0o775)
    elif layout == "owned by another user":
        os.chown(folder, users[OTHER_USER], -1)
    elif layout == "under a writable folder":
        os.chmod(public_dir, 0o777)           # anyone could rename run/ away
    path = folder / "fd.sock"
    if layout == "a '..' after a link":
        # run/link/.. is the other user's folder to the kernel, not run/.
        theirs = public_dir / "theirs" / "sub"
        theirs.mkdir(parents=True)
        os.chown(theirs.parent, users[OTHER_USER], -1)
        os.symlink(theirs, folder / "link")
        path = f"{folder}/link/../fd.sock"
        folder = theirs.parent
    result = run([script("fdserver"), "--socket", str(path), "--bind", "127.0.0.1:0"])
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("fdserver: error: socket folder "), line
    assert re.search(fragment, line), line
    assert [name for name in os.listdir(folder) if name not in ("link", "sub")] == []


# -- 2. owner and mode never set through a path that can be swapped ----------------------

@root_only
def test_a_symlink_swapped_in_while_the_socket_is_created_is_never_followed(users, public_dir):
    from fdserver.socketfile import SocketFile

    victim = public_dir / "secret"
    victim.write_text("root's secret\n")
    os.chmod(victim, 0o600)
    path = public_dir / "fd.sock"

    def swap(bound: str) -> None:
        # What an inotify loop in a folder the attacker can write to does the
        # moment the socket appears: replace the path by a link to the victim.
        if os.path.lexists(path):
            os.unlink(path)
        os.symlink(victim, path)

    with pytest.raises(SocketFileError, match="something else appeared at that path"):
        SocketFile(str(path), mode=0o660, group=grp.getgrnam(GROUP).gr_gid, on_created=swap)
    st = os.stat(victim)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)
    assert os.readlink(path) == str(victim)          # not ours: left as it is
    assert sorted(os.listdir(public_dir)) == ["fd.sock", "secret"]


# -- 3. handbacks only from fdserver's own network namespace, answering its welcome --------

NETNS_PEER = PEER_LIB + r"""
path, port, echo = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "echo"
# The same address, bound in this (new) network namespace.
listener = socket.socket()
listener.setsockopt(socket.IPPROTO_IP, 15, 1)        # IP_FREEBIND: lo is down here
listener.bind(("127.0.0.1", port))
listener.listen()
conn = socket.socket(socket.AF_UNIX)
conn.connect(path)
hello = frame({"type": "hello", "versions": [1], "role": "worker", "resume": {"state": "ready"}})
handback = {"type": "handback", "fds": 1,
            "listeners": [{"name": "http", "family": "AF_INET", "address": "x"}]}
if echo:
    conn.sendall(hello)
    welcome, _ = read_frame(conn)
    handback["token"] = welcome.get("token")
    data = frame(handback)
else:
    data = hello + frame(handback)   # both at once, before the welcome is read
conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                       array.array("i", [listener.fileno()]))])
while True:
    message, _ = read_frame(conn)
    if message is None:
        break
    print(json.dumps(message), flush=True)
"""


@root_only
def test_a_handback_from_another_network_namespace_is_refused(procs, sockdir):
    from test_recovery import start_fdserver_recovering

    port = free_port()
    held = socket.socket()            # the old fdserver's listener, still held by a worker
    held.bind(("127.0.0.1", port))
    held.listen()
    try:
        server = start_fdserver_recovering(procs, sockdir, port)
        for how, expected in (("at-once", "does not carry the token"),
                              ("echo", "in another network namespace")):
            peer = procs.start(["unshare", "-rn", SYSTEM_PYTHON, "-c", NETNS_PEER,
                                server.socket, str(port), how], cwd="/")
            assert peer.wait() == 0, peer.output
            messages = [json.loads(line) for line in peer.lines]
            assert messages[-1]["type"] == "error", peer.output
            assert expected in messages[-1]["message"], peer.output
        assert "took back" not in server.output
        # The real holder, in fdserver's namespace, is taken back.
        channel, _ = resume(server.socket, "ready",
                            [ReceivedListener("http", "AF_INET", "held", held)])
        try:
            server.wait_for_line(rf"took back http on 127.0.0.1:{port}")
            server.wait_for_line(rf"serving http on 127.0.0.1:{port};")
        finally:
            channel.close()
    finally:
        held.close()


# -- 4. one user's idle registrations cannot lock everyone out ---------------------------

HOARDER = PEER_LIB + r"""
import os, resource
resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1:] * 2)
path, count = sys.argv[1], int(sys.argv[2])
held, refusals = [], []
for _ in range(count):
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(path)
    conn.sendall(frame({"type": "hello", "versions": [1], "role": "worker"}))
    message, fds = read_frame(conn)
    if message and message["type"] == "welcome":
        message, fds = read_frame(conn)          # the listeners
    for fd in fds:
        os.close(fd)
    if message is None or message["type"] == "error":
        refusals.append(message and message["message"])
        conn.close()
    else:
        held.append(conn)
print(json.dumps({"held": len(held), "refused": len(refusals), "last": refusals[-1:]}),
      flush=True)
import signal; signal.pause()      # hold them until the test kills it
"""


@root_only
def test_idle_registrations_of_one_user_cannot_fill_every_slot(users, procs, start_fdserver,
                                                               start_fdapp, public_dir):
    server = start_fdserver("--socket-mode", "0666", dir=public_dir)
    hoarder = procs.start([SYSTEM_PYTHON, "-c", HOARDER, server.socket, "4200"], cwd="/",
                          **as_user(APP_USER))
    report = json.loads(hoarder.wait_for_line(r"^\{", timeout=120).string)
    assert report["held"] == 1024, report
    assert report["refused"] == 4200 - 1024, report
    assert report["last"] == [f"too many workers from uid {users[APP_USER]} (at most 1024)"]
    # Root's worker and the operator's fdctl still get in.
    worker = start_fdapp(server)
    assert http_get(server.address)[0] == 200
    states = [w["state"] for w in server.status()["workers"] if w["pid"] == worker.pid]
    assert states == ["ready"]


# -- 5. a resumed "ready" must be shown, not claimed --------------------------------------

def test_a_resumed_worker_that_does_not_hold_the_listeners_gets_nothing(start_fdserver,
                                                                         start_fdapp):
    server = start_fdserver("--dispatch")
    worker = start_fdapp(server)
    # (a) says it resumes "ready" and shows nothing
    silent, welcome = client_connect(server.socket, "worker", 0, resume={"state": "ready"},
                                     features=["dispatch"])
    assert welcome["handback"] is True and isinstance(welcome["token"], str)
    # (b) shows a listening socket of its own instead of fdserver's
    with socket.socket() as decoy:
        decoy.bind(("127.0.0.1", 0))
        decoy.listen()
        showing, _ = resume(server.socket, "ready",
                            [ReceivedListener("http", "AF_INET", "decoy", decoy)],
                            ("dispatch",), frozenset({0, os.geteuid()}))
    server.wait_for_line(r"re-registered \(starting: it does not hold this fdserver's "
                         r"listeners\)")
    # (c) claims "ready" in so many words
    claiming, _ = client_connect(server.socket, "worker", 0, resume={"state": "starting"},
                                 features=["dispatch"])
    claiming.send({"type": "state", "state": "ready"})
    assert_refused(claiming.sock, r"^worker cannot be ready: it holds none of this "
                                  r"fdserver's listeners$")
    try:
        states = sorted((w["pid"] == worker.pid, w["state"]) for w in server.status()["workers"])
        # (a) and (b) still listed, as starting; (c) refused and gone.
        assert states == [(False, "starting"), (False, "starting"), (True, "ready")], states
        # Every connection goes to the one real worker.
        for _ in range(100):
            assert http_get(server.address, timeout=5) == (200, f"Hello from {worker.pid}\n")
    finally:
        silent.close()
        showing.close()
        claiming.close()


# -- 6. with an allow-list, fdserver's own user is not allowed -----------------------------

@root_only
def test_fdservers_own_user_is_not_allowed_past_the_allow_list(users, procs, start_fdserver,
                                                                start_fdapp, public_dir):
    server = start_fdserver("--user", "nobody", "--socket-mode", "0666",
                            "--allow-user", APP_USER, dir=public_dir)
    nobody = procs.start([sys.executable, AS_USER, "nobody", "fdapp_main", "app:make_app",
                          "--socket", server.socket, "--connect-timeout", "5"])
    assert nobody.wait() == 1
    nobody.wait_for_line(rf"refused: uid {pwd.getpwnam('nobody').pw_uid} gid \d+ may not "
                         rf"receive the listeners; allowed: users {APP_USER} \(and root\)$")
    assert server.status()["workers"] == []


# -- 7. another user's stale socket is not deleted ------------------------------------------

@root_only
def test_another_users_stale_socket_is_left_alone(users, public_dir):
    path = public_dir / "fd.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()                     # nobody listens: stale
    os.chown(path, users[OTHER_USER], -1, follow_symlinks=False)
    result = run([script("fdserver"), "--socket", str(path), "--bind", "127.0.0.1:0"])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"fdserver: error: {path} is a stale socket of user {OTHER_USER} (uid "
        f"{users[OTHER_USER]}); refusing to remove another user's file (remove it yourself "
        f"if it is safe)"]
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


# -- 8. warnings about peers are rate-limited -------------------------------------------------

def test_a_flood_of_garbage_connections_logs_a_bounded_number_of_lines(start_fdserver):
    server = start_fdserver()
    flood = 500
    for _ in range(flood):
        with connect(server) as garbage:
            garbage.sendall(b"GET / HTTP/1.0\r\n\r\n")
            read_until_closed(garbage)
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    logged = sum(1 for line in server.lines if "WARNING closed connection from" in line)
    suppressed = sum(int(m.group(1)) for m in map(
        re.compile(r"suppressed (\d+) more warnings about peers").search, server.lines) if m)
    assert logged <= 40, server.output
    assert logged + suppressed == flood, server.output


def test_warnings_from_thousands_of_uids_are_bounded_too():
    # One user with subordinate uids has thousands: each uid's budget alone
    # would let them log 20 lines per uid per window.
    import logging

    from fdserver.peerlog import TOTAL_BURSTS, PeerLog

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("test-peerlog")
    logger.propagate = False
    logger.addHandler(Keep())
    peer_log = PeerLog(logger, burst=20, window=3600)
    for uid in range(100_000, 100_000 + 1000):
        for _ in range(20):
            peer_log.warning(uid, "refused uid %d", uid)
    assert len(lines) == 20 * TOTAL_BURSTS
    peer_log.flush()
    assert lines[-1].startswith(f"suppressed {1000 * 20 - 20 * TOTAL_BURSTS} more warnings")


@root_only
def test_one_users_flood_does_not_hide_another_users_refusal(users, procs, start_fdserver,
                                                             public_dir):
    server = start_fdserver("--socket-mode", "0666", "--allow-user", APP_USER, dir=public_dir)
    for _ in range(100):             # root's garbage: its own budget runs out
        with connect(server) as garbage:
            garbage.sendall(b"GET / HTTP/1.0\r\n\r\n")
            read_until_closed(garbage)
    nobody = procs.start([sys.executable, AS_USER, "nobody", "fdapp_main", "app:make_app",
                          "--socket", server.socket, "--connect-timeout", "5"])
    assert nobody.wait() == 1
    server.wait_for_line(rf"refused worker pid {nobody.pid} uid "
                         rf"{pwd.getpwnam('nobody').pw_uid} gid \d+: not allowed")


# -- descriptors: none parked by a peer that may not send them --------------------------------

def test_descriptors_from_a_peer_without_a_welcome_asking_for_them_are_closed_at_once(
        start_fdserver):
    from test_hostile import assert_all_closed, send_with_fds

    server = start_fdserver()
    r, w = os.pipe()
    try:
        with connect(server) as hostile:
            # The first bytes of a frame, 200 copies of a pipe's write end attached.
            send_with_fds(hostile, b"FD\x01", [w] * 200)
            os.close(w)
            w = -1
            assert_refused(hostile, r"^unexpected descriptors \(200, with a frame not yet "
                                    r"complete\)$")
        assert_all_closed(r)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


# -- 5 again: a handback of more listeners than one frame carries ----------------------------

def test_a_resumed_worker_holding_more_listeners_than_a_frame_carries_is_ready(
        start_fdserver):
    import resource

    from fdserver.client import register

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    server = start_fdserver("--dispatch", binds=["127.0.0.1:0"] * 253)
    first = register(server.socket)
    try:
        assert len(first.listeners) == 253
        channel, welcome = resume(server.socket, "ready", first.listeners, (),
                                  frozenset({0, os.geteuid()}))
        try:
            server.wait_for_line(rf"worker pid {os.getpid()} uid {os.getuid()} "
                                 r"re-registered \(ready\)")
        finally:
            channel.close()
    finally:
        for sock in first.sockets():
            sock.close()
        first.channel.close()


# -- 4 again: the connections kept for root -----------------------------------------------------

CROWD = PEER_LIB + r"""
import os, resource
path, count = sys.argv[1], int(sys.argv[2])
held, last = [], None
for _ in range(count):
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(path)
    try:
        conn.sendall(frame({"type": "hello", "versions": [1], "role": "ctl"}))
    except OSError:
        pass                    # refused at once: the reason is still there to read
    try:
        message, _ = read_frame(conn)
    except OSError:
        message = None
    if message is None or message["type"] == "error":
        last = message and message["message"]
        conn.close()
    else:
        held.append(conn)
print(json.dumps({"held": len(held), "last": last}), flush=True)
import signal; signal.pause()      # hold them until the test kills it
"""


@root_only
def test_the_last_connections_are_kept_for_the_allowed_workers_too(users, procs,
                                                                   start_fdserver, public_dir):
    # Another user's connections (from however many uids: subordinate uids
    # give one user thousands) must not keep the site's workers out.
    server = start_fdserver("--socket-mode", "0666", "--max-connections", "80",
                            "--allow-user", APP_USER, dir=public_dir)
    crowd = procs.start([SYSTEM_PYTHON, "-c", CROWD, server.socket, "64"], cwd="/",
                        **as_user(OTHER_USER))
    report = json.loads(crowd.wait_for_line(r"^\{", timeout=60).string)
    assert report["held"] == 80 - 20, report          # a quarter kept
    workers = procs.start([SYSTEM_PYTHON, "-c", HOARDER, server.socket, "20"], cwd="/",
                          **as_user(APP_USER))
    # Half of what is kept: the rest stays the operator's.
    report = json.loads(workers.wait_for_line(r"^\{", timeout=60).string)
    assert (report["held"], report["refused"]) == (10, 10), report
    result = run([script("fdctl"), "--socket", server.socket, "status"])
    assert result.returncode == 0 and f"uid {os.getuid()}" in result.stdout, result


@root_only
def test_the_last_connections_are_kept_for_root(users, procs, start_fdserver, start_fdapp,
                                                public_dir):
    server = start_fdserver("--socket-mode", "0666", "--max-connections", "100",
                            dir=public_dir)
    reports = []
    for user in (APP_USER, OTHER_USER):      # 64 fdctl connections each at most
        crowd = procs.start([SYSTEM_PYTHON, "-c", CROWD, server.socket, "64"], cwd="/",
                            **as_user(user))
        reports.append(json.loads(crowd.wait_for_line(r"^\{", timeout=60).string))
    # 100 - 25 kept for root: the second crowd gets the rest, then a reason.
    assert reports[0] == {"held": 64, "last": None}, reports
    assert reports[1]["held"] == 100 - 25 - 64, reports
    assert reports[1]["last"] == (
        f"fdserver is at its limit of 75 connections for uid {users[OTHER_USER]} "
        f"(75 open, 64 of them from uid {users[APP_USER]})"), reports
    worker = start_fdapp(server)           # root's worker and fdctl still get in
    assert http_get(server.address) == (200, f"Hello from {worker.pid}\n")
