"""Zero failed requests while workers are replaced, counted under real load."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import xmlrpc.client

import pytest

from loadclient import LoadClient
from support import BIN, PROJECT, Proc, http_get, replace_by_hand, run, script, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="deploy/supervisord.conf switches users: needs root")


class Supervised:
    """supervisord -c deploy/supervisord.conf, as docs/deployment.md runs it."""

    def __init__(self, procs, run_dir, config=PROJECT / "deploy" / "supervisord.conf",
                 env: dict | None = None):
        self.run_dir = run_dir
        self.socket = str(run_dir / "fdserver.sock")
        self.url = f"unix://{run_dir}/supervisor.sock"
        env = dict(os.environ, FDSERVER_BIND="127.0.0.1:0", FDSERVER_RUN_DIR=str(run_dir),
                   PATH=f"{BIN}:{os.environ['PATH']}", **(env or {}))
        self.proc: Proc = procs.start([script("supervisord"), "-n", "-c", str(config)], env=env)
        self.workers = wait_until(lambda: self._ready(4), timeout=60, what="4 ready workers")
        self.address = self.status()["listeners"][0]["address"]

    def status(self) -> dict:
        result = run([script("fdctl"), "--socket", self.socket, "status", "--json"])
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def _ready(self, count: int):
        if not os.path.exists(self.socket):
            return None
        workers = [w["pid"] for w in self.status()["workers"] if w["state"] == "ready"]
        return set(workers) if len(workers) == count else None

    def rpc(self):
        from supervisor.xmlrpc import SupervisorTransport
        transport = SupervisorTransport(None, None, self.url)
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport).supervisor

    def rolling_restart(self, *extra: str):
        return run([script("fdctl"), "--socket", self.socket, "rolling-restart",
                    "--supervisor", self.url, *extra], timeout=180)

    def shutdown(self) -> None:
        pids = [p["pid"] for p in self.rpc().getAllProcessInfo() if p["pid"]]
        self.proc.signal(signal.SIGTERM)        # supervisord stops its children first
        try:
            self.proc.wait(timeout=90)
        finally:
            for pid in pids:                    # in case it could not
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def supervised(procs, public_dir, deploy_user):
    deployment = Supervised(procs, public_dir)
    try:
        yield deployment
    finally:
        deployment.shutdown()


@pytest.mark.parametrize("mode", ["keepalive", "close"])
def test_rolling_restart_under_supervisord_loses_nothing(supervised, mode):
    first = supervised.workers
    with LoadClient(supervised.address, clients=8, mode=mode) as load:
        load.wait_started()
        outputs = []
        for _ in range(2):
            result = supervised.rolling_restart()
            assert result.returncode == 0, result.stdout + result.stderr
            outputs.append(result.stdout)
        report = load.stop()
    assert report["failed"] == 0, report["failures"]
    assert report["ok"] > 100, report

    after = {w["pid"] for w in supervised.status()["workers"] if w["state"] == "ready"}
    assert len(after) == 4 and not after & first, (first, after)
    for output in outputs:
        lines = output.splitlines()
        steps = [re.fullmatch(r"app:app_0\d: (\d+) → (\d+) ready in \d+\.\ds", line)
                 for line in lines[:-1]]
        assert all(steps) and len(steps) == 4, output
        assert re.fullmatch(r"rolling restart done: 4 processes replaced in \d+\.\ds",
                            lines[-1]), output
    # The second run replaced exactly what the first one started.
    second_old = {int(line.split()[1]) for line in outputs[1].splitlines()[:-1]}
    first_new = {int(line.split()[3]) for line in outputs[0].splitlines()[:-1]}
    assert second_old == first_new


def test_rolling_restart_of_one_group_and_clear_errors(supervised):
    result = supervised.rolling_restart("--group", "nope")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "fdctl: error: no supervisord process in group 'nope' is a worker registered "
        f"with fdserver at {supervised.socket}")
    result = supervised.rolling_restart("--group", "app")
    assert result.returncode == 0, result.stderr
    bad = run([script("fdctl"), "--socket", supervised.socket, "rolling-restart",
               "--supervisor", f"unix://{supervised.run_dir}/absent.sock"])
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith(f"fdctl: error: cannot reach supervisord at "
                                 f"unix://{supervised.run_dir}/absent.sock")


HANGING_APP = """
import os, time
import tornado.web

if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "hang")):
    time.sleep(3600)          # this generation never gets as far as ready

class Hello(tornado.web.RequestHandler):
    def get(self):
        self.write(f"Hello from {os.getpid()}\\n")

def make_app():
    return tornado.web.Application([("/", Hello)])
