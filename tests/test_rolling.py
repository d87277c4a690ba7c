"""Zero failed requests while workers are replaced, counted under real load."""

from __future__ import annotations

import json
import os
import re
import signal
import xmlrpc.client

import pytest

from loadclient import LoadClient
from support import BIN, PROJECT, Proc, replace_by_hand, run, script, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="deploy/supervisord.conf switches users: needs root")


class Supervised:
    """supervisord -c deploy/supervisord.conf, as docs/deployment.md runs it."""

    def __init__(self, procs, run_dir, config=PROJECT / "deploy" / "supervisord.conf"):
        self.run_dir = run_dir
        self.socket = str(run_dir / "fdserver.sock")
        self.url = f"unix://{run_dir}/supervisor.sock"
        env = dict(os.environ, FDSERVER_BIND="127.0.0.1:0", FDSERVER_RUN_DIR=str(run_dir),
                   PATH=f"{BIN}:{os.environ['PATH']}")
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


def test_rolling_restart_stops_when_a_replacement_never_gets_ready(procs, public_dir,
                                                                  deploy_user):
    (public_dir / "hanging_app.py").write_text(HANGING_APP)
    config = (PROJECT / "deploy" / "supervisord.conf").read_text()
    config = config.replace("command=fdapp app:make_app", "command=fdapp hanging_app:make_app")
    config = config.replace("directory=%(here)s/..", f"directory={public_dir}")
    (public_dir / "supervisord.conf").write_text(config)
    deployment = Supervised(procs, public_dir, public_dir / "supervisord.conf")
    try:
        before = {p["name"]: p["pid"] for p in deployment.rpc().getAllProcessInfo()}
        (public_dir / "hang").touch()
        result = deployment.rolling_restart("--ready-timeout", "2")
        assert result.returncode == 1, result.stdout
        new_pid = deployment.rpc().getProcessInfo("app:app_00")["pid"]
        assert result.stderr.strip() == (
            f"fdctl: error: app:app_00: new pid {new_pid} did not report ready to fdserver "
            "within 2s (it is gone); stopped here, the remaining processes were not touched")
        after = {p["name"]: p["pid"] for p in deployment.rpc().getAllProcessInfo()}
        assert after["app_00"] != before["app_00"]
        assert all(after[n] == before[n] for n in ("app_01", "app_02", "app_03", "fdserver"))
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
