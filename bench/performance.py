"""Throughput, fdserver's CPU, fairness and start-up, against tornado's fork_processes.

    .venv/bin/python bench/performance.py [--rounds 5] [--json-out PATH] [--plot PATH]

Needs wrk (Debian package ``wrk``; ``./dev bench`` installs it).  Every server
binds 127.0.0.1 port 0; wrk runs bench/count_pids.lua, which counts the
responses of each worker from the body ``Hello from <pid>``.  Two load
patterns: ``keep-alive`` (each wrk connection is reused) and ``new conn``
(every request says ``Connection: close``, so wrk reconnects per request),
both with wrk's default 2 threads.  Section 1 adds ``keep-alive -t 1``: one
wrk thread opens its connections one after another, the case where one
process of a shared socket can grab them all.

One table per section.  Each figure is the median over --rounds rounds with
the lowest and highest round beside it: the machine has 2 cores that wrk
shares with the servers, so single runs swing widely (a run with 2 workers can
come out at half the rate of the next, depending on which worker took the
connections).  Every round starts each stack afresh; the order of the stacks
and of the patterns rotates from round to round.  Every server runs in the
bench's own session: Linux's autogroup scheduling shares the CPU evenly
between sessions, so a stack in a session of its own would get as much CPU as
wrk and everything else together.

1. Throughput with 2 workers, ``wrk -t 2 -c 32 -d 3s`` (and ``-t 1`` for
   ``keep-alive -t 1``): fdserver's shared mode and dispatch mode, each divided
   by tornado's ``fork_processes(2)`` (bench/forked_app.py) measured in the
   same round.  Targets: shared >= 1.0, dispatch >= 0.8.
2. fdserver's own CPU time (utime+stime of its process, /proc/PID/stat)
   during the loads of section 1, in ms and as a share of one core over the
   run.  Target in shared mode: ~0 (fdserver is not in the data path).
3. Fairness over 8 workers, ``wrk -t 2 -c 64 -d 2s`` (the 64 keep-alive
   connections open at once): Jain's index (sum x)^2 / (n * sum x^2) of the
   requests per worker (1 = even, 1/n = one worker took all) and max/min, for
   the naive shared socket (``fdapp --no-balance``: tornado's own accept loop),
   the balanced shared mode and dispatch mode.  Targets: shared >= 0.95,
   dispatch >= 0.99.  A third pattern, ``after wave``: the same keep-alive
   load started the moment a 1 s wave of ``new conn`` load ends, when the
   shares fdserver last sent still count that wave (the other loads start
   once fdserver counts no open connection).
4. Metrics: throughput of 2 workers with ``fdserver --metrics`` (the
   workers count every response and report once a second) against the same
   stack without it, in the same round, patterns as section 1 (wrk -t 2).
   Target: on/off >= 0.97 (the metrics cost at most 3%).
5. HTTPS: the patterns of section 4 against ``fork_processes(2)`` given the
   very SSLContext fdapp builds (an ECDSA P-256 certificate made with
   openssl), in shared and dispatch mode.  Target: shared >= 1.0.
6. Worker start-up: from spawning ``fdapp`` to its first served request (a
   request already waiting in the listen queue when it starts) and to
   ``ready`` in fdserver's status; and the handout latency, the time
   ``fdserver.register(path)`` takes to return the listeners, in this process.

A target's verdict is "met" or "NOT met" only when the median's confidence
interval (distribution-free, from the order of the rounds: with 9 rounds the
2nd lowest to the 2nd highest, 96%) lies wholly above or below it, and
"unclear" when it straddles the target: then the noise decides, not the code.

A mode that the installed fdserver lacks (``--dispatch`` in ``fdserver
--help``, ``--no-balance`` in ``fdapp --help``) shows n/a.  The default 5
rounds take about 4.5 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import fdserver  # noqa: E402
from fdserver.ctl import Control  # noqa: E402

from loadgen import run_wrk, wrk_path  # noqa: E402
from stacks import STEP_TIMEOUT, FdStack, ForkedStack, cpu_ms, wait_state  # noqa: E402
from support import PROJECT, http_get, run, script, wait_until  # noqa: E402

# name -> (a new connection per request, wrk threads)
LOADS = {"keep-alive": (False, 2), "new conn": (True, 2), "keep-alive -t 1": (False, 1),
         "after wave": (False, 2)}
PATTERNS = ["keep-alive", "new conn"]                    # every section
THROUGHPUT_PATTERNS = PATTERNS + ["keep-alive -t 1"]     # section 1 (and 2) also
FAIR_PATTERNS = PATTERNS + ["after wave"]                # section 3 also
# "after wave": keep-alive clients connect the moment a wave of short
# connections ends, while the shares still count the wave.
WAVE_SECONDS = 1.0
THROUGHPUT_WORKERS = 2
FAIR_WORKERS = 8
TARGETS = {"shared": 1.0, "dispatch": 0.8}               # throughput ratio to fork_processes
TLS_TARGETS = {"shared": 1.0}                            # HTTPS, ratio to fork_processes
METRICS_TARGET = 0.97                                    # metrics on / off
METRICS_PATTERNS = PATTERNS
FAIR_TARGETS = {"balanced": 0.95, "dispatch": 0.99}      # Jain's index


# -- what the installed fdserver offers -------------------------------------

def detect_modes() -> dict[str, bool]:
    server_help = run([script("fdserver"), "--help"]).stdout
    app_help = run([script("fdapp"), "--help"]).stdout
    return {"dispatch": "--dispatch" in server_help, "balance": "--no-balance" in app_help,
            "metrics": "--metrics" in server_help}


class Plan:
    """Which stacks exist, given the modes; a stack maker per name, or None for n/a."""

    def __init__(self, modes: dict[str, bool], workdir: Path) -> None:
        self.modes = modes
        self.workdir = workdir
        self.notes: list[str] = []
        if not modes["balance"]:
            self.notes.append("fdapp has no --no-balance yet: shared mode is the naive shared "
                              "socket, and balanced shared is n/a")
        if not modes["dispatch"]:
            self.notes.append("fdserver has no --dispatch yet: dispatch mode is n/a")

    def fd(self, mode: str, workers: int) -> Callable[[], FdStack] | None:
        """mode: shared (the default), naive (--no-balance), balanced, dispatch."""
        server_flags: tuple[str, ...] = ()
        app_flags: tuple[str, ...] = ()
        if mode == "dispatch":
            if not self.modes["dispatch"]:
                return None
            server_flags = ("--dispatch",)
        elif mode == "naive" and self.modes["balance"]:
            app_flags = ("--no-balance",)
        elif mode == "balanced" and not self.modes["balance"]:
            return None
        return lambda: FdStack(self.workdir, f"{mode}{workers}", workers, server_flags, app_flags)

    def metrics(self, on: bool) -> Callable[[], FdStack] | None:
        """Shared mode, with or without fdserver --metrics (n/a if it has none)."""
        if not self.modes["metrics"]:
            return None
        flags = ("--metrics", "127.0.0.1:0") if on else ()
        return lambda: FdStack(self.workdir, f"metrics-{'on' if on else 'off'}",
                               THROUGHPUT_WORKERS, flags)


# -- one measurement each ---------------------------------------------------

def load(stack, pattern: str, *, connections: int, duration: float,
         server_pid: int | None) -> dict:
    """wrk against *stack*, with the CPU time its processes spent meanwhile."""
    if pattern == "after wave":
        run_wrk(stack.address, connections=connections, threads=2, duration=WAVE_SECONDS,
                new_connection=True)
    else:
        wait_idle(stack)
    pids = list(stack.worker_pids) + ([server_pid] if server_pid else [])
    # Midway, the open connections of each worker as fdserver sees them.
    sampled: dict[int, int] = {}
    sampler = threading.Timer(duration / 2, sample_connections, (stack, sampled))
    before = {pid: cpu_ms(pid) for pid in pids}
    began = time.perf_counter()
    sampler.start()
    try:
        new_connection, threads = LOADS[pattern]
        result = run_wrk(stack.address, connections=connections, threads=threads,
                         duration=duration, new_connection=new_connection,
                         scheme=getattr(stack, "scheme", "http"))
    finally:
        sampler.cancel()
        sampler.join()
    wall_ms = (time.perf_counter() - began) * 1000
    spent = {pid: cpu_ms(pid) - before[pid] for pid in pids}
    per_worker = [result.per_pid.get(pid, 0) for pid in stack.worker_pids]
    strangers = set(result.per_pid) - set(stack.worker_pids)
    if strangers:
        raise RuntimeError(f"responses from pids {sorted(strangers)}, not workers of the stack")
    return {
        "pattern": pattern, "rps": result.rps, "requests": result.requests,
        "seconds": result.seconds, "errors": result.errors, "unmatched": result.unmatched,
        "latency_ms": result.latency_ms, "per_worker": per_worker, "wall_ms": wall_ms,
        "connections_mid_run": ([sampled[pid] for pid in stack.worker_pids]
                                if set(stack.worker_pids) <= set(sampled) else None),
        "server_cpu_ms": spent.get(server_pid) if server_pid else None,
        "workers_cpu_ms": sum(spent[pid] for pid in stack.worker_pids),
    }


def open_connections(stack) -> dict[int, int]:
    """pid -> open connections from fdserver's status, if it tells them."""
    if not isinstance(stack, FdStack):
        return {}
    with Control(stack.socket) as control:
        workers = control.status()["workers"]
    return {w["pid"]: w["connections"] for w in workers if "connections" in w}


