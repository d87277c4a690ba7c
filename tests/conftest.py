"""Fixtures that start fdserver and fdapp as real processes on real sockets."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import APP_USER, GROUP, OTHER_USER, PROJECT, Proc, bad_log_lines, run, script  # noqa: E402


class FdserverProc(Proc):
    """A running fdserver; .socket is its Unix socket, .address its first listener."""

    socket: str
    address: str

    def status(self) -> dict:
        result = run([script("fdctl"), "--socket", self.socket, "status", "--json"])
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def control(self):
        from fdserver.ctl import Control
        return Control(self.socket)

    def wait_state(self, pid: int, state: str, timeout: float = 15.0) -> None:
        """Wait (event-driven, fdserver answers on the change) for a worker state."""
        with self.control() as control:
            ok, now = control.wait(pid, state, timeout)
        assert ok, f"worker {pid} is {now}, not {state}, after {timeout}s\n{self.output}"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "child_errors(reason): this test's child processes may log tracebacks or "
                   "ERROR lines (the reason says why)")


@pytest.fixture(autouse=True)
def clean_child_logs(request):
    """Fail a test whose child processes logged a traceback or an ERROR line."""
    first = len(Proc.started)
    yield
    children = Proc.started[first:]
    del Proc.started[first:]
    if request.node.get_closest_marker("child_errors"):
        return
    for proc in children:       # those of the procs fixture are closed by now
        bad = bad_log_lines(proc)
        if bad:
            pytest.fail(f"{' '.join(proc.argv[:3])} (pid {proc.pid}) logged:\n"
                        + "\n".join(bad[:20]), pytrace=False)


@pytest.fixture
def procs():
    """Start processes with procs.start(...); all are killed at teardown."""
    started: list[Proc] = []

    class Starter:
        def start(self, argv, cls=Proc, **kwargs) -> Proc:
            proc = cls(argv, **kwargs)
            started.append(proc)
            return proc

    try:
        yield Starter()
    finally:
        for proc in reversed(started):
            proc.close()


@pytest.fixture
def sockdir(tmp_path_factory) -> Path:
    # Short path: a Unix socket path must fit in 107 bytes.
    return tmp_path_factory.mktemp("s")


@pytest.fixture
def public_dir():
    """A folder every user can enter and only its owner can write to (pytest's
    own tmp folders are 0700; fdserver refuses a socket folder others can
    write to).  chown it to a test's user when that user creates files in it."""
    path = Path(tempfile.mkdtemp(prefix="fds-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_fdserver(procs, sockdir):
    """start_fdserver(*extra, binds=[...]) -> FdserverProc, once it serves."""

    def start(*extra: str, binds=("127.0.0.1:0",), name: str = "fd.sock",
              dir: Path | None = None) -> FdserverProc:
        path = str((dir or sockdir) / name)
        argv = [script("fdserver"), "--socket", path, *extra]
        for bind in binds:
            argv += ["--bind", bind]
        proc = procs.start(argv, cls=FdserverProc)
        match = proc.wait_for_line(r"serving \w+ on (\S+?)[,;]")
        proc.socket = path
        proc.address = match.group(1)
        return proc

    return start


# FDAPP_LOOP=uvloop: every worker start_fdapp starts runs on uvloop (./dev test
# runs the core tests so too).
LOOP = ("--loop", os.environ["FDAPP_LOOP"]) if os.environ.get("FDAPP_LOOP") else ()


@pytest.fixture
def start_fdapp(procs):
    """start_fdapp(server, *extra) -> Proc, once the worker reports ready."""

    def start(server: FdserverProc, *extra: str, app: str = "app:make_app",
              wait: bool = True, cwd: Path = PROJECT) -> Proc:
        proc = procs.start([script("fdapp"), app, "--socket", server.socket, *LOOP, *extra],
                           cwd=cwd)
        if wait:
            proc.wait_for_line(r"ready: serving")
            server.wait_state(proc.pid, "ready")
        return proc

    return start


@pytest.fixture(scope="session")
def deploy_user():
    """The user deploy/supervisord.conf drops fdserver to, as ./dev demo creates it."""
    created = False
    try:
        pwd.getpwnam("fdserver")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", "fdserver"], check=True)
        created = True
    try:
        yield pwd.getpwnam("fdserver").pw_uid
    finally:
        if created:
            subprocess.run(["userdel", "fdserver"], check=False)


@pytest.fixture(scope="session")
def users():
    """The group fdtest with two members, created (and removed) by this session."""
    created = []
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", GROUP], check=True)
        created.append(("groupdel", GROUP))
    for name in (APP_USER, OTHER_USER):
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                            "/usr/sbin/nologin", "-g", GROUP, name], check=True)
            created.insert(0, ("userdel", name))
    try:
        yield {name: pwd.getpwnam(name).pw_uid for name in (APP_USER, OTHER_USER)}
    finally:
        for command, name in created:
            subprocess.run([command, name], check=False)
