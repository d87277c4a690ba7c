"""Real processes for tests: started as a user would, watched, always killed.

Every child gets a watchdog (killed after WATCHDOG seconds whatever happens)
and a reader thread that collects its output so tests can wait on a line.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WATCHDOG = 180.0
# Users the privilege tests create (and remove): see conftest.users.
GROUP, APP_USER, OTHER_USER = "fdtest", "fdtest-app", "fdtest-other"


class Proc:
    """A child process whose merged output is collected line by line.

    Every instance is listed in ``Proc.started``: conftest fails a test whose
    children logged a traceback or an ERROR it did not expect.
    """

    started: list[Proc] = []

    def __init__(self, argv: list[str], *, cwd: Path | str = PROJECT, env: dict | None = None,
                 watchdog: float = WATCHDOG, **popen) -> None:
        self.argv = argv
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, **popen)
        self.pid = self.popen.pid
        Proc.started.append(self)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._watchdog = threading.Timer(watchdog, self.kill)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 15.0, start: int = 0) -> re.Match:
        """Wait until a line matching *pattern* appears; fail with the output if not."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = start
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r} from {self.argv[:3]} "
                                         f"(exit {self.popen.poll()}); output:\n{self.output}")
                self._cond.wait(min(left, 0.5))

    def wait(self, timeout: float = 15.0) -> int:
        code = self.popen.wait(timeout)
        self._reader.join(5)
        return code

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def close(self) -> None:
        self._watchdog.cancel()
        self.kill()
        self._reader.join(5)
        self.popen.stdout.close()


# What a child must not log unless its test expects it (tornado's test
# runner likewise fails on stray log lines).
BAD_LOG_LINE = re.compile(r"Traceback \(most recent call last\)|\bERROR\b|"
                          r"Exception in callback|Task exception was never retrieved")


def bad_log_lines(proc: Proc) -> list[str]:
    with proc._cond:
        return [line for line in proc.lines if BAD_LOG_LINE.search(line)]


def run(argv: list[str], timeout: float = 30.0, **kwargs) -> subprocess.CompletedProcess:
    """Run a command to completion, capturing text output."""
    return subprocess.run(argv, cwd=kwargs.pop("cwd", PROJECT), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)


def script(name: str) -> str:
    """Path of an installed console script (fdserver, fdapp, fdctl)."""
    return str(BIN / name)


def wait_until(predicate: Callable[[], object], timeout: float = 15.0, what: str = "condition"):
    """Poll a cheap check of observable state until it holds, with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def http_get(address: str, path: str = "/", timeout: float = 10.0) -> tuple[int, str]:
    """GET http://address/path with a new connection; (status, body)."""
    with urllib.request.urlopen(f"http://{address}{path}", timeout=timeout) as response:
        return response.status, response.read().decode()


def replace_by_hand(workers: list, start_worker: Callable[[], Proc], times: int) -> None:
    """Rolling restart by hand: SIGTERM the oldest worker, start a new one, wait
    for the old one to drain and exit 0; *times* over.  *workers* is updated."""
    for _ in range(times):
        old = workers.pop(0)
        old.signal(15)
        workers.append(start_worker())
        assert old.wait(timeout=40) == 0, old.output
        old.wait_for_line(r"drained; exiting|graceful timeout")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now (the kernel's pick)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tuple_of(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (as a server's log says it) as a socket address."""
    host, _, port = address.rpartition(":")
    return host, int(port)


def free_low_port() -> int:
    for port in range(1023, 900, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024 on 127.0.0.1")


def proc_ids(pid: int) -> dict[str, list[int]]:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                fields[key] = [int(v) for v in value.split()]
    return fields


__all__ = ["PROJECT", "Proc", "run", "script", "wait_until", "http_get", "pid_alive",
           "free_low_port", "proc_ids", "GROUP", "APP_USER", "OTHER_USER"]