def wait_idle(stack, timeout: float = 3.0) -> None:
    """Until fdserver sees no open connection on any worker (the last load's are closing).

    Workers report their load at most every few ms, so right after a load
    fdserver still counts its connections; a burst of new connections placed
    on those counts would measure the staleness, not the balance.
    """
    try:
        wait_until(lambda: not any(open_connections(stack).values()), timeout,
                   f"workers of {getattr(stack, 'socket', 'the stack')} idle")
    except AssertionError:
        print(f"warning: fdserver still counts open connections after {timeout:g}s: "
              f"{open_connections(stack)}", file=sys.stderr, flush=True)


def sample_connections(stack, into: dict[int, int]) -> None:
    """Fill *into* with pid -> open connections from fdserver's status, if it tells them."""
    try:
        into.update(open_connections(stack))
    except fdserver.FdserverError as exc:
        print(f"status of {stack.socket} mid-run: {exc}", file=sys.stderr, flush=True)


def time_start(stack: FdStack) -> dict:
    """Spawn one fdapp on a stack with no worker; ms to first served request and to ready."""
    answer: dict = {}

    def fetch() -> None:
        # Queued in the listen backlog (or, in dispatch mode, held by fdserver)
        # until the new worker serves it.
        try:
            answer["body"] = http_get(stack.address, timeout=STEP_TIMEOUT)[1]
            answer["at"] = time.perf_counter()
        except OSError as exc:
            answer["error"] = exc

    with Control(stack.socket) as control:
        getter = threading.Thread(target=fetch, daemon=True)
        getter.start()
        spawned = time.perf_counter()
        worker = stack.spawn()
        ok, state = control.wait(worker.pid, "ready", STEP_TIMEOUT)
        ready = time.perf_counter()
        getter.join(STEP_TIMEOUT)
    if not ok:
        raise RuntimeError(f"fdapp {worker.pid} is {state}, not ready:\n{worker.output}")
    if "at" not in answer:
        raise RuntimeError(f"no answer from the new worker: {answer.get('error')}\n"
                           f"{worker.output}")
    if answer["body"].strip() != f"Hello from {worker.pid}":
        raise RuntimeError(f"answered by someone else: {answer['body']!r}")
    return {"first_request_ms": (answer["at"] - spawned) * 1000,
            "ready_ms": (ready - spawned) * 1000}


