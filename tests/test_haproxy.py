"""Real HAProxy in front of three fdserver hosts (127.0.0.2-4), under load.

The HAProxy config is deploy/haproxy/haproxy.cfg itself, with the test's
addresses, ports and short intervals; each host is deploy/supervisord.conf
with fdserver's --agent and --proxy-protocol, 4 app processes.  Every check
reads HAProxy's own stats socket; every wait is on an event (wait_until on
what the stats socket or fdserver says).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import xmlrpc.client
from pathlib import Path

import pytest

from loadclient import LoadClient
from support import BIN, PROJECT, Proc, run, script, wait_until

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="deploy/supervisord.conf switches users: needs root"),
    pytest.mark.skipif(shutil.which("haproxy") is None,
                       reason="needs haproxy (Debian package haproxy; ./dev installs it)"),
]

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
# HAProxy's own error and retry counters, per server: all must stay zero.
COUNTERS = ("econ", "eresp", "wretr", "wredis", "hrsp_5xx", "cli_abrt", "srv_abrt")
FRONTEND_COUNTERS = ("ereq", "hrsp_5xx")


def free_ports(hosts: tuple[str, ...], count: int) -> list[int]:
    """*count* ports, each free on every one of *hosts*."""
    ports: list[int] = []
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        try:
            for host in hosts:
                with socket.socket() as probe:
                    probe.bind((host, port))
        except OSError:
            continue
        if port not in ports:
            ports.append(port)
        if len(ports) == count:
            return ports
    raise AssertionError("no free ports")


class Host:
    """One host: supervisord with fdserver (agent, PROXY listener) and 4 apps."""

    def __init__(self, procs, run_dir: Path, address: str, port: int, agent_port: int):
        self.procs, self.run_dir, self.address = procs, run_dir, address
        self.socket = str(run_dir / "fdserver.sock")
        self.url = f"unix://{run_dir}/supervisor.sock"
        config = (PROJECT / "deploy" / "supervisord.conf").read_text()
        config = config.replace(
            "command=fdserver --bind %(ENV_FDSERVER_BIND)s",
            f"command=fdserver --bind http=%(ENV_FDSERVER_BIND)s --proxy-protocol http "
            f"--agent {address}:{agent_port} --agent-linger 0.5")
        assert "--agent" in config
        config = config.replace("directory=%(here)s/..", f"directory={PROJECT}")
        # A drain need not wait long here: the load's requests are short.
        config = config.replace("--graceful-timeout 30", "--graceful-timeout 10")
        (run_dir / "supervisord.conf").write_text(config)
        self.env = dict(os.environ, FDSERVER_BIND=f"{address}:{port}",
                        FDSERVER_RUN_DIR=str(run_dir), PATH=f"{BIN}:{os.environ['PATH']}")
        self.proc: Proc | None = None

    def start(self) -> Host:
        self.proc = self.procs.start([script("supervisord"), "-n", "-c",
                                      str(self.run_dir / "supervisord.conf")], env=self.env)
        return self

    def wait_ready(self) -> None:
        wait_until(lambda: len(self.ready()) == 4, timeout=60,
                   what=f"4 ready workers on {self.address}")

    def status(self) -> dict:
        result = run([script("fdctl"), "--socket", self.socket, "status", "--json"])
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def ready(self) -> set[int]:
        # Until the new fdserver serves, the socket file may be the old one's.
        result = run([script("fdctl"), "--socket", self.socket, "status", "--json"])
        if result.returncode != 0:
            return set()
        return {w["pid"] for w in json.loads(result.stdout)["workers"] if w["state"] == "ready"}

    def rpc(self):
        from supervisor.xmlrpc import SupervisorTransport
        transport = SupervisorTransport(None, None, self.url)
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport).supervisor

    def fdctl(self, *args: str, timeout: float = 120) -> str:
        result = run([script("fdctl"), "--socket", self.socket, *args], timeout=timeout)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def stop(self) -> None:
        """Stop the whole host: supervisord stops fdserver and the apps, then exits."""
        assert self.proc is not None
        pids = [p["pid"] for p in self.rpc().getAllProcessInfo() if p["pid"]]
        self.proc.signal(signal.SIGTERM)
        try:
            assert self.proc.wait(timeout=60) == 0, self.proc.output
        finally:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


class HAProxy:
    def __init__(self, procs, workdir: Path, frontend: str, port: int, agent_port: int,
                 fast: bool = True):
        self.stats_socket = str(workdir / "haproxy.sock")
        self.frontend = frontend
        config = (PROJECT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
        config = haproxy_test_config(config, self.stats_socket, frontend, port, agent_port,
                                     fast)
        path = workdir / "haproxy.cfg"
        path.write_text(config)
        check = run(["haproxy", "-c", "-f", str(path)])
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = procs.start(["haproxy", "-db", "-f", str(path)])
        wait_until(lambda: os.path.exists(self.stats_socket), what="haproxy's stats socket")

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(self.stats_socket)
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` of backend fdserver and frontend www: svname -> fields."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row for row in rows if row["pxname"] in ("fdserver", "www")}

    def server(self, name: str) -> dict[str, str]:
        return self.stats()[name]


def haproxy_test_config(config: str, stats_socket: str, frontend: str, port: int,
                        agent_port: int, fast: bool = True) -> str:
    """The shipped config with the test's sockets, three loopback hosts and
    short intervals (the test waits on them); every other line as shipped."""
    def sub(pattern: str, replacement: str, text: str) -> str:
        new, n = re.subn(pattern, replacement, text, flags=re.M)
        assert n, f"deploy/haproxy/haproxy.cfg has no {pattern!r} any more"
        return new
    config = sub(r"^    stats socket \S+", f"    stats socket {stats_socket}", config)
    config = sub(r"^    log /dev/log local0\n", "", config)
    config = sub(r"^    (user|group) haproxy\n", "", config)
    config = sub(r"^    daemon\n", "", config)
    config = sub(r"^    bind :80$", f"    bind {frontend}", config)
    if fast:
        config = sub(r" inter 2s ", " inter 300ms ", config)
        config = sub(r" agent-inter 1s ", " agent-inter 100ms ", config)
        config = sub(r" slowstart 5s", " slowstart 300ms", config)
    config = sub(r" agent-port 8081 ", f" agent-port {agent_port} ", config)
    config = sub(r"^    server host.*\n", "", config)
    servers = "".join(f"    server host{i} {host}:{port}\n" for i, host in enumerate(HOSTS, 1))
    return config.rstrip("\n") + "\n" + servers


@pytest.fixture
def fleet(procs):
    dirs = [Path(tempfile.mkdtemp(prefix="fleet-", dir="/tmp")) for _ in HOSTS]
    for folder in dirs:
        os.chmod(folder, 0o755)
    port, agent_port, frontend_port = free_ports((*HOSTS, "127.0.0.1"), 3)
    hosts = [Host(procs, folder, address, port, agent_port)
             for folder, address in zip(dirs, HOSTS, strict=True)]
    try:
        for host in hosts:
            host.start()
        for host in hosts:
            host.wait_ready()
        haproxy = HAProxy(procs, dirs[0], f"127.0.0.1:{frontend_port}", port, agent_port)
        yield hosts, haproxy
    finally:
        for host in hosts:
            if host.proc and host.proc.popen.poll() is None:
                try:
                    host.stop()
                except Exception:
                    host.proc.kill()
        for folder in dirs:
            shutil.rmtree(folder, ignore_errors=True)


def state(haproxy: HAProxy, name: str) -> tuple[str, int]:
    row = haproxy.server(name)
    return row["status"], int(row["weight"] or 0)


def served(haproxy: HAProxy, name: str) -> int:
    row = haproxy.server(name)
    return sum(int(row[f"hrsp_{kind}"] or 0) for kind in ("1xx", "2xx", "3xx", "4xx", "5xx",
                                                           "other"))


def test_weights_drain_stop_start_and_rolls_behind_haproxy_lose_nothing(fleet):
    """The client's address reaches the app (PROXY v2); weights follow ready
    workers; a drained host gets no new request, survives a stop and start
    drained, takes traffic once undrained; every host rolled; zero failed
    requests, and HAProxy retried nothing and counted no error."""
    hosts, haproxy = fleet
    names = [f"host{i}" for i in range(1, 4)]
    wait_until(lambda: all(state(haproxy, n) == ("UP", 100) for n in names), timeout=20,
               what="three hosts UP at weight 100")
    check_the_clients_address_reaches_the_app(haproxy)
    frontend = haproxy.frontend
    with LoadClient(frontend, clients=6, mode="keepalive") as keepalive, \
            LoadClient(frontend, clients=2, mode="close") as fresh:
        keepalive.wait_started()
        fresh.wait_started()
        wait_until(lambda: all(served(haproxy, n) > 20 for n in names),
                   what="every host serving")

        # Weights follow ready workers: 2 of 4 stopped -> 50%, replaced -> 100%.
        first = hosts[0]
        rpc = first.rpc()
        for name in ("app:app_00", "app:app_01"):
            rpc.stopProcess(name)
        wait_until(lambda: state(haproxy, "host1") == ("UP", 50), what="host1 at 50%")
        for name in ("app:app_00", "app:app_01"):
            rpc.startProcess(name)
        wait_until(lambda: state(haproxy, "host1") == ("UP", 100), what="host1 back at 100%")

        # Drain host2: HAProxy shows DRAIN, and it gets no new request.
        second = hosts[1]
        said = second.fdctl("drain", "--wait", "10")
        assert said.strip() == "drained; told 127.0.0.1", said
        assert state(haproxy, "host2")[0].startswith("DRAIN")
        assert second.status()["server"]["drained"] is True
        wait_until(lambda: haproxy.server("host2")["scur"] == "0", what="host2 idle")
        before = served(haproxy, "host2")
        others = sum(served(haproxy, n) for n in ("host1", "host3"))
        wait_until(lambda: sum(served(haproxy, n) for n in ("host1", "host3")) > others + 300,
                   timeout=30, what="300 more requests to the other hosts")
        assert served(haproxy, "host2") == before

        # Stop host2 entirely, start it again: still drained until undrain.
        second.stop()
        wait_until(lambda: state(haproxy, "host2")[0].startswith("DOWN"), what="host2 down")
        second.start()
        second.wait_ready()
        wait_until(lambda: state(haproxy, "host2")[0].startswith("DRAIN"),
                   what="host2 up, drained")
        assert served(haproxy, "host2") == before
        second.fdctl("undrain")
        wait_until(lambda: state(haproxy, "host2") == ("UP", 100), what="host2 back in rotation")
        wait_until(lambda: served(haproxy, "host2") > before + 50, what="host2 serving again")

        # Every host rolled, all three at once.
        failures: list[str] = []

        def roll(host: Host) -> None:
            result = run([script("fdctl"), "--socket", host.socket, "rolling-restart",
                          "--supervisor", host.url], timeout=120)
            if result.returncode != 0:
                failures.append(result.stdout + result.stderr)
        rolls = [threading.Thread(target=roll, args=(host,)) for host in hosts]
        for thread in rolls:
            thread.start()
        for thread in rolls:
            thread.join(130)
        assert not failures, failures
        wait_until(lambda: all(state(haproxy, n) == ("UP", 100) for n in names),
                   what="three hosts UP at 100% after the rolls")
        counts = {n: served(haproxy, n) for n in names}
        wait_until(lambda: all(served(haproxy, n) > counts[n] + 20 for n in names),
                   what="every rolled host serving")
        ka, fr = keepalive.stop(), fresh.stop()

    assert ka["failed"] == 0, ka["failures"]
    assert fr["failed"] == 0, fr["failures"]
    assert ka["ok"] > 1000 and fr["ok"] > 100, (ka["ok"], fr["ok"])
    stats = haproxy.stats()
    for name in names:
        assert {c: stats[name][c] for c in COUNTERS} == dict.fromkeys(COUNTERS, "0"), name
    assert {c: stats["FRONTEND"][c] for c in FRONTEND_COUNTERS} == \
        dict.fromkeys(FRONTEND_COUNTERS, "0")
    assert stats["BACKEND"]["econ"] == "0" and stats["BACKEND"]["wretr"] == "0"


def check_the_clients_address_reaches_the_app(haproxy: HAProxy) -> None:
    host, port = haproxy.frontend.rsplit(":", 1)
    for client in ("127.0.0.9", "127.0.0.23"):
        with socket.socket() as sock:
            sock.settimeout(10)
            sock.bind((client, 0))
            sock.connect((host, int(port)))
            # A forged X-Forwarded-For changes nothing: HAProxy drops it,
            # and the PROXY header carries the address.
            sock.sendall(b"GET /ip HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\n"
                         b"X-Real-Ip: 6.6.6.7\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert answer.split(b"\r\n\r\n", 1)[1] == f"{client} http\n".encode(), answer
