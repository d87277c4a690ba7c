"""wrk as the benches' load generator, counting responses per worker pid.

``run_wrk("127.0.0.1:8080", connections=32, threads=2, duration=3.0)`` runs
``wrk`` with bench/count_pids.lua and returns a :class:`WrkResult`.  With
``new_connection=True`` every request carries ``Connection: close``, so the
server closes after each response and wrk reconnects: one TCP connection per
request.  Only loopback addresses are accepted.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

LUA = Path(__file__).resolve().with_name("count_pids.lua")
MARK = "fdbench-json "


class WrkError(RuntimeError):
    """wrk is missing, failed, or printed no result line."""


@dataclass
class WrkResult:
    requests: int                  # complete responses
    seconds: float                 # wrk's own measure of the run
    per_pid: dict[int, int]        # responses per "Hello from <pid>"
    per_thread: list[dict[int, int]]   # the same, for each wrk thread
    errors: dict[str, int]         # connect, read, write, status (non-2xx/3xx), timeout
    unmatched: int                 # responses without a pid in the body
    latency_ms: dict[str, float]   # p50, p99, max

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def wrk_path() -> str:
    path = shutil.which("wrk")
    if not path:
        raise WrkError("wrk not found on PATH: install the Debian package "
                       "(apt-get install wrk), or run the benches with ./dev bench")
    return path


def run_wrk(address: str, *, connections: int, threads: int, duration: float,
            new_connection: bool = False, timeout: float = 5.0,
            scheme: str = "http") -> WrkResult:
    """Load *scheme*://*address*/ for *duration* seconds; the result of that run.

    With https, wrk does a full handshake per connection (no session reuse)
    and does not check the certificate."""
    host, _, port = address.rpartition(":")
    if not ipaddress.ip_address(host.strip("[]")).is_loopback:
        raise ValueError(f"refusing to load {address}: loopback addresses only")
    argv = [wrk_path(), "-t", str(threads), "-c", str(connections), "-d", f"{duration:g}s",
            "--timeout", f"{timeout:g}s", "-s", str(LUA)]
    if new_connection:
        argv += ["-H", "Connection: close"]
    argv.append(f"{scheme}://{address}/")
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=duration + timeout + 30)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        raise WrkError(f"{' '.join(argv)} exited {done.returncode} without a result:\n"
                       f"{done.stdout}{done.stderr}")
    raw = json.loads(lines[-1][len(MARK):])
    return WrkResult(
        requests=raw["requests"], seconds=raw["duration_us"] / 1e6,
        per_pid={int(pid): n for pid, n in raw["per_pid"].items()},
        per_thread=[{int(pid): n for pid, n in counts.items()}
                    for counts in raw.get("per_thread", [])],
        errors=raw["errors"], unmatched=raw["unmatched"],
        latency_ms={k: v / 1000 for k, v in raw["latency_us"].items()})