def time_handouts(socket_path: str, count: int) -> list[float]:
    """ms for each of *count* fdserver.register() calls (plus 3 not counted)."""
    times = []
    for i in range(count + 3):
        began = time.perf_counter()
        registration = fdserver.register(socket_path, connect_timeout=STEP_TIMEOUT)
        took = (time.perf_counter() - began) * 1000
        for sock in registration.sockets():
            sock.close()
        registration.channel.close()
        if not registration.listeners:
            raise RuntimeError(f"fdserver at {socket_path} handed out no listener")
        if i >= 3:
            times.append(took)
    return times


# -- rounds -----------------------------------------------------------------

def rotate(items: list, r: int) -> list:
    k = r % len(items)
    return items[k:] + items[:k]


def run_round(r: int, plan: Plan, args: argparse.Namespace,
              log: Callable[[str], None]) -> list[dict]:
    """Every section once, on stacks started afresh; a failed stack is logged, not fatal."""
    runs: list[dict] = []

    def guarded(section: str, name: str, make, body: Callable) -> None:
        if make is None:
            return                                  # n/a: the mode does not exist
        stack = make()
        try:
            stack.start()
            body(stack)
        except Exception as exc:                     # noqa: BLE001 (the next stack still runs)
            runs.append({"section": section, "round": r + 1, "stack": name,
                         "failed": f"{type(exc).__name__}: {exc}"})
            log(f"round {r + 1} {section:10} {name:9} FAILED: {type(exc).__name__}: {exc}")
        finally:
            stack.close()

    def loads(section: str, name: str, connections: int, duration: float,
              patterns: list[str]) -> Callable:
        def body(stack) -> None:
            server_pid = getattr(stack, "server_pid", None)
            for pattern in patterns:
                got = load(stack, pattern, connections=connections, duration=duration,
                           server_pid=server_pid)
                runs.append({"section": section, "round": r + 1, "stack": name, **got})
                extra = (f"  fdserver {got['server_cpu_ms']:.0f} ms CPU"
                         if got["server_cpu_ms"] is not None else "")
                log(f"round {r + 1} {section:10} {name:9} {pattern:10} {got['rps']:8.0f} req/s"
                    f"  jain {jain(got['per_worker']):.3f}  errors {sum(got['errors'].values())}"
                    f"{extra}")
        return body

    def starts(name: str) -> Callable:
        def body(stack: FdStack) -> None:
            got: dict = {"first_request_ms": [], "ready_ms": []}
            for _ in range(args.starts_per_round):
                for key, ms in time_start(stack).items():
                    got[key].append(ms)
                worker = stack.workers.pop()
                worker.close()
                wait_state(stack.socket, worker.pid, "gone")
            if name == "shared":
                got["handout_ms"] = time_handouts(stack.socket, args.handouts_per_round)
            runs.append({"section": "startup", "round": r + 1, "stack": name, **got})
            log(f"round {r + 1} startup    {name:9} first request "
                f"{statistics.median(got['first_request_ms']):.0f} ms  ready "
                f"{statistics.median(got['ready_ms']):.0f} ms" + (
                    f"  handout {statistics.median(got['handout_ms']):.2f} ms"
                    if "handout_ms" in got else ""))
        return body

    if "throughput" in args.sections:
        makers = {"fork": lambda: ForkedStack(THROUGHPUT_WORKERS),
                  "shared": plan.fd("shared", THROUGHPUT_WORKERS),
                  "dispatch": plan.fd("dispatch", THROUGHPUT_WORKERS)}
        for name in rotate(list(makers), r):
            guarded("throughput", name, makers[name],
                    loads("throughput", name, args.connections, args.duration,
                          rotate(THROUGHPUT_PATTERNS, r)))
    if "fairness" in args.sections:
        makers = {mode: plan.fd(mode, FAIR_WORKERS) for mode in ("naive", "balanced", "dispatch")}
        for name in rotate(list(makers), r):
            guarded("fairness", name, makers[name],
                    loads("fairness", name, args.fair_connections, args.fair_duration,
                          rotate(FAIR_PATTERNS, r)))
    if "metrics" in args.sections:
        makers = {"off": plan.metrics(False), "on": plan.metrics(True)}
        for name in rotate(list(makers), r):
            guarded("metrics", name, makers[name],
                    loads("metrics", name, args.connections, args.duration,
                          rotate(METRICS_PATTERNS, r)))
    if "tls" in args.sections:
        tls = args.tls_files
        makers = {"fork": lambda: ForkedStack(THROUGHPUT_WORKERS, tls=tls),
                  "shared": lambda: FdStack(plan.workdir, "tls-shared", THROUGHPUT_WORKERS,
                                            tls=tls),
                  "dispatch": (lambda: FdStack(plan.workdir, "tls-dispatch", THROUGHPUT_WORKERS,
                                               ("--dispatch",), tls=tls))
                  if plan.modes["dispatch"] else None}
        for name in rotate(list(makers), r):
            guarded("tls", name, makers[name],
                    loads("tls", name, args.connections, args.duration, rotate(PATTERNS, r)))
    if "startup" in args.sections:
        for name in rotate(["shared", "dispatch"], r):
            guarded("startup", name, plan.fd(name, 0), starts(name))
    return runs


