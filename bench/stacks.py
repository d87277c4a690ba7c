"""The servers bench/performance.py loads, each started and killed as a unit.

* :class:`FdStack`: ``fdserver --bind 127.0.0.1:0 [server flags]`` and N
  ``fdapp app:make_app [app flags]``, each waited on (event-driven, through
  fdserver) until it is ``ready``.
* :class:`ForkedStack`: bench/forked_app.py, tornado's ``fork_processes(N)``
  on a socket it binds itself.

Both have ``address``, ``worker_pids`` and ``close()``, which kills every
process it started and may be called more than once.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

from rolling_restart import STEP_TIMEOUT, wait_state  # noqa: F401  (puts tests/ on sys.path)
from support import Proc, script, wait_until

BENCH = Path(__file__).resolve().parent
PROC_WATCHDOG = 180.0     # a child left behind by a crash dies by itself
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid: int) -> float:
    """utime + stime of *pid* so far, in ms (resolution: one clock tick, 10 ms)."""
    with open(f"/proc/{pid}/stat") as f:
        # "pid (comm) state ...": comm may hold spaces, so split after ")".
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / CLOCK_TICKS


class FdStack:
    """fdserver and *workers* fdapps on one 127.0.0.1 port chosen by the kernel."""

    def __init__(self, workdir: Path, name: str, workers: int,
                 server_flags: tuple[str, ...] = (), app_flags: tuple[str, ...] = (),
                 tls: tuple[str, str] | None = None, watchdog: float = PROC_WATCHDOG) -> None:
        """*tls*: (certfile, keyfile) to serve HTTPS with, on a listener named https;
        *watchdog*: fdserver's and each worker's longest life."""
        self.scheme = "https" if tls else "http"
        if tls:
            server_flags += ("--certfile", tls[0], "--keyfile", tls[1])
        self.socket = str(workdir / f"{name}.sock")
        self.workers_wanted = workers
        self.server_flags, self.app_flags = server_flags, app_flags
        self.server: Proc | None = None
        self.workers: list[Proc] = []
        self.address = ""
        self.watchdog = watchdog

    @property
    def server_pid(self) -> int:
        return self.server.pid

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def start(self) -> FdStack:
        self.server = Proc([script("fdserver"), "--bind", f"{self.scheme}=127.0.0.1:0",
                            "--socket", self.socket, *self.server_flags], watchdog=self.watchdog)
        match = self.server.wait_for_line(rf"\b{self.scheme} on (127\.0\.0\.1:\d+)",
                                          STEP_TIMEOUT)
        self.address = match.group(1)
        starting = [self.spawn() for _ in range(self.workers_wanted)]
        for worker in starting:
            wait_state(self.socket, worker.pid, "ready")
        return self

    def spawn(self) -> Proc:
        """Start one more fdapp (not waited on)."""
        worker = Proc([script("fdapp"), "app:make_app", "--socket", self.socket,
                       *self.app_flags], watchdog=self.watchdog)
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        for proc in self.workers + [self.server]:
            if proc is not None:
                proc.close()


class ForkedStack:
    """bench/forked_app.py with *workers* processes, in a process group of its own."""

    def __init__(self, workers: int, tls: tuple[str, str] | None = None) -> None:
        self.workers_wanted = workers
        self.tls = tls
        self.scheme = "https" if tls else "http"
        self.parent: Proc | None = None
        self.worker_pids: list[int] = []
        self.address = ""

    def start(self) -> ForkedStack:
        tls = ["--certfile", self.tls[0], "--keyfile", self.tls[1]] if self.tls else []
        self.parent = Proc([sys.executable, str(BENCH / "forked_app.py"),
                            "--processes", str(self.workers_wanted), *tls],
                           watchdog=PROC_WATCHDOG, process_group=0)
        self.address = self.parent.wait_for_line(r"listening on (\S+)", STEP_TIMEOUT).group(1)
        ready = re.compile(r"^pid (\d+) ready$")

        def all_ready() -> list[int] | None:
            if self.parent.popen.poll() is not None:
                raise RuntimeError(f"forked_app.py exited:\n{self.parent.output}")
            found = (ready.match(line) for line in list(self.parent.lines))
            pids = [int(m.group(1)) for m in found if m]
            return pids if len(pids) >= self.workers_wanted else None

        try:
            self.worker_pids = wait_until(all_ready, STEP_TIMEOUT, "forked_app.py's children")
        except AssertionError:
            raise RuntimeError(f"forked_app.py: {self.workers_wanted} children not ready in "
                               f"{STEP_TIMEOUT:g}s; output:\n{self.parent.output}") from None
        return self

    def close(self) -> None:
        if self.parent is None:
            return
        try:
            os.killpg(self.parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.parent.close()
