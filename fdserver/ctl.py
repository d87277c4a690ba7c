"""fdctl's side of the protocol: status queries and waits on worker states."""

from __future__ import annotations

import collections
from datetime import UTC, datetime
from typing import Any

from .client import connect, expect
from .protocol import DrainMessage, ReloadedMessage, WaitedMessage, WorkerState

# fdserver answers a reload once every worker took the new certificate (or
# at its own timeout, 5 s): allow for that.
RELOAD_TIMEOUT = 30.0


class Control:
    """A short-lived ctl connection to fdserver (blocking)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.channel, self.welcome = connect(path, "ctl", timeout=0)
        self.channel.sock.settimeout(timeout)

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def status(self) -> dict[str, Any]:
        self.channel.send({"type": "status"})
        answer: dict[str, Any]
        answer, _ = expect(self.channel, "status", self.path)
        answer.pop("type")
        return answer

    def reload(self) -> tuple[bool, str]:
        """Ask fdserver to re-read its certificate; (whether it took, what it said)."""
        self.channel.send({"type": "reload"})
        old = self.channel.sock.gettimeout()
        self.channel.sock.settimeout(RELOAD_TIMEOUT)
        try:
            message: ReloadedMessage
            message, _ = expect(self.channel, "reloaded", self.path)
        finally:
            self.channel.sock.settimeout(old)
        return message["ok"], message["message"]

    def drain(self, drained: bool, wait: float | None = None) -> dict[str, Any]:
        """Drain the host (or undrain it); with *wait*, once the balancers know."""
        if drained:
            request: DrainMessage = {"type": "drain"}
            if wait:
                request["wait"] = wait
            self.channel.send(request)
        else:
            self.channel.send({"type": "undrain"})
        answer: dict[str, Any]
        answer, _ = expect(self.channel, "drained", self.path)
        return answer

    def wait(self, pid: int, state: WorkerState, timeout: float) -> tuple[bool, str]:
        """Wait until worker *pid* is in *state* (``gone`` included).

        fdserver answers the moment the state is reached, or at *timeout*;
        returns (reached, state at that moment).
        """
        self.channel.send({"type": "wait", "pid": pid, "state": state, "timeout": timeout})
        old = self.channel.sock.gettimeout()
        self.channel.sock.settimeout(timeout + 10.0)
        try:
            message: WaitedMessage
            message, _ = expect(self.channel, "waited", self.path)
        finally:
            self.channel.sock.settimeout(old)
        return message["ok"], str(message.get("state"))


def format_status(status: dict[str, Any], now: datetime | None = None) -> str:
    """The human-readable table printed by ``fdctl status``."""
    now = now or datetime.now(UTC)
    server = status["server"]
    lines = [f"fdserver pid {server['pid']} (uid {server['uid']}), version {server['version']}, "
             f"{server.get('mode', 'shared')} mode, up {_age(server['started_at'], now)}",
             f"socket   {server['socket']}"]
    if "agent" in server:
        lines.append(f"agent    {server['agent']}, capacity {server.get('capacity', '?')}, "
                     + ("DRAINED (fdctl undrain puts it back)" if server.get("drained")
                        else "in rotation"))
    lines.append("")
    rows: list[tuple[str, ...]] = [("LISTENER", "FAMILY", "ADDRESS", "TLS")]
    rows += [(listener["name"], listener["family"], listener["address"], _tls(listener))
             for listener in status["listeners"]]
    lines += _table(rows) + [""]
    workers = status["workers"]
    if workers:
        rows = [("PID", "UID", "STATE", "CONNS", "REQ/S", "LAG", "CONNECTED", "READY")]
        rows += [(str(w["pid"]), str(w["uid"]), _state(w), str(w.get("connections", "-")),
                  _rate(w), _lag(w), _age(w["connected_at"], now) + " ago",
                  _age(w["ready_at"], now) + " ago" if w["ready_at"] else "-") for w in workers]
        lines += _table(rows)
    counts = collections.Counter(w["state"] for w in workers)
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    lines.append(f"{len(workers)} worker{'s' if len(workers) != 1 else ''}"
                 + (f": {summary}" if summary else ""))
    return "\n".join(lines)


def _tls(listener: dict[str, Any]) -> str:
    """A TLS listener's certificate: its subject and the days it has left."""
    tls = listener.get("tls")
    if not isinstance(tls, dict):
        return "-"
    days = tls.get("days_left")
    left = "EXPIRED" if isinstance(days, int) and days < 0 else f"{days} days left"
    return f"{tls.get('subject')} ({left}, until {str(tls.get('not_after'))[:10]})"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def _age(iso: str, now: datetime) -> str:
    seconds = max(0, int((now - datetime.fromisoformat(iso)).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _rate(worker: dict[str, Any]) -> str:
    """Requests a second over its last heartbeats; "-" until two have come."""
    rate = worker.get("rate")
    return "-" if not isinstance(rate, (int, float)) else f"{rate:.1f}"


def _lag(worker: dict[str, Any]) -> str:
    """How late its event loop ran its last heartbeat."""
    lag = worker.get("lag")
    return "-" if not isinstance(lag, (int, float)) else f"{lag * 1000:.0f}ms"


def _state(worker: dict[str, Any]) -> str:
    """A worker's state for the table: how long a stuck one has been silent."""
    if worker["state"] == "unresponsive":
        return f"unresponsive {worker.get('silent_for', 0):.0f}s"
    return str(worker["state"])