def make_certificate(folder: Path) -> tuple[str, str]:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1, made with openssl."""
    cert, key = folder / "bench.crt", folder / "bench.key"
    done = run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(cert),
                "-days", "2", "-subj", "/CN=127.0.0.1", "-addext",
                "subjectAltName=IP:127.0.0.1"])
    if done.returncode != 0:
        raise RuntimeError(f"openssl could not make the bench's certificate: {done.stderr}")
    return str(cert), str(key)


# -- figures and tables -----------------------------------------------------

def jain(xs: Sequence[float]) -> float:
    total, squares = sum(xs), sum(x * x for x in xs)
    return total * total / (len(xs) * squares) if squares else 0.0


def max_min(xs: list[int]) -> float:
    return max(xs) / min(xs) if min(xs) > 0 else math.inf


def spread(values: list[float], fmt: Callable[[float], str]) -> str:
    if not values:
        return "n/a"
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))})"


def kilo(x: float) -> str:
    return f"{x / 1000:.1f}k"


def num(digits: int) -> Callable[[float], str]:
    return lambda x: "inf" if math.isinf(x) else f"{x:.{digits}f}"


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free confidence interval of the median, and its coverage.

    The k-th lowest and k-th highest round, with k as large as keeps the
    coverage, 1 - 2 P(Binomial(n, 1/2) < k), at *level* or above (with under 6
    rounds no k reaches 95%: then the lowest and highest, and their coverage).
    """
    xs, n = sorted(values), len(values)

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return xs[k - 1], xs[n - k], coverage(k)


