"""What clients see through HAProxy when a host is lost abruptly.

Three hosts (127.0.0.2-4), each supervisord + fdserver (--agent,
--proxy-protocol) + 4 app processes, behind HAProxy running
deploy/haproxy/haproxy.cfg with its shipped intervals (check inter 2s,
fall 3, agent-inter 1s, retry-on conn-failure, redispatch).  Under
keep-alive and new-connection load, host2's supervisord, fdserver and app
processes are all SIGKILLed at once.  Prints, per run, the failed requests
each load saw (by kind), the window between the first and the last failure,
how long HAProxy took to mark the host DOWN, and HAProxy's own counters.

    .venv/bin/python bench/host_loss.py --runs 3

Needs root (the deployment switches users) and haproxy (./dev test installs
it), so ./dev bench does not run it.  A measurement, not a test: nothing is
asserted; docs/fleet.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from loadclient import LoadClient  # noqa: E402
from support import Proc, wait_until  # noqa: E402
from test_haproxy import HOSTS, HAProxy, Host, free_ports, state  # noqa: E402


class Starter:
    def __init__(self) -> None:
        self.started: list[Proc] = []

    def start(self, argv, cls=Proc, **kwargs) -> Proc:
        proc = cls(argv, watchdog=600, **kwargs)
        self.started.append(proc)
        return proc


def descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        for child in map(int, text):
            children += [child, *descendants(child)]
    return children


def one_run(seconds_after: float) -> dict:
    procs = Starter()
    dirs = [Path(tempfile.mkdtemp(prefix="hostloss-", dir="/tmp")) for _ in HOSTS]
    for folder in dirs:
        os.chmod(folder, 0o755)
    try:
        port, agent_port, frontend_port = free_ports((*HOSTS, "127.0.0.1"), 3)
        hosts = [Host(procs, folder, address, port, agent_port).start()
                 for folder, address in zip(dirs, HOSTS, strict=True)]
        for host in hosts:
            host.wait_ready()
        haproxy = HAProxy(procs, dirs[0], f"127.0.0.1:{frontend_port}", port, agent_port,
                          fast=False)
        names = ["host1", "host2", "host3"]
        wait_until(lambda: all(state(haproxy, n) == ("UP", 100) for n in names), timeout=30,
                   what="hosts UP")
        with LoadClient(haproxy.frontend, clients=6, mode="keepalive") as keepalive, \
                LoadClient(haproxy.frontend, clients=2, mode="close") as fresh:
            keepalive.wait_started()
            fresh.wait_started()
            time.sleep(2.0)                  # a measurement: steady load first
            victim = hosts[1]
            assert victim.proc is not None
            pids = [victim.proc.pid, *descendants(victim.proc.pid)]
            killed_at = time.monotonic()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda: state(haproxy, "host2")[0].startswith("DOWN"), timeout=30,
                       what="host2 DOWN")
            down_after = time.monotonic() - killed_at
            time.sleep(seconds_after)
            ka, fr = keepalive.stop(), fresh.stop()
        stats = haproxy.stats()
        counters = {c: int(stats["host2"][c] or 0) for c in
                    ("econ", "eresp", "wretr", "wredis", "srv_abrt", "hrsp_5xx")}
        counters["frontend_5xx"] = int(stats["FRONTEND"]["hrsp_5xx"] or 0)
        return {"processes_killed": len(pids), "down_after_s": round(down_after, 2),
                "keepalive": summary(ka, killed_at, keepalive),
                "close": summary(fr, killed_at, fresh), "haproxy_host2": counters}
    finally:
        for proc in reversed(procs.started):
            proc.close()
        for folder in dirs:
            shutil.rmtree(folder, ignore_errors=True)


def summary(report: dict, killed_at: float, load: LoadClient) -> dict:
    return {"requests": report["requests"], "failed": report["failed"],
            "kinds": {k: v["count"] for k, v in report["failures"].items()},
            "failure_window_s": (round(report["failure_window"][1]
                                       - report["failure_window"][0], 3)
                                 if report["failure_window"] else None),
            "examples": [e for v in report["failures"].values() for e in v["examples"][:2]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--after", type=float, default=8.0,
                        help="seconds of load after HAProxy marked the host DOWN")
    args = parser.parse_args()
    results = [one_run(args.after) for _ in range(args.runs)]
    for n, result in enumerate(results, 1):
        print(f"run {n}: {json.dumps(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
