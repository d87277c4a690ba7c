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

A step that fails (the replacement does not start, or never reports ready)
ends the run with an error that says why: the replacement's last log lines,
read from supervisord (``readProcessStdoutLog``), and the state the
processes are left in, from supervisord and fdserver.
"""

from __future__ import annotations

import itertools
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .ctl import Control
from .errors import FdserverError, RollingRestartError, SupervisorFault, UsageError

DEFAULT_READY_TIMEOUT = 60.0
LOG_LINES = 10          # of a failed replacement's log, in the error
LOG_BYTES = 65536       # read at most this much of it


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
            raise SupervisorFault(f"supervisord {method}{target}: {fault.faultString}",
                                  str(fault.faultString).partition(":")[0]) from None
        except (OSError, xmlrpc.client.ProtocolError) as exc:
            why = getattr(exc, "strerror", None) or getattr(exc, "errmsg", None) or str(exc)
            raise RollingRestartError(f"cannot reach supervisord at {self.url}: {why}") from None

    def processes(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self._call("getAllProcessInfo")
        return found

    def info(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self._call("getProcessInfo", name)
        return found

    def pid_of(self, name: str) -> int:
        pid: int = self.info(name)["pid"]
        return pid

    def stop(self, name: str) -> None:
        self._call("stopProcess", name, True)

    def start(self, name: str) -> None:
        self._call("startProcess", name, True)

    def log_end(self, name: str) -> int | None:
        """Where *name*'s stdout log ends now; None if it has none."""
        try:
            end: int = self._call("tailProcessStdoutLog", name, 0, 0)[1]
        except SupervisorFault:
            return None
        return end

    def log_since(self, name: str, start: int) -> list[str]:
        """The lines *name*'s stdout log got since *start*: the last LOG_BYTES of them.

        Raises SupervisorFault if it has no log (e.g. ``stdout_logfile=NONE``).
        """
        # tailProcessStdoutLog gives the size; it reads the file's last bytes
        # whatever the offset, so readProcessStdoutLog reads from *start*.
        end: int = self._call("tailProcessStdoutLog", name, 0, 0)[1]
        if end < start:                 # rotated since: all of the new file is newer
            start = 0
        offset = max(start, end - LOG_BYTES)
        if end <= offset:
            return []
        lines = str(self._call("readProcessStdoutLog", name, offset, end - offset)).splitlines()
        return lines[1:] if offset > start else lines      # the first one is cut


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
    names = [f"{p['group']}:{p['name']}" for p in chosen]
    steps: list[Step] = []
    for name, process in zip(names, chosen, strict=True):
        started = time.monotonic()
        supervisor.stop(name)           # returns once the old process has drained and exited
        log_start = supervisor.log_end(name)      # the replacement's lines come after
        try:
            supervisor.start(name)      # returns once RUNNING (startsecs passed)
        except SupervisorFault as exc:
            why = f"the new process failed to start (supervisord: {exc.fault})"
            raise _stopped(why, name, log_start, supervisor, socket_path, names, steps) \
                from None
        new_pid = supervisor.pid_of(name)
        # A fresh connection per step: a long drain must not idle one out.
        with Control(socket_path) as control:
            ready, state = control.wait(new_pid, "ready", ready_timeout)
        if not ready:
            why = (f"new pid {new_pid} did not report ready to fdserver within "
                   f"{ready_timeout:g}s (it is {state})")
            raise _stopped(why, name, log_start, supervisor, socket_path, names, steps)
        step = Step(name, process["pid"], new_pid, time.monotonic() - started)
        progress(step)
        steps.append(step)
    return steps


def _stopped(why: str, name: str, log_start: int | None, supervisor: Supervisor,
             socket_path: str, names: list[str], steps: list[Step]) -> RollingRestartError:
    """The error for a step that failed: why first, then the replacement's
    last log lines and the state the processes are left in."""
    return RollingRestartError("\n".join([
        f"{name}: {why}; stopped here, the remaining processes were not touched",
        *_log_tail(supervisor, name, log_start),
        *_left_in(supervisor, socket_path, names, {step.name for step in steps})]))


def _log_tail(supervisor: Supervisor, name: str, start: int | None) -> list[str]:
    """The failed replacement's last log lines, indented; repeats counted."""
    try:
        lines = supervisor.log_since(name, start or 0)
        where = str(supervisor.info(name).get("stdout_logfile") or "its stdout log")
    except FdserverError as exc:
        return [f"{name}'s log cannot be read: {exc}"]
    counted = [(line, len(list(same)))
               for line, same in itertools.groupby(filter(None, map(str.rstrip, lines)))]
    if not counted:
        return [f"{name} logged nothing since it was started ({where})"]
    shown = [f"  {line}" + (f"  [{n} times]" if n > 1 else "")
             for line, n in counted[-LOG_LINES:]]
    return [f"{name}'s last log lines since it was started ({where}):", *shown]


def _left_in(supervisor: Supervisor, socket_path: str, names: list[str],
             replaced: set[str]) -> list[str]:
    """The state the processes of this rolling restart are left in, in a few lines."""
    try:
        processes = {f"{p['group']}:{p['name']}": p for p in supervisor.processes()}
    except FdserverError as exc:
        return [f"their state is unknown: {exc}"]
    states: dict[int, str] | None = None
    unknown = ""
    try:
        with Control(socket_path) as control:
            states = {w["pid"]: str(w["state"]) for w in control.status()["workers"]}
    except (FdserverError, OSError) as exc:
        unknown = f"unknown ({exc})"
    ready = [name for name in names if name in processes and states
             and states.get(processes[name]["pid"]) == "ready"]
    groups = [f"{label}: {', '.join(which)}" for label, which in (
        ("replaced", [n for n in ready if n in replaced]),
        ("not replaced yet", [n for n in ready if n not in replaced])) if which]
    lines = [f"now {len(ready)} of {len(names)} processes are ready with fdserver"
             + (f" ({'; '.join(groups)})" if groups else "")]
    for name in names:
        if name in ready:
            continue
        process = processes.get(name)
        if process is None:
            lines.append(f"  {name}: no longer known to supervisord")
            continue
        said = f"supervisord {process['statename']}"
        if process["pid"]:
            said += f" pid {process['pid']}"
        if process.get("description") and process["statename"] not in ("RUNNING", "STOPPED"):
            said += f" ({process['description']})"
        worker = ("not registered" if not process["pid"]
                  else unknown if states is None
                  else states.get(process["pid"], "not registered"))
        lines.append(f"  {name}: {said}; fdserver: {worker}")
    return lines