def verdict(values: list[float], target: float, fmt: Callable[[float], str]) -> str:
    """met / NOT met only when the median's confidence interval is clear of the target."""
    if not values:
        return ""
    low, high, _ = median_interval(values)
    return interval_verdict(low, high, target, fmt)


def interval_verdict(low: float, high: float, target: float,
                     fmt: Callable[[float], str]) -> str:
    """The rule itself, given the interval: met / NOT met only when it is clear of *target*."""
    word = "met" if low >= target else "NOT met" if high < target else "unclear"
    return f"{word} (CI {fmt(low)}-{fmt(high)})"


def verdict_legend(rounds: int) -> str:
    coverage = median_interval(list(range(rounds)))[2]
    return (f"met / NOT met: the median's {coverage:.0%} confidence interval (CI, from the order "
            f"of the {rounds} rounds) lies wholly above / below the target;\nunclear: it "
            "straddles the target, so this machine's noise hides the answer.")


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()
                     for row in rows)


def select(runs: list[dict], section: str, stack: str, pattern: str | None = None) -> list[dict]:
    """The successful measurements of one row."""
    return [x for x in runs if x["section"] == section and x["stack"] == stack
            and "failed" not in x and (pattern is None or x["pattern"] == pattern)]


def throughput_table(runs: list[dict], plan: Plan) -> str:
    return ratio_table(runs, "throughput", THROUGHPUT_PATTERNS, {
        "fork": "tornado fork_processes(2)",
        "shared": "fdserver shared" + ("" if plan.modes["balance"] else " (unbalanced)"),
        "dispatch": "fdserver dispatch"}, lambda name, pattern: TARGETS.get(name))


def tls_table(runs: list[dict]) -> str:
    return ratio_table(runs, "tls", PATTERNS, {
        "fork": "tornado fork_processes(2), same ssl_options",
        "shared": "fdserver shared, --certfile",
        "dispatch": "fdserver dispatch, --certfile"}, lambda name, pattern: TLS_TARGETS.get(name))


