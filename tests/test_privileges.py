"""Privilege separation with real users: root only to bind, checked peers.

CI runs as root; these tests create their users with useradd.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import sys

import pytest

from support import (
    APP_USER,
    GROUP,
    OTHER_USER,
    PROJECT,
    free_low_port,
    http_get,
    proc_ids,
    run,
    script,
)

AS_USER = str(PROJECT / "tests" / "as_user.py")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="privilege tests need root")


def start_worker_as(procs, user: str, server, wait: bool = True):
    proc = procs.start([sys.executable, AS_USER, user, "fdapp_main", "app:make_app",
                        "--socket", server.socket, "--connect-timeout", "5"])
    if wait:
        proc.wait_for_line(r"ready: serving")
        server.wait_state(proc.pid, "ready")
    return proc


def test_fdserver_drops_to_nobody_after_binding_a_low_port(users, procs, start_fdserver,
                                                           public_dir):
    port = free_low_port()
    server = start_fdserver("--user", "nobody", "--socket-group", GROUP,
                            "--allow-group", GROUP, binds=(f"127.0.0.1:{port}",),
                            dir=public_dir)
    nobody = pwd.getpwnam("nobody")
    ids = proc_ids(server.pid)
    assert ids["Uid"] == [nobody.pw_uid] * 4            # real, effective, saved, fs
    assert ids["Gid"] == [nobody.pw_gid] * 4
    assert ids["Groups"] == []
    assert server.status()["server"]["uid"] == nobody.pw_uid

    worker = start_worker_as(procs, APP_USER, server)
    [listed] = server.status()["workers"]
    assert (listed["pid"], listed["uid"]) == (worker.pid, users[APP_USER])
    assert proc_ids(worker.pid)["Uid"] == [users[APP_USER]] * 4
    assert http_get(f"127.0.0.1:{port}") == (200, f"Hello from {worker.pid}\n")


def test_peer_not_allowed_is_refused_and_told_why(users, procs, start_fdserver, public_dir):
    server = start_fdserver("--user", "nobody", "--socket-group", GROUP,
                            "--allow-user", APP_USER, dir=public_dir)
    intruder = start_worker_as(procs, OTHER_USER, server, wait=False)
    assert intruder.wait() != 0
    intruder.wait_for_line(rf"fdapp: error: fdserver at {server.socket} refused: "
                           rf"uid {users[OTHER_USER]} gid \d+ may not receive the listeners")
    server.wait_for_line(rf"refused worker pid {intruder.pid} uid {users[OTHER_USER]}")
    # Everyone else is still served.
    worker = start_worker_as(procs, APP_USER, server)
    assert http_get(server.address) == (200, f"Hello from {worker.pid}\n")
    assert [w["pid"] for w in server.status()["workers"]] == [worker.pid]


def test_socket_file_mode_and_owner_and_never_looser(users, public_dir):
    from fdserver.socketfile import SocketFile

    seen = {}

    def on_created(bound: str) -> None:
        # Before its group is set, the socket is out of everyone else's reach:
        # in a private folder only root can enter, not yet at its path.
        seen["folder"] = os.stat(os.path.dirname(bound))
        seen["at path"] = os.path.lexists(path)

    path = str(public_dir / "fd.sock")
    old_umask = os.umask(0)          # the code must not rely on the caller's umask
    try:
        socket_file = SocketFile(path, mode=0o640, group=grp.getgrnam(GROUP).gr_gid,
                                 on_created=on_created)
    finally:
        os.umask(old_umask)
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert (st.st_uid, st.st_gid) == (0, grp.getgrnam(GROUP).gr_gid)
        assert stat.S_IMODE(seen["folder"].st_mode) == 0o700 and seen["folder"].st_uid == 0
        assert seen["at path"] is False
    finally:
        socket_file.close()
    assert not os.path.exists(path)
    assert os.listdir(public_dir) == []          # the private folder is gone too


def test_socket_mode_flag_as_seen_by_a_running_fdserver(users, start_fdserver, public_dir):
    server = start_fdserver("--user", "nobody", "--socket-mode", "0600", dir=public_dir)
    st = os.lstat(server.socket)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_gid == pwd.getpwnam("nobody").pw_gid     # default: the --user's group


def test_imports_happen_before_the_drop(users, procs, public_dir, tmp_path):
    """The fdserver package lives in a root-only folder: nothing may load late."""
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    shutil.copytree(PROJECT / "fdserver", hidden / "fdserver")
    path = str(public_dir / "fd.sock")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import fdserver.cli as c; "
            "print('loaded', c.__file__, flush=True); sys.exit(c.fdserver_main(sys.argv[2:]))")
    server = procs.start([sys.executable, "-c", code, str(hidden), "--user", "nobody",
                          "--socket", path, "--bind", "127.0.0.1:0", "--socket-mode", "0666"])
    server.wait_for_line(rf"loaded {hidden}/fdserver/cli.py")
    address = server.wait_for_line(r"serving http on (\S+);").group(1)
    worker = procs.start([script("fdapp"), "app:make_app", "--socket", path])
    worker.wait_for_line(r"ready: serving")
    assert http_get(address) == (200, f"Hello from {worker.pid}\n")
    assert run([script("fdctl"), "--socket", path, "status"]).returncode == 0
    worker.signal(15)
    assert worker.wait() == 0
    server.signal(15)
    assert server.wait() == 0, server.output
    assert "Traceback" not in server.output
