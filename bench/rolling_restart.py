"""Failed requests and p99 latency during a rolling restart of 4 workers, three ways.

    .venv/bin/pip install gunicorn     # for this bench only, not a project dependency
    .venv/bin/python bench/rolling_restart.py [--rounds 5] [--clients 8] [--json-out PATH]

Stacks, each serving app.HelloHandler on 127.0.0.1 (port chosen by the kernel):

* ours:     fdserver + 4 fdapp; each worker in turn gets SIGTERM (graceful
            drain), is waited on until it exits, then a new fdapp is started
            and waited on until fdserver reports it ``ready``.
* naive:    the same processes, but each worker is SIGKILLed (no drain) before
            its replacement starts: what the original fdserver gist did.
* gunicorn: ``gunicorn -k tornado -w 4`` (bench/gunicorn_hello.py), reloaded
            with SIGHUP on the master; done once all 4 worker pids changed.

For each round (stack order rotates each round) and each load mode
(tests/loadclient.py, keep-alive and close), the load runs from its first
successful request until the restart is complete.  The table gives medians
over the rounds.  The default 5 rounds take about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "tests"))

from fdserver.ctl import Control  # noqa: E402

from loadclient import LoadClient  # noqa: E402
from support import Proc, script  # noqa: E402

WORKERS = 4
STEP_TIMEOUT = 20.0       # deadline for any one start, exit or state change
PROC_WATCHDOG = 240.0     # a child left behind by a crash dies by itself
MODES = ("keepalive", "close")


def wait_state(socket_path: str, pid: int, state: str) -> None:
    with Control(socket_path) as control:
        ok, now = control.wait(pid, state, STEP_TIMEOUT)
    if not ok:
        raise RuntimeError(f"fdapp pid {pid} is {now}, not {state}, after {STEP_TIMEOUT:g}s")


class FdStack:
    """fdserver + WORKERS fdapps; a restart stops each worker with *signum*."""

    def __init__(self, name: str, signum: signal.Signals, workdir: Path) -> None:
        self.name, self.signum = name, signum
        self.socket = str(workdir / f"{name}.sock")
        self.server: Proc | None = None
        self.workers: list[Proc] = []
        self.retired: list[Proc] = []
        self.address = ""

    def start(self) -> None:
        self.server = Proc([script("fdserver"), "--bind", "127.0.0.1:0", "--socket", self.socket],
                           watchdog=PROC_WATCHDOG)
        match = self.server.wait_for_line(r"serving http on ([^\s;]+)", STEP_TIMEOUT)
        self.address = match.group(1)
        starting = [self._spawn() for _ in range(WORKERS)]
        for worker in starting:
            wait_state(self.socket, worker.pid, "ready")
        self.workers = starting

    def _spawn(self) -> Proc:
        return Proc([script("fdapp"), "app:make_app", "--socket", self.socket],
                    watchdog=PROC_WATCHDOG)

    def restart(self) -> None:
        for i, old in enumerate(list(self.workers)):
            old.signal(self.signum)
            code = old.wait(STEP_TIMEOUT)
            if self.signum == signal.SIGTERM and code != 0:
                raise RuntimeError(f"fdapp {old.pid} exited {code} on SIGTERM:\n{old.output}")
            self.retired.append(old)
            new = self._spawn()
            self.workers[i] = new
            wait_state(self.socket, new.pid, "ready")

    def close(self) -> None:
        for proc in self.workers + self.retired + [self.server]:
            if proc is not None:
                proc.close()


class GunicornStack:
    """gunicorn's tornado worker; a restart is SIGHUP on the master."""

    name = "gunicorn"

    def __init__(self, workdir: Path) -> None:
        self.master: Proc | None = None
        self.address = ""

    def start(self) -> None:
        argv = [script("gunicorn"), "-k", "tornado", "-w", str(WORKERS), "-b", "127.0.0.1:0",
                "--no-control-socket", "bench.gunicorn_hello:app"]
        # Own process group, so that close() can kill the workers with the master.
        self.master = Proc(argv, watchdog=PROC_WATCHDOG, process_group=0)
        match = self.master.wait_for_line(r"Listening at: http://(\S+) ", STEP_TIMEOUT)
        self.address = match.group(1)
        self._wait_workers(set())

    def restart(self) -> None:
        old = self._children()
        self.master.signal(signal.SIGHUP)
        self._wait_workers(old)

    def _wait_workers(self, old: set[int]) -> None:
        """Until WORKERS children are alive and none is in *old*."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            children = self._children()
            if len(children) == WORKERS and not children & old:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn workers {sorted(children)} (old {sorted(old)}) "
                                   f"after {STEP_TIMEOUT:g}s:\n{self.master.output}")
            time.sleep(0.02)

    def _children(self) -> set[int]:
        if self.master.popen.poll() is not None:
            raise RuntimeError(f"gunicorn master exited:\n{self.master.output}")
        children = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                # "pid (comm) state ppid ...": comm may hold spaces, so split after ")".
                ppid = int(stat.read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue          # exited meanwhile
            if ppid == self.master.pid:
                children.add(int(stat.parent.name))
        return children

    def close(self) -> None:
        if self.master is None:
            return
        try:
            os.killpg(self.master.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.master.close()


def measure(stack, mode: str, clients: int, workdir: Path, rate: float | None = None) -> dict:
    """Load *stack* in *mode* (at *rate* requests a second, if given) from the
    first good request until its restart is done."""
    load = LoadClient(stack.address, clients=clients, mode=mode, duration=120.0,
                      timeout=5.0, workdir=workdir, rate=rate)
    try:
        load.start()
        load.wait_started()
        began = time.monotonic()
        stack.restart()
        restart_seconds = time.monotonic() - began
        result = load.stop()
    finally:
        load.close()
    result["restart_seconds"] = round(restart_seconds, 3)
    return result


def run_rounds(names: list[str], rounds: int, clients: int, workdir: Path,
               log=print) -> list[dict]:
    makers = {"ours": lambda: FdStack("ours", signal.SIGTERM, workdir),
              "naive": lambda: FdStack("naive", signal.SIGKILL, workdir),
              "gunicorn": lambda: GunicornStack(workdir)}
    runs = []
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        modes = MODES if r % 2 == 0 else MODES[::-1]
        for name in order:
            stack = makers[name]()
            try:
                stack.start()
                for mode in modes:
                    result = measure(stack, mode, clients, workdir)
                    runs.append({"round": r + 1, "stack": name, **result})
                    lat = result["latency_ms"]
                    log(f"round {r + 1} {name:8} {mode:9} {result['requests']:6} requests "
                        f"{result['failed']:4} failed  p99 {lat['p99']} ms  max {lat['max']} ms  "
                        f"restart {result['restart_seconds']:.2f}s")
            finally:
                stack.close()
    return runs


def _ratio(value: float, ours: float) -> str:
    if ours == 0:
        return "-" if value == 0 else "inf"
    return f"{value / ours:.1f}x"


def table(runs: list[dict], names: list[str]) -> str:
    header = ("mode", "stack", "failed/worker", "failed", "p99 ms", "requests", "restart s",
              "failed vs ours", "p99 vs ours")
    rows = [header]
    for mode in MODES:
        medians = {}
        for name in names:
            mine = [r for r in runs if r["stack"] == name and r["mode"] == mode]
            if mine:
                medians[name] = {
                    "failed": statistics.median(r["failed"] for r in mine),
                    "p99": statistics.median(r["latency_ms"]["p99"] for r in mine),
                    "requests": statistics.median(r["requests"] for r in mine),
                    "restart": statistics.median(r["restart_seconds"] for r in mine),
                }
        ours = medians.get("ours")
        for name, m in medians.items():
            rows.append((mode, name, f"{m['failed'] / WORKERS:g}", f"{m['failed']:g}",
                         f"{m['p99']:.2f}", f"{m['requests']:g}", f"{m['restart']:.2f}",
                         _ratio(m["failed"], ours["failed"]) if ours else "?",
                         _ratio(m["p99"], ours["p99"]) if ours else "?"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()
                     for row in rows)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM unwinds as Ctrl-C does, so every stack started is closed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--stacks", default="ours,naive,gunicorn",
                   help="comma-separated subset of ours,naive,gunicorn")
    p.add_argument("--json-out", metavar="PATH", help="also write every run's result here")
    args = p.parse_args(argv)
    names = args.stacks.split(",")
    unknown = set(names) - {"ours", "naive", "gunicorn"}
    if unknown or not names:
        p.error(f"unknown stacks {sorted(unknown)}")
    if "gunicorn" in names and not os.path.exists(script("gunicorn")):
        p.error(f"no {script('gunicorn')}: install it for this bench with "
                f"`{Path(sys.executable).parent}/pip install gunicorn`, "
                "or leave it out with --stacks ours,naive")
    os.chdir(PROJECT)

    with tempfile.TemporaryDirectory(prefix="rr-") as tmp:
        runs = run_rounds(names, args.rounds, args.clients, Path(tmp),
                          log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"rolling restart of {WORKERS} workers under {args.clients} clients; "
          f"medians of {args.rounds} rounds")
    print(table(runs, names))
    for run in runs:
        if run["stack"] == "ours" and run["failed"]:
            print(f"\nours, round {run['round']}, {run['mode']}: "
                  f"{json.dumps(run['failures'], indent=1)}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