def ratio_table(runs: list[dict], section: str, patterns: list[str], labels: dict[str, str],
                target_of: Callable[[str, str], float | None]) -> str:
    """req/s of each stack of *section*, and its ratio to fork's in the same round."""
    rows = [("pattern", "stack", "req/s", "ratio to fork", "target", "")]
    for pattern in patterns:
        base = {x["round"]: x["rps"] for x in select(runs, section, "fork", pattern)}
        for name, label in labels.items():
            mine = select(runs, section, name, pattern)
            ratios = [x["rps"] / base[x["round"]] for x in mine if base.get(x["round"])]
            target = target_of(name, pattern)
            rows.append((pattern, label, spread([x["rps"] for x in mine], kilo),
                         "1 (baseline)" if name == "fork" else spread(ratios, num(2)),
                         f">= {target:g}" if target else "",
                         verdict(ratios, target, num(2)) if target else ""))
    return table(rows)


def metrics_table(runs: list[dict]) -> str:
    """Throughput on/off (the target), and the CPU the whole host (workers and
    fdserver) spent per request: steadier than throughput on a shared machine."""
    rows = [("pattern", "metrics", "req/s", "ratio on/off", "target", "",
             "host CPU us/request", "ratio on/off")]

    def per_request(x: dict) -> float:
        return 1000 * (x["workers_cpu_ms"] + (x["server_cpu_ms"] or 0)) / max(x["requests"], 1)

    for pattern in METRICS_PATTERNS:
        off = {x["round"]: x for x in select(runs, "metrics", "off", pattern)}
        mine = select(runs, "metrics", "on", pattern)
        ratios = [x["rps"] / off[x["round"]]["rps"] for x in mine if x["round"] in off]
        cpu = [per_request(x) / per_request(off[x["round"]]) for x in mine if x["round"] in off]
        rows.append((pattern, "off", spread([x["rps"] for x in off.values()], kilo),
                     "1 (baseline)", "", "", spread([per_request(x) for x in off.values()],
                                                    num(0)), "1 (baseline)"))
        rows.append((pattern, "on", spread([x["rps"] for x in mine], kilo),
                     spread(ratios, num(3)), f">= {METRICS_TARGET:g}",
                     verdict(ratios, METRICS_TARGET, num(3)),
                     spread([per_request(x) for x in mine], num(0)), spread(cpu, num(3))))
    return table(rows)


def cpu_table(runs: list[dict]) -> str:
    rows = [("pattern", "mode", "fdserver CPU ms", "% of one core", "workers' CPU ms",
             "fdserver/workers", "target")]
    for pattern in THROUGHPUT_PATTERNS:
        for name in ("shared", "dispatch"):
            mine = select(runs, "throughput", name, pattern)
            rows.append((
                pattern, name,
                spread([x["server_cpu_ms"] for x in mine], num(0)),
                spread([100 * x["server_cpu_ms"] / x["wall_ms"] for x in mine], num(1)),
                spread([x["workers_cpu_ms"] for x in mine], num(0)),
                spread([100 * x["server_cpu_ms"] / x["workers_cpu_ms"] for x in mine
                        if x["workers_cpu_ms"]], lambda v: f"{v:.1f}%"),
                "~0" if name == "shared" else "(comparison)"))
    return table(rows)


def fairness_table(runs: list[dict], plan: Plan) -> str:
    rows = [("pattern", "mode", "Jain's index", "max/min", "target", "",
             "Jain of open conns", "req/s")]
    labels = {"naive": "naive shared (" + ("--no-balance)" if plan.modes["balance"]
                                           else "fdapp as it is)"),
              "balanced": "balanced shared", "dispatch": "dispatch"}
    for pattern in FAIR_PATTERNS:
        for name, label in labels.items():
            mine = select(runs, "fairness", name, pattern)
            jains = [jain(x["per_worker"]) for x in mine]
            target = FAIR_TARGETS.get(name)
            conns = [jain(x["connections_mid_run"]) for x in mine
                     if x.get("connections_mid_run") and any(x["connections_mid_run"])]
            rows.append((pattern, label, spread(jains, num(3)),
                         spread([max_min(x["per_worker"]) for x in mine], num(1)),
                         f">= {target:g}" if target else "(reference)",
                         verdict(jains, target, num(3)) if target else "",
                         spread(conns, num(3)),
                         spread([x["rps"] for x in mine], kilo)))
    return table(rows)