"""


def supervised_app(procs, public_dir, module: str, source: str) -> Supervised:
    """deploy/supervisord.conf with its app processes running *module* (written
    into *public_dir*, their working directory) instead of the example app."""
    (public_dir / f"{module}.py").write_text(source)
    config = (PROJECT / "deploy" / "supervisord.conf").read_text()
    config = config.replace("command=fdapp app:make_app", f"command=fdapp {module}:make_app")
    config = config.replace("directory=%(here)s/..", f"directory={public_dir}")
    (public_dir / "supervisord.conf").write_text(config)
    return Supervised(procs, public_dir, public_dir / "supervisord.conf")


def test_rolling_restart_stops_when_a_replacement_never_gets_ready(procs, public_dir,
                                                                  deploy_user):
    deployment = supervised_app(procs, public_dir, "hanging_app", HANGING_APP)
    try:
        before = {p["name"]: p["pid"] for p in deployment.rpc().getAllProcessInfo()}
        (public_dir / "hang").touch()
        result = deployment.rolling_restart("--ready-timeout", "2")
        assert result.returncode == 1, result.stdout
        new_pid = deployment.rpc().getProcessInfo("app:app_00")["pid"]
        lines = result.stderr.strip().splitlines()
        assert lines[0] == (
            f"fdctl: error: app:app_00: new pid {new_pid} did not report ready to fdserver "
            "within 2s (it is gone); stopped here, the remaining processes were not touched")
        # It hangs before it logs anything; the state it and the others are in:
        assert lines[1:] == [
            f"app:app_00 logged nothing since it was started ({public_dir}/app_00.log)",
            "now 3 of 4 processes are ready with fdserver (not replaced yet: app:app_01, "
            "app:app_02, app:app_03)",
            f"  app:app_00: supervisord RUNNING pid {new_pid}; fdserver: not registered"], lines
        after = {p["name"]: p["pid"] for p in deployment.rpc().getAllProcessInfo()}
        assert after["app_00"] != before["app_00"]
        assert all(after[n] == before[n] for n in ("app_01", "app_02", "app_03", "fdserver"))
    finally:
        deployment.shutdown()


BROKEN_APP = """
import os
import tornado.web

if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "broken")):
    raise RuntimeError("this deploy is broken")       # a bad deploy: fails at import

class Hello(tornado.web.RequestHandler):
    def get(self):
        self.write(f"Hello from {os.getpid()}\\n")

def make_app():
    return tornado.web.Application([("/", Hello)])
"""


def test_rolling_restart_says_why_a_replacement_failed_to_start(procs, public_dir,
                                                               deploy_user):
    deployment = supervised_app(procs, public_dir, "broken_app", BROKEN_APP)
    try:
        before = {p["name"]: p["pid"] for p in deployment.rpc().getAllProcessInfo()}
        (public_dir / "broken").touch()
        result = deployment.rolling_restart()
        assert result.returncode == 1 and result.stdout == "", result
        lines = result.stderr.strip().splitlines()
        assert lines[0] == (
            "fdctl: error: app:app_00: the new process failed to start (supervisord: "
            "SPAWN_ERROR); stopped here, the remaining processes were not touched"), lines
        # Why, from its log: the app's own exception.
        assert lines[1] == (f"app:app_00's last log lines since it was started "
                            f"({public_dir}/app_00.log):"), lines
        assert any(line.startswith("  ") and "RuntimeError: this deploy is broken" in line
                   for line in lines[2:-2]), lines
        # The state the group is left in.
        assert lines[-2] == ("now 3 of 4 processes are ready with fdserver (not replaced yet: "
                             "app:app_01, app:app_02, app:app_03)"), lines
        assert re.fullmatch(r"  app:app_00: supervisord (BACKOFF|STARTING|FATAL)\b.*; "
                            r"fdserver: not registered", lines[-1]), lines
        # The others were not touched, and serve.
        serving = {before[name] for name in ("app_01", "app_02", "app_03")}
        for _ in range(12):
            status, body = http_get(deployment.address)
            assert status == 200 and int(body.split()[-1]) in serving, body
    finally:
        deployment.shutdown()


@pytest.mark.parametrize("mode", ["keepalive", "close"])
def test_thirty_restarts_by_hand_lose_nothing(start_fdserver, start_fdapp, mode):
    server = start_fdserver()
    workers = [start_fdapp(server) for _ in range(4)]
    with LoadClient(server.address, clients=8, mode=mode) as load:
        load.wait_started()
        replace_by_hand(workers, lambda: start_fdapp(server), 30)
        report = load.stop()
    assert report["failed"] == 0, report["failures"]
    assert report["ok"] > 100, report
    served_by = {int(pid) for pid in report["pids"]}
    assert len(served_by) > 4, "load should have been served by the replacements too"


def test_max_requests_recycles_one_worker_at_a_time_losing_nothing(procs, public_dir,
                                                                   deploy_user):
    config = (PROJECT / "deploy" / "supervisord.conf").read_text()
    config = config.replace("command=fdapp app:make_app",
                            "command=fdapp app:make_app --max-requests 60 "
                            "--max-requests-jitter 20")
    config = config.replace("directory=%(here)s/..", f"directory={PROJECT}")
    (public_dir / "supervisord.conf").write_text(config)
    deployment = Supervised(procs, public_dir, public_dir / "supervisord.conf")
    log = public_dir / "fdserver.log"
    try:
        with LoadClient(deployment.address, clients=4, mode="keepalive") as keepalive, \
                LoadClient(deployment.address, clients=4, mode="close") as close:
            keepalive.wait_started()
            close.wait_started()
            wait_until(lambda: log.read_text().count("may recycle now") >= 6, timeout=120,
                       what="six recycles")
            reports = [keepalive.stop(), close.stop()]
        for report in reports:
            assert report["failed"] == 0, report["failures"]
        # One at a time: each turn is given only after the last one's worker is gone.
        events = re.findall(r"worker pid (\d+) (may recycle now|gone)", log.read_text())
        turns = [pid for pid, what in events if what == "may recycle now"]
        assert len(turns) == len(set(turns)) >= 6
        for previous, following in itertools.pairwise(turns):
            between = events[events.index((previous, "may recycle now")):
                             events.index((following, "may recycle now"))]
            assert (previous, "gone") in between, events
        exits = re.findall(r"exited: app_\d+ \(exit status (\d+)",
                           (public_dir / "supervisord.log").read_text())
        assert exits and set(exits) == {"0"}, exits
    finally:
        deployment.shutdown()
