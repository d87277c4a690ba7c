"""Rolling restart of app processes through supervisord's XML-RPC interface.

One process at a time: stop it (supervisord sends the stop signal and waits
while fdapp drains), start it, then wait until the replacement has reported
``ready`` to fdserver.  supervisord's RUNNING only means ``startsecs``
passed, so the next process is touched only after fdserver says ready.

Capacity: supervisord cannot run two copies of one program name, so each step
runs with one process fewer.  Nothing is refused meanwhile: the listening
socket stays open in fdserver and the other workers, and connections wait in
the kernel's accept queue.  A group of one therefore pauses (requests are
delayed, not failed) for the drain plus the new process's start-up.
"""

from __future__ import annotations

import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .ctl import Control
from .errors import RollingRestartError, UsageError

DEFAULT_READY_TIMEOUT = 60.0


@dataclass
class Step:
    name: str
    old_pid: int
    new_pid: int
    seconds: float


class Supervisor:
    """The few supervisord calls a rolling restart needs, via supervisor's own client."""

    def __init__(self, url: str) -> None:
        try:
            # An extra: only this command needs it, not every app process.
            from supervisor.xmlrpc import SupervisorTransport
        except ImportError:
            raise UsageError("rolling-restart needs supervisor: "
                             "pip install 'fdserver[supervisor]'") from None
        if not url.startswith(("unix://", "http://", "https://")):
            raise RollingRestartError(f"supervisor URL {url!r} must start with unix:// or http://")
        self.url = url
        transport = SupervisorTransport(None, None, url)
        # The host part is ignored for unix:// URLs; supervisorctl does the same.
        self._rpc = xmlrpc.client.ServerProxy("http://127.0.0.1", transport).supervisor

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._rpc, method)(*args)
        except xmlrpc.client.Fault as fault:
            target = f" {args[0]}" if args else ""
            raise RollingRestartError(
                f"supervisord {method}{target}: {fault.faultString}") from None
        except (OSError, xmlrpc.client.ProtocolError) as exc:
            why = getattr(exc, "strerror", None) or getattr(exc, "errmsg", None) or str(exc)
            raise RollingRestartError(f"cannot reach supervisord at {self.url}: {why}") from None

    def processes(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self._call("getAllProcessInfo")
        return found

    def pid_of(self, name: str) -> int:
        pid: int = self._call("getProcessInfo", name)["pid"]
        return pid

    def stop(self, name: str) -> None:
        self._call("stopProcess", name, True)

    def start(self, name: str) -> None:
        self._call("startProcess", name, True)


def select(workers: set[int], processes: list[dict[str, Any]],
           group: str | None) -> list[dict[str, Any]]:
    """supervisord processes whose pids are registered workers, in *group* if given."""
    chosen = [p for p in processes
              if p["pid"] in workers and (group is None or p["group"] == group)]
    return sorted(chosen, key=lambda p: (p["group"], p["name"]))


def rolling_restart(
    socket_path: str,
    supervisor: Supervisor,
    *,
    group: str | None = None,
    ready_timeout: float = DEFAULT_READY_TIMEOUT,
    progress: Callable[[Step], None] = lambda step: None,
) -> list[Step]:
    """Replace every selected process, one at a time; return the steps taken."""
    with Control(socket_path) as control:
        workers = {w["pid"] for w in control.status()["workers"]}
    chosen = select(workers, supervisor.processes(), group)
    if not chosen:
        where = f"in group {group!r} " if group else ""
        raise RollingRestartError(
            f"no supervisord process {where}is a worker registered with fdserver at {socket_path}")
    steps = []
    for process in chosen:
        name = f"{process['group']}:{process['name']}"
        started = time.monotonic()
        supervisor.stop(name)           # returns once the old process has drained and exited
        supervisor.start(name)          # returns once RUNNING (startsecs passed)
        new_pid = supervisor.pid_of(name)
        # A fresh connection per step: a long drain must not idle one out.
        with Control(socket_path) as control:
            ready, state = control.wait(new_pid, "ready", ready_timeout)
        if not ready:
            raise RollingRestartError(
                f"{name}: new pid {new_pid} did not report ready to fdserver within "
                f"{ready_timeout:g}s (it is {state}); stopped here, the remaining processes "
                "were not touched")
        step = Step(name, process["pid"], new_pid, time.monotonic() - started)
        progress(step)
        steps.append(step)
    return steps