def pooled(batches: list[list[float]], fmt: Callable[[float], str]) -> str:
    """Median of every sample, with the lowest and highest round median."""
    every = [t for batch in batches for t in batch]
    if not every:
        return "n/a"
    medians = [statistics.median(batch) for batch in batches]
    return f"{fmt(statistics.median(every))} ({fmt(min(medians))}-{fmt(max(medians))})"


def startup_table(runs: list[dict]) -> str:
    rows = [("measure", "samples", "shared", "dispatch")]
    for key, label in (("first_request_ms", "spawn fdapp -> its first served request"),
                       ("ready_ms", "spawn fdapp -> ready in fdserver's status"),
                       ("handout_ms", "fdserver.register() returns the listeners")):
        batches = {mode: [x[key] for x in select(runs, "startup", mode) if key in x]
                   for mode in ("shared", "dispatch")}
        rows.append((label, str(sum(map(len, batches["shared"]))),
                     *(pooled(batches[mode], num(2 if key == "handout_ms" else 0))
                       for mode in ("shared", "dispatch"))))
    return table(rows)


def errors_note(runs: list[dict]) -> list[str]:
    notes = []
    for x in runs:
        if "errors" in x and (sum(x["errors"].values()) or x["unmatched"]):
            kinds = ", ".join(f"{n} {k}" for k, n in x["errors"].items() if n)
            if x["unmatched"]:
                kinds += f"{', ' if kinds else ''}{x['unmatched']} bodies without a pid"
            notes.append(f"round {x['round']} {x['section']} {x['stack']} {x['pattern']}: "
                         f"{kinds} (of {x['requests']} responses)")
    return notes


