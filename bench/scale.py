"""Performance at scale: balance and fdserver's CPU with many workers, dispatch's
fairness, uvloop, memory per worker, latency during a rolling restart.

    .venv/bin/python bench/scale.py [--rounds 3] [--workers 2,8,64,256] [--sections ...]

Needs wrk (``./dev bench`` installs it) and uvloop (the ``uvloop`` extra).
Sections (``--sections``, comma-separated; all by default):

* ``balance``: shared mode with 2, 8, 64 and 256 workers (``--workers``), one
  stack per count, kept over the rounds.  Each round: ``wrk -t 2 -c 256
  -d 2s`` keep-alive (the 256 connections open at once; workers / 64 s with
  more than 128 workers) and ``wrk -t 2 -c 64`` with a new connection per
  request for workers / 32 s (at least 3 s).
  Jain's index of the requests per worker (target >= 0.95) and fdserver's
  CPU during the new-connection load, as % of one core (target <= 2).
  Workers that do not fit in memory (~40 MB each, at most 60% of
  MemAvailable) are left out, and the table says so.
* ``dispatch``: ``fdserver --dispatch``, 8 workers, ``wrk -c 64 -d 2s``
  keep-alive, a fresh stack each round: Jain of requests (target >= 0.99), of
  the open connections midway, and of the CPU time each worker got.
* ``uvloop``: 2 workers, shared mode with ``fdapp --loop uvloop`` and with
  asyncio, against tornado's ``fork_processes(2)`` in the same round, ``wrk -t
  2 -c 32 -d 3s``.  Target: shared+uvloop keep-alive >= 1.15x fork.  The same
  stacks give the memory per worker after their loads: RSS, and USS (its
  private pages, Private_Clean + Private_Dirty of /proc/PID/smaps_rollup),
  against fork_processes' children, which share their parent's pages.
* ``restart``: fdserver and 4 workers, tests/loadclient.py with 8 clients,
  keep-alive and new connection: p99 latency during a rolling restart (each
  worker SIGTERMed, drained, replaced) against the p99 of 3 s of steady load
  on the same stack just before it.  Target: restart / steady <= 1.5.  Flat
  out (each client's request right after its last: the machine saturated),
  then on the same stack at half the rate it reached (``--rate``, an open
  load, latency counted from when each request was due).
* ``rebalance``: 2 and 4 workers, ``wrk -t 2 -c 32 -d 8s`` keep-alive, and
  after 1 s each worker in turn SIGTERMed, gone, then replaced and ready:
  Jain's index of the replacements' open connections 2 s after the restart
  (target >= 0.95), and of the requests they served (each from its start).
  Keep-alive clients stay where they are, so without fdserver's ``shed`` the
  last replacement got none (docs/modes.md).
* ``churn``: 64 workers, 200 graceful restarts in a row, one worker at a
  time (each SIGTERMed, gone, then replaced and ready), under keep-alive
  load from tests/loadclient.py; once, whatever --rounds.  Target: no failed
  request; fdserver's RSS and open descriptors before and after.

Verdicts as in bench/performance.py: met / NOT met only when the median's
confidence interval over the rounds clears the target; the balance and
dispatch rows also say in how many rounds the target held.  The default 3
rounds take about 9 minutes on 2 cores (most of it starting 256 workers and
the 200 restarts).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fdserver.ctl import Control  # noqa: E402

from loadgen import run_wrk, wrk_path  # noqa: E402
from performance import (  # noqa: E402
    jain,
    kilo,
    num,
    open_connections,
    ratio_table,
    rotate,
    spread,
    table,
    verdict,
    verdict_legend,
    wait_idle,
)
from rolling_restart import FdStack as RestartStack  # noqa: E402
from rolling_restart import LoadClient  # noqa: E402  (tests/loadclient.py)
from rolling_restart import measure as measure_restart  # noqa: E402
from stacks import STEP_TIMEOUT, FdStack, ForkedStack, cpu_ms  # noqa: E402
from support import PROJECT  # noqa: E402

SECTIONS = ("balance", "dispatch", "uvloop", "restart", "rebalance", "churn")
BURST = 256                  # keep-alive connections opened at once
NEW_CONNECTIONS = 64
START_TIMEOUT = 300.0        # 256 fdapps importing at once on 2 cores
MB_PER_WORKER = 40
BALANCE_TARGET = 0.95
CPU_TARGET = 2.0             # % of one core
DISPATCH_TARGET = 0.99
UVLOOP_TARGET = 1.15
RESTART_TARGET = 1.5
STEADY_SECONDS = 3.0
HALF = 0.5                   # the open load's rate, of what the same stack reached flat out
REBALANCE_WORKERS = (2, 4)
REBALANCE_CONNECTIONS = 32
REBALANCE_SECONDS = 8.0      # wrk's run: 1 s, the restart (1-2 s), then the rest
REBALANCE_AFTER = 2.0        # the open connections are counted this long after the restart
CHURN_WORKERS = 64
CHURN_RESTARTS = 200
# fdserver's watchdog in churn: starting the workers, then 3 s a restart
# (about 1 s each on 2 cores under load)
CHURN_WATCHDOG = 300.0
CHURN_SECONDS_PER_RESTART = 3.0


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def available_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, USS) of *pid* in kB, from /proc/PID/smaps_rollup."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[name] = int(rest.split()[0])
    return fields["Rss"], fields["Private_Clean"] + fields["Private_Dirty"]


def start_many(stack: FdStack) -> FdStack:
    """FdStack.start, with every fdapp spawned first and a deadline for all of them."""
    wanted, stack.workers_wanted = stack.workers_wanted, 0
    stack.start()
    starting = [stack.spawn() for _ in range(wanted)]
    deadline = time.monotonic() + START_TIMEOUT
    with Control(stack.socket) as control:
        for worker in starting:
            ok, state = control.wait(worker.pid, "ready", max(1.0, deadline - time.monotonic()))
            if not ok:
                raise RuntimeError(f"fdapp {worker.pid} is {state}, not ready")
    return stack


def wrk_load(stack, *, connections: int, duration: float, new_connection: bool,
             server_pid: int | None = None) -> dict:
    wait_idle(stack)
    sampled: dict[int, int] = {}
    sampler = threading.Timer(duration / 2, lambda: sampled.update(open_connections(stack)))
    before = cpu_ms(server_pid) if server_pid else 0.0
    began = time.perf_counter()
    sampler.start()
    try:
        result = run_wrk(stack.address, connections=connections, threads=2, duration=duration,
                         new_connection=new_connection)
    finally:
        sampler.cancel()
        sampler.join()
    wall_ms = (time.perf_counter() - began) * 1000
    per_worker = [result.per_pid.get(pid, 0) for pid in stack.worker_pids]
    return {"rps": result.rps, "per_worker": per_worker, "errors": result.error_count,
            "open": [sampled.get(pid, 0) for pid in stack.worker_pids] if sampled else None,
            "server_cpu_pct": (100 * (cpu_ms(server_pid) - before) / wall_ms
                               if server_pid else None)}


# -- sections ---------------------------------------------------------------

def balance(workdir: Path, counts: list[int], rounds: int, notes: list[str]) -> list[dict]:
    runs = []
    room = int(available_mb() * 0.6 // MB_PER_WORKER)
    for wanted in counts:
        n = min(wanted, room)
        if n < wanted:
            notes.append(f"balance: {wanted} workers do not fit in memory ({available_mb()} MB "
                         f"available, ~{MB_PER_WORKER} MB each): measured {n}")
        stack = FdStack(workdir, f"scale{n}", n)
        try:
            began = time.monotonic()
            start_many(stack)
            log(f"balance: {n} workers ready in {time.monotonic() - began:.0f}s")
            for r in range(rounds):
                for pattern in rotate(["keep-alive", "new conn"], r):
                    new = pattern == "new conn"
                    # Long enough for about as many requests per worker at any count.
                    got = wrk_load(stack, connections=NEW_CONNECTIONS if new else BURST,
                                   duration=max(3.0, n / 32) if new else max(2.0, n / 64),
                                   new_connection=new,
                                   server_pid=stack.server_pid)
                    runs.append({"section": "balance", "workers": n, "pattern": pattern,
                                 "round": r + 1, **got})
                    log(f"round {r + 1} balance {n:3} workers {pattern:10} "
                        f"{got['rps']:7.0f} req/s  jain {jain(got['per_worker']):.3f}  "
                        f"idle workers {got['per_worker'].count(0)}  fdserver "
                        f"{got['server_cpu_pct']:.1f}% CPU  errors {got['errors']}")
        finally:
            stack.close()
    return runs


def dispatch(workdir: Path, rounds: int) -> list[dict]:
    runs = []
    for r in range(rounds):
        stack = FdStack(workdir, "dispatch8", 8, ("--dispatch",))
        try:
            start_many(stack)
            before = [cpu_ms(pid) for pid in stack.worker_pids]
            got = wrk_load(stack, connections=64, duration=2.0, new_connection=False)
            got["cpu_ms"] = [cpu_ms(pid) - b for pid, b in zip(stack.worker_pids, before,
                                                                strict=True)]
        finally:
            stack.close()
        runs.append({"section": "dispatch", "round": r + 1, **got})
        log(f"round {r + 1} dispatch 8 workers keep-alive  jain {jain(got['per_worker']):.3f}"
            f"  open {got['open']}  CPU ms {[round(c) for c in got['cpu_ms']]}")
    return runs


def uvloop(workdir: Path, rounds: int) -> list[dict]:
    runs = []
    makers: dict[str, Callable] = {
        "fork": lambda: ForkedStack(2),
        "shared": lambda: FdStack(workdir, "asyncio2", 2),
        "shared+uvloop": lambda: FdStack(workdir, "uvloop2", 2, (), ("--loop", "uvloop"))}
    for r in range(rounds):
        for name in rotate(list(makers), r):
            stack = makers[name]()
            try:
                stack.start()
                for pattern in rotate(["keep-alive", "new conn"], r):
                    got = wrk_load(stack, connections=32, duration=3.0,
                                   new_connection=pattern == "new conn")
                    runs.append({"section": "uvloop", "stack": name, "pattern": pattern,
                                 "round": r + 1, **got})
                    log(f"round {r + 1} uvloop {name:13} {pattern:10} {got['rps']:7.0f} req/s")
                runs.append({"section": "memory", "stack": name, "round": r + 1,
                             "kb": [memory_kb(pid) for pid in stack.worker_pids]})
            finally:
                stack.close()
    return runs


def restart(workdir: Path, rounds: int) -> list[dict]:
    """Flat out, then on the same stack at half the rate it reached (an open
    load: tests/loadclient.py --rate), each a steady load then a restart."""
    runs = []
    for r in range(rounds):
        for mode in rotate(["keepalive", "close"], r):
            stack = RestartStack("restart", signal.SIGTERM, workdir)
            try:
                stack.start()
                rate = None
                for pattern in (mode, f"{mode} at half"):
                    with LoadClient(stack.address, clients=8, mode=mode, duration=60.0,
                                    timeout=5.0, workdir=workdir, rate=rate) as steady:
                        steady.wait_started()
                        time.sleep(STEADY_SECONDS)      # a load of fixed length, not a wait
                        calm = steady.stop()
                    during = measure_restart(stack, mode, 8, workdir, rate=rate)
                    runs.append({"section": "restart", "round": r + 1, "pattern": pattern,
                                 "steady_p99": calm["latency_ms"]["p99"],
                                 "restart_p99": during["latency_ms"]["p99"],
                                 "rate": calm["requests"] / calm["elapsed"],
                                 "failed": calm["failed"] + during["failed"]})
                    log(f"round {r + 1} restart {pattern:18} {runs[-1]['rate']:5.0f} req/s, "
                        f"p99 steady {calm['latency_ms']['p99']} ms, during restart "
                        f"{during['latency_ms']['p99']} ms, failed {during['failed']}")
                    rate = HALF * calm["requests"] / calm["elapsed"]
            finally:
                stack.close()
    return runs


def rebalance(workdir: Path, rounds: int) -> list[dict]:
    """Keep-alive load across a rolling restart: how the replacements share it."""
    runs = []
    for r in range(rounds):
        for n in REBALANCE_WORKERS:
            stack = FdStack(workdir, f"rebalance{n}", n)
            try:
                start_many(stack)
                old = list(stack.workers)
                got: dict = {}

                def load(address: str = stack.address, got: dict = got) -> None:
                    got["result"] = run_wrk(address, connections=REBALANCE_CONNECTIONS,
                                            threads=2, duration=REBALANCE_SECONDS)

                wrk = threading.Thread(target=load)
                wrk.start()
                try:
                    time.sleep(1.0)         # a load of fixed length, not a wait
                    began = time.monotonic()
                    roll(stack)
                    took = time.monotonic() - began
                    time.sleep(REBALANCE_AFTER)     # as above
                    held_now = open_connections(stack)
                finally:
                    wrk.join()
            finally:
                stack.close()
            result = got["result"]
            new = [w.pid for w in stack.workers if w not in old]
            per_new = [result.per_pid.get(pid, 0) for pid in new]
            open_new = [held_now.get(pid, 0) for pid in new]
            runs.append({"section": "rebalance", "round": r + 1, "workers": n,
                         "per_new": per_new, "open": open_new, "restart_seconds": took,
                         "errors": result.error_count})
            log(f"round {r + 1} rebalance {n} workers: open {open_new} {REBALANCE_AFTER:g} s "
                f"after the restart; replacements served {per_new}, restart {took:.1f}s, "
                f"errors {result.error_count}")
    return runs


def roll(stack: FdStack) -> None:
    """Every worker in turn replaced (replace_worker)."""
    with Control(stack.socket) as control:
        for i in range(len(stack.workers)):
            replace_worker(stack, control, i)


def replace_worker(stack: FdStack, control: Control, i: int) -> None:
    """stack.workers[i] SIGTERMed, gone, then replaced by a new fdapp, once that one is ready."""
    old = stack.workers[i]
    old.signal(signal.SIGTERM)
    code = old.wait(STEP_TIMEOUT)
    if code != 0:
        raise RuntimeError(f"fdapp {old.pid} exited {code} on SIGTERM")
    ok, state = control.wait(old.pid, "gone", STEP_TIMEOUT)
    if not ok:
        raise RuntimeError(f"fdapp {old.pid} is still {state} to fdserver")
    old.close()
    new = stack.spawn()
    stack.workers.remove(new)
    stack.workers[i] = new
    ok, state = control.wait(new.pid, "ready", STEP_TIMEOUT)
    if not ok:
        raise RuntimeError(f"fdapp {new.pid} is {state}, not ready")


def server_footprint(pid: int) -> tuple[int, int]:
    """fdserver's (RSS in kB, open descriptors)."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def churn(workdir: Path, workers: int = CHURN_WORKERS,
          restarts: int = CHURN_RESTARTS) -> list[dict]:
    """*restarts* graceful restarts in a row, one worker at a time, cycling
    through *workers* of them, under keep-alive load; once, not per round."""
    n = min(workers, int(available_mb() * 0.6 // MB_PER_WORKER))
    # fdserver lives through all the restarts (145 s to 185 s in all on 2
    # cores), longer than a stack's usual watchdog allows.
    stack = FdStack(workdir, "churn", n,
                    watchdog=CHURN_WATCHDOG + restarts * CHURN_SECONDS_PER_RESTART)
    try:
        start_many(stack)
        server = stack.server_pid
        with Control(stack.socket) as control:
            with LoadClient(stack.address, clients=8, mode="keepalive", duration=3600.0,
                            timeout=5.0, workdir=workdir) as load:
                load.wait_started()
                before = server_footprint(server)
                began = time.monotonic()
                for i in range(restarts):
                    replace_worker(stack, control, i % n)
                    if (i + 1) % 50 == 0:
                        log(f"churn: {i + 1} restarts, fdserver RSS and fds "
                            f"{server_footprint(server)}")
                seconds = time.monotonic() - began
                after = server_footprint(server)
                result = load.stop()
    finally:
        stack.close()
    log(f"churn: {restarts} restarts of {n} workers in {seconds:.0f}s, "
        f"{result['failed']} failed of {result['requests']}")
    return [{"section": "churn", "workers": n, "restarts": restarts, "seconds": seconds,
             "failed": result["failed"], "requests": result["requests"],
             "rss_kb": (before[0], after[0]), "fds": (before[1], after[1])}]


# -- tables -----------------------------------------------------------------

def held(values: list[float], target: float, above: bool = True) -> str:
    ok = sum((v >= target) if above else (v <= target) for v in values)
    return f"{ok} of {len(values)} rounds"


def inverted_verdict(values: list[float], target: float, fmt) -> str:
    """verdict() for a target to stay under."""
    word = verdict([-v for v in values], -target, lambda v: fmt(-v))
    name, _, rest = word.partition(" (CI ")
    low, _, high = rest.rstrip(")").partition("-")
    return f"{name} (CI {high}-{low})" if rest else word


def random_jain(per_worker: list[int]) -> float:
    """Jain's index expected if each request went to a worker at random (Poisson
    counts of mean m: m / (m + 1)): with few requests per worker, even a fair
    spread cannot come out near 1."""
    mean = sum(per_worker) / len(per_worker)
    return mean / (mean + 1)


def balance_table(runs: list[dict]) -> str:
    rows = [("workers", "pattern", "Jain of requests", "target", "", "held in",
             "if random", "idle workers", "fdserver % of a core", "target", "", "req/s")]
    for n in sorted({x["workers"] for x in runs}):
        for pattern in ("keep-alive", "new conn"):
            mine = [x for x in runs if x["workers"] == n and x["pattern"] == pattern]
            jains = [jain(x["per_worker"]) for x in mine]
            cpu = [x["server_cpu_pct"] for x in mine]
            new = pattern == "new conn"
            rows.append((str(n), pattern, spread(jains, num(3)), f">= {BALANCE_TARGET:g}",
                         verdict(jains, BALANCE_TARGET, num(3)), held(jains, BALANCE_TARGET),
                         spread([random_jain(x["per_worker"]) for x in mine], num(3)),
                         spread([x["per_worker"].count(0) for x in mine], num(0)),
                         spread(cpu, num(1)) if new else "",
                         f"<= {CPU_TARGET:g}" if new else "",
                         inverted_verdict(cpu, CPU_TARGET, num(1)) if new else "",
                         spread([x["rps"] for x in mine], kilo)))
    return table(rows)


def rebalance_table(runs: list[dict]) -> str:
    rows = [("workers", "Jain of open conns", "target", "", "held in", "open max-min",
             "Jain of requests", "their requests", "restart s", "errors")]
    for n in REBALANCE_WORKERS:
        mine = [x for x in runs if x["workers"] == n]
        jains = [jain(x["open"]) if any(x["open"]) else 0.0 for x in mine]
        rows.append((str(n), spread(jains, num(3)), f">= {BALANCE_TARGET:g}",
                     verdict(jains, BALANCE_TARGET, num(3)), held(jains, BALANCE_TARGET),
                     spread([max(x["open"]) - min(x["open"]) for x in mine], num(0)),
                     spread([jain(x["per_new"]) for x in mine], num(3)),
                     spread([sum(x["per_new"]) for x in mine], kilo),
                     spread([x["restart_seconds"] for x in mine], num(1)),
                     spread([x["errors"] for x in mine], num(0))))
    return table(rows)


def dispatch_table(runs: list[dict]) -> str:
    jains = [jain(x["per_worker"]) for x in runs]
    opens = [jain(x["open"]) for x in runs if x["open"] and any(x["open"])]
    spreads = [max(x["open"]) - min(x["open"]) for x in runs if x["open"]]
    # What the kernel gave each worker: equal CPU with unequal requests means
    # the requests per CPU-second differed, which placement cannot change.
    cpus = [jain(x["cpu_ms"]) for x in runs if x.get("cpu_ms")]
    return table([("Jain of requests", "target", "", "held in", "Jain of open conns",
                   "open conns max-min", "Jain of CPU time"),
                  (spread(jains, num(3)), f">= {DISPATCH_TARGET:g}",
                   verdict(jains, DISPATCH_TARGET, num(3)), held(jains, DISPATCH_TARGET),
                   spread(opens, num(3)), spread(spreads, num(0)), spread(cpus, num(3)))])


def uvloop_table(runs: list[dict]) -> str:
    return ratio_table(
        runs, "uvloop", ["keep-alive", "new conn"],
        {name: name for name in ("fork", "shared", "shared+uvloop")},
        lambda name, pattern: (UVLOOP_TARGET if (name, pattern) == ("shared+uvloop", "keep-alive")
                               else None))


def memory_table(runs: list[dict]) -> str:
    rows = [("stack", "RSS per worker, MB", "USS per worker, MB")]
    for name in ("fork", "shared", "shared+uvloop"):
        kb = [pair for x in runs if x["section"] == "memory" and x["stack"] == name
              for pair in x["kb"]]
        rows.append((name, spread([rss / 1024 for rss, _ in kb], num(1)),
                     spread([uss / 1024 for _, uss in kb], num(1))))
    return table(rows)


def restart_table(runs: list[dict]) -> str:
    rows = [("pattern", "req/s", "steady p99 ms", "restart p99 ms", "restart/steady", "target",
             "", "failed")]
    for mode, label in (("keepalive", "keep-alive"), ("close", "new conn"),
                        ("keepalive at half", "keep-alive, half rate"),
                        ("close at half", "new conn, half rate")):
        mine = [x for x in runs if x["pattern"] == mode]
        if not mine:
            continue
        ratios = [x["restart_p99"] / x["steady_p99"] for x in mine if x["steady_p99"]]
        rows.append((label, spread([x["rate"] for x in mine], kilo),
                     spread([x["steady_p99"] for x in mine], num(2)),
                     spread([x["restart_p99"] for x in mine], num(2)),
                     spread(ratios, num(2)), f"<= {RESTART_TARGET:g}",
                     inverted_verdict(ratios, RESTART_TARGET, num(2)),
                     str(sum(x["failed"] for x in mine))))
    return table(rows)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", default="2,8,64,256",
                   help="worker counts of the balance section (default %(default)s)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma-separated subset of %(default)s")
    args = p.parse_args(argv)
    sections = set(args.sections.split(","))
    if sections - set(SECTIONS) or args.rounds < 1:
        p.error(f"--sections: a subset of {','.join(SECTIONS)}; --rounds at least 1")
    counts = [int(n) for n in args.workers.split(",")]
    wrk_path()
    os.chdir(PROJECT)
    began = time.monotonic()
    notes: list[str] = []
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        workdir = Path(tmp)
        steps = {"balance": lambda: balance(workdir, counts, args.rounds, notes),
                 "dispatch": lambda: dispatch(workdir, args.rounds),
                 "uvloop": lambda: uvloop(workdir, args.rounds),
                 "restart": lambda: restart(workdir, args.rounds),
                 "rebalance": lambda: rebalance(workdir, args.rounds),
                 "churn": lambda: churn(workdir)}
        failed = []
        for name in SECTIONS:
            if name in sections:
                try:
                    runs[name] = steps[name]()
                except Exception as exc:        # noqa: BLE001 (the next section still runs)
                    failed.append(f"{name}: {type(exc).__name__}: {exc}")
                    log(f"section {name} FAILED: {type(exc).__name__}: {exc}")
    print(f"fdserver at scale; medians of {args.rounds} rounds (lowest-highest in brackets); "
          f"{os.cpu_count()} cores shared by wrk and the servers")
    for note in notes:
        print(f"note: {note}")
    if runs.get("balance"):
        print(f"\n1. Shared mode with many workers: keep-alive = wrk -t 2 -c {BURST} (the "
              f"connections open at once), new conn = wrk -t 2 -c {NEW_CONNECTIONS}")
        print(balance_table(runs["balance"]))
        print("if random: Jain's index expected if every request went to a worker at random, "
              "m / (m + 1) for m requests per worker:\nthe noise floor of few requests per worker "
              "(keep-alive lasts workers / 64 s, at least 2 s;\nnew conn workers / 32 s, at "
              "least 3 s).")
    if runs.get("dispatch"):
        print("\n2. Dispatch mode, 8 workers, wrk -t 2 -c 64 -d 2s keep-alive")
        print(dispatch_table(runs["dispatch"]))
    if runs.get("uvloop"):
        print("\n3. 2 workers, fdapp --loop uvloop against asyncio and fork_processes(2), "
              "wrk -t 2 -c 32 -d 3s")
        print(uvloop_table(runs["uvloop"]))
        print("\n4. Memory per worker after those loads (/proc/PID/smaps_rollup; USS = "
              "Private_Clean + Private_Dirty)")
        print(memory_table(runs["uvloop"]))
    if runs.get("restart"):
        print("\n5. p99 latency during a rolling restart of 4 workers against steady load "
              "(tests/loadclient.py, 8 clients): flat out, then at half the rate reached "
              "(--rate)")
        print(restart_table(runs["restart"]))
    if runs.get("rebalance"):
        print(f"\n6. Keep-alive load across a rolling restart: wrk -t 2 -c "
              f"{REBALANCE_CONNECTIONS} -d {REBALANCE_SECONDS:g}s, each worker restarted after "
              f"1 s; the replacements' open connections {REBALANCE_AFTER:g} s after the "
              f"restart, and the requests each served (from its start)")
        print(rebalance_table(runs["rebalance"]))
    if runs.get("churn"):
        got = runs["churn"][0]
        print(f"\n7. {got['restarts']} graceful restarts in a row, one worker at a time, of "
              f"{got['workers']} workers (each one {got['restarts'] / got['workers']:.1f} "
              f"times), under keep-alive load (tests/loadclient.py, 8 clients)")
        print(table([
            ("restarts", "seconds", "requests", "failed", "target", "fdserver RSS MB",
             "fdserver fds"),
            (str(got["restarts"]), f"{got['seconds']:.0f}", str(got["requests"]),
             str(got["failed"]), "0", f"{got['rss_kb'][0] / 1024:.1f} -> "
             f"{got['rss_kb'][1] / 1024:.1f}", f"{got['fds'][0]} -> {got['fds'][1]}")]))
    print(verdict_legend(args.rounds))
    for line in failed:
        print(f"FAILED: {line}")
    print(f"\n({time.monotonic() - began:.0f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