def plot(runs: list[dict], path: Path) -> str:
    """Share of requests by worker rank in the fairness runs; a line saying what happened."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    fig, axes = plt.subplots(1, len(FAIR_PATTERNS), figsize=(15, 4), sharey=True)
    labels = {"naive": "naive shared", "balanced": "balanced shared", "dispatch": "dispatch"}
    width = 0.8 / len(labels)
    for ax, pattern in zip(axes, FAIR_PATTERNS, strict=False):
        for i, (name, label) in enumerate(labels.items()):
            mine = select(runs, "fairness", name, pattern)
            if not mine:
                continue
            shares = [sorted((100 * n / max(sum(x["per_worker"]), 1) for n in x["per_worker"]),
                             reverse=True) for x in mine]
            mean = [statistics.mean(col) for col in zip(*shares, strict=False)]
            ax.bar([k + (i - 1) * width for k in range(len(mean))], mean, width, label=label)
        ax.axhline(100 / FAIR_WORKERS, color="black", linewidth=0.8, linestyle="--",
                   label=f"even share (1/{FAIR_WORKERS})")
        ax.set_title(f"{pattern}: {FAIR_WORKERS} workers")
        ax.set_xlabel("worker, busiest first")
        ax.set_xticks(range(FAIR_WORKERS), [str(k + 1) for k in range(FAIR_WORKERS)])
    axes[0].set_ylabel("% of requests (mean over rounds)")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot: {path}"


def main(argv: list[str] | None = None) -> int:
    # SIGTERM unwinds as Ctrl-C does, so every stack started is closed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per throughput run")
    p.add_argument("--connections", type=int, default=32, help="wrk -c for throughput")
    p.add_argument("--fair-duration", type=float, default=2.0, help="seconds per fairness run")
    p.add_argument("--fair-connections", type=int, default=64, help="wrk -c for fairness")
    p.add_argument("--starts", type=int, default=15, help="fdapp starts timed in all, per mode")
    p.add_argument("--handouts", type=int, default=200, help="register() calls timed in all")
    p.add_argument("--sections", default="throughput,fairness,metrics,tls,startup",
                   help="comma-separated subset of %(default)s (CPU comes with throughput)")
    p.add_argument("--json-out", metavar="PATH", help="also write every run's result here")
    p.add_argument("--plot", metavar="PATH", default=str(PROJECT / "bench/results/fairness.png"),
                   help="PNG of requests per worker, if matplotlib is installed "
                        "(default %(default)s; '' for none)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    args.sections = set(args.sections.split(","))
    unknown = args.sections - {"throughput", "fairness", "metrics", "tls", "startup"}
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    args.starts_per_round = max(1, math.ceil(args.starts / args.rounds))
    args.handouts_per_round = max(1, math.ceil(args.handouts / args.rounds))
    wrk_path()            # fails early, with the fix, if wrk is missing
    os.chdir(PROJECT)     # fdapp imports app from the current directory

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="perf-") as tmp:
        plan = Plan(detect_modes(), Path(tmp))
        args.tls_files = make_certificate(Path(tmp)) if "tls" in args.sections else None
        runs = []
        for r in range(args.rounds):
            runs += run_round(r, plan, args, log)
    cores = os.cpu_count()
    print(f"fdserver performance; medians of {args.rounds} rounds (lowest-highest round in "
          f"brackets); {cores} cores shared by wrk and the servers, so rounds are noisy: "
          f"read the spread")
    for note in plan.notes:
        print(f"note: {note}")
    print(f"\n1. Throughput, {THROUGHPUT_WORKERS} workers, wrk -t 2 (-t 1 where the pattern "
          f"says) -c {args.connections} "
          f"-d {args.duration:g}s; ratio to tornado fork_processes({THROUGHPUT_WORKERS}) "
          "in the same round")
    print(throughput_table(runs, plan))
    print(verdict_legend(args.rounds))
    print(f"\n2. fdserver's own CPU (utime+stime, 10 ms ticks) during the section-1 loads "
          f"of {args.duration:g}s")
    print(cpu_table(runs))
    print(f"\n3. Fairness of requests over {FAIR_WORKERS} workers, wrk -t 2 "
          f"-c {args.fair_connections} -d {args.fair_duration:g}s; Jain's index "
          f"(1 = even, {1 / FAIR_WORKERS:.3f} = one worker took all)")
    print(fairness_table(runs, plan))
    print("Jain's index and max/min are of requests per worker.  Jain of open conns: the "
          "connections each worker held midway,\nfrom fdserver's status (new conn: few are "
          "open at any instant).  With keep-alive, requests per worker also\ndepend on how "
          "the cores are shared among 8 workers and wrk, even with equal connections.")
    if "metrics" in args.sections:
        print(f"\n4. Metrics cost: {THROUGHPUT_WORKERS} workers, shared mode, fdserver --metrics "
              f"on against off in the same round, wrk -t 2 -c {args.connections} "
              f"-d {args.duration:g}s")
        print(metrics_table(runs))
    if "tls" in args.sections:
        print(f"\n5. HTTPS: {THROUGHPUT_WORKERS} workers, an ECDSA P-256 certificate, wrk -t 2 "
              f"-c {args.connections} -d {args.duration:g}s (new conn: a TLS handshake per "
              f"request, resuming the session as wrk does); ratio to tornado "
              f"fork_processes({THROUGHPUT_WORKERS}) with the same SSLContext, in the same round")
        print(tls_table(runs))
    print("\n6. Worker start-up and listener handout, ms: median of all samples (lowest-highest "
          "round median)")
    print(startup_table(runs))
    failed = [x for x in runs if "failed" in x]
    if failed:
        print(f"\n{len(failed)} stacks FAILED (left out of the tables above):")
        print("\n".join(f"  round {x['round']} {x['section']} {x['stack']}: "
                        f"{x['failed'].splitlines()[0]}" for x in failed))
    notes = errors_note(runs)
    if notes:
        print("\nwrk errors (connect/read/write/timeout, status = non-2xx):")
        print("\n".join(f"  {n}" for n in notes))
    if args.plot and "fairness" in args.sections:
        print("\n" + plot(runs, Path(args.plot)))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(runs, indent=1) + "\n")
    print(f"\n({time.monotonic() - began:.0f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
