"""A load generator that counts failed requests the way wrk does.

Run as its own process, so the process that drives a test or a bench does not
share a GIL with the load::

    python tests/loadclient.py --address 127.0.0.1:8080 --clients 8 \\
        --mode keepalive --duration 60 --stop-file /tmp/stop --json-out /tmp/result.json

It prints ``loadclient: started`` once the first request succeeded, runs until
the stop file appears, SIGTERM/SIGINT arrives or *duration* ends, lets the
requests in flight finish (each is bounded by ``--timeout``), and writes one
JSON object (see :func:`Stats.report`).

Every request is tried once; each of these counts as one failed request:
``connect`` (cannot connect), ``reset`` (reset or broken pipe), ``incomplete``
(the connection ended before the response did), ``malformed`` (not valid
HTTP/1.x), ``status`` (anything but 200), ``timeout``, ``socket`` (any other
socket error).

Modes:

* ``keepalive``: each client keeps one connection.  When a complete response
  says ``Connection: close``, or the server has closed the connection cleanly
  after a complete response, the client reconnects for its next request; that
  is no failure (wrk does the same).  A request sent on a connection that
  then ends before any response byte *is* a failure: no client can tell it
  was not processed.
* ``close``: a new connection per request, sending ``Connection: close``.

With ``--tls-ca PATH`` every connection is HTTPS, the server's certificate
verified against the CAs in PATH; a server closing a connection without
TLS's close_notify is then no clean close, and its next request's failure
counts like any other.

Latency is measured from the start of a request (including the connect when
one is needed) to the last byte of a complete response, for every complete
response whatever its status.

With ``--rate R`` the clients send R requests a second in all, each client on
a fixed schedule (its requests 1/R x clients apart, the clients staggered)
instead of one right after the other: an open load, as wrk2's, for latency
below saturation.  A request sent late because the previous one was still
waiting for its response counts from when it was due (the wait is the
server's doing: "coordinated omission"); one sent on time, from when it was
sent.

:class:`LoadClient` runs this file as a child process for tests and benches.
Only loopback addresses are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import json
import math
import os
import re
import signal
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

FAILURE_KINDS = ("connect", "reset", "incomplete", "malformed", "status", "timeout", "socket")
EXAMPLES_PER_KIND = 5
MAX_LINE = 8192
MAX_HEADERS = 100
MAX_BODY = 16 * 1024 * 1024
STOP_POLL = 0.05
HELLO = re.compile(rb"Hello from (\d+)")


class Failure(Exception):
    """One failed request, of one of FAILURE_KINDS."""

    def __init__(self, kind: str, message: str) -> None:
        assert kind in FAILURE_KINDS, kind
        super().__init__(message)
        self.kind = kind


@dataclass
class Response:
    version: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    keep_alive: bool


# -- HTTP/1.1 response parsing ---------------------------------------------

async def _line(reader: asyncio.StreamReader, what: str) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise Failure("malformed", f"{what} longer than {MAX_LINE} bytes") from None
    except asyncio.IncompleteReadError as exc:
        if what == "status line" and not exc.partial:
            raise Failure("incomplete", "connection closed before any response byte") from None
        raise Failure("incomplete", f"connection closed in the {what}"
                                    f" after {len(exc.partial)} bytes of it") from None
    if not line.endswith(b"\r\n"):
        raise Failure("malformed", f"{what} ends in a bare LF: {line[:80]!r}")
    return line[:-2]


async def _exactly(reader: asyncio.StreamReader, n: int, what: str) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        raise Failure("incomplete", f"connection closed in the {what}"
                                    f" after {len(exc.partial)} of {n} bytes") from None


async def _until_eof(reader: asyncio.StreamReader) -> bytes:
    chunks, total = [], 0
    while chunk := await reader.read(65536):
        total += len(chunk)
        if total > MAX_BODY:
            raise Failure("malformed", f"body over {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _header(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k == name]


async def read_response(reader: asyncio.StreamReader) -> Response:
    """Read one final response to a GET (interim 1xx responses are skipped).

    Raises Failure for a malformed or incomplete response.
    """
    while True:
        status_line = await _line(reader, "status line")
        match = re.fullmatch(rb"HTTP/(1\.[01]) ([0-9]{3})(?: .*)?", status_line)
        if not match:
            raise Failure("malformed", f"bad status line {status_line[:80]!r}")
        version, status = match.group(1).decode(), int(match.group(2))
        headers: list[tuple[str, str]] = []
        while True:
            line = await _line(reader, "header line")
            if not line:
                break
            if len(headers) >= MAX_HEADERS:
                raise Failure("malformed", f"more than {MAX_HEADERS} headers")
            name, sep, value = line.partition(b":")
            if not sep or not re.fullmatch(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise Failure("malformed", f"bad header line {line[:80]!r}")
            headers.append((name.decode().lower(), value.strip().decode("latin-1")))
        if not 100 <= status < 200:
            break

    tokens = {t.strip().lower() for v in _header(headers, "connection") for t in v.split(",")}
    keep_alive = "keep-alive" in tokens if version == "1.0" else "close" not in tokens
    encodings = [t.strip().lower() for v in _header(headers, "transfer-encoding")
                 for t in v.split(",")]
    lengths = {v.strip() for v in _header(headers, "content-length")}

    if status in (204, 304):
        body = b""
    elif encodings and encodings[-1] == "chunked":
        body = await _chunked(reader)
    elif lengths and not encodings:
        if len(lengths) != 1 or not next(iter(lengths)).isdigit():
            raise Failure("malformed", f"bad Content-Length {sorted(lengths)}")
        length = int(next(iter(lengths)))
        if length > MAX_BODY:
            raise Failure("malformed", f"Content-Length {length} over {MAX_BODY}")
        body = await _exactly(reader, length, "body")
    else:
        # No length: the body runs until the server closes the connection.
        body = await _until_eof(reader)
        keep_alive = False
    return Response(version, status, headers, body, keep_alive)


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        size_line = await _line(reader, "chunk size line")
        size_text = size_line.split(b";", 1)[0].strip()
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,8}", size_text):
            raise Failure("malformed", f"bad chunk size line {size_line[:80]!r}")
        size = int(size_text, 16)
        if size == 0:
            while await _line(reader, "trailer line"):
                pass
            return b"".join(parts)
        total += size
        if total > MAX_BODY:
            raise Failure("malformed", f"chunked body over {MAX_BODY} bytes")
        parts.append(await _exactly(reader, size, "chunk"))
        if await _exactly(reader, 2, "chunk") != b"\r\n":
            raise Failure("malformed", "chunk not followed by CRLF")


# -- the clients -------------------------------------------------------------

@dataclass
class Stats:
    """What all clients of one run saw; report() is the JSON result."""

    started_at: float = field(default_factory=time.monotonic)
    requests: int = 0
    ok: int = 0
    failures: collections.Counter = field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    reconnects: collections.Counter = field(default_factory=collections.Counter)
    connections: int = 0
    pids: collections.Counter = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    failure_window: tuple[float, ...] | None = None

    def fail(self, kind: str, message: str) -> None:
        at = round(time.monotonic() - self.started_at, 3)
        self.failure_window = (self.failure_window or (at, at))[:1] + (at,)
        self.requests += 1
        self.failures[kind] += 1
        if len(self.examples[kind]) < EXAMPLES_PER_KIND:
            self.examples[kind].append(f"t+{time.monotonic() - self.started_at:.3f}s: {message}")

    def report(self, **extra: object) -> dict:
        ordered = sorted(self.latencies)

        def pct(p: float) -> float | None:     # nearest rank, in milliseconds
            if not ordered:
                return None
            return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] * 1000, 3)

        return {
            **extra,
            "elapsed": round(time.monotonic() - self.started_at, 3),
            "requests": self.requests,
            "ok": self.ok,
            "failed": sum(self.failures.values()),
            "failures": {kind: {"count": n, "examples": self.examples[kind]}
                         for kind, n in sorted(self.failures.items())},
            # seconds since the start: the first and the last failed request
            "failure_window": list(self.failure_window) if self.failure_window else None,
            "connections": self.connections,
            "reconnects": dict(self.reconnects),
            "pids": {str(pid): n for pid, n in self.pids.most_common()},
            "latency_ms": {"count": len(ordered), "p50": pct(50), "p90": pct(90),
                           "p99": pct(99), "max": pct(100)},
        }


class Client:
    """One client: requests one after another until told to stop."""

    def __init__(self, host: str, port: int, path: str, keepalive: bool, timeout: float,
                 stats: Stats, started: asyncio.Event,
                 tls: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.keepalive, self.timeout = host, port, keepalive, timeout
        self.tls = tls
        self.stats, self.started = stats, started
        conn = "keep-alive" if keepalive else "close"
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {authority}\r\n"
                        f"User-Agent: loadclient\r\nConnection: {conn}\r\n\r\n").encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reused = False

    async def run(self, stop: asyncio.Event, deadline: float,
                  interval: float | None = None, due: float = 0.0) -> None:
        """Requests until stopped: one after another, or every *interval*
        seconds from *due* on (see --rate)."""
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                if interval is None:
                    await self.one()
                    continue
                late = time.monotonic() >= due
                if not late:
                    await asyncio.sleep(due - time.monotonic())
                    if stop.is_set():
                        break
                await self.one(since=due if late else None)
                due += interval
        finally:
            self._drop()

    async def one(self, since: float | None = None) -> None:
        begin = time.monotonic() if since is None else since
        self.reused = False
        try:
            response = await asyncio.wait_for(self._exchange(), self.timeout)
        except (TimeoutError, Failure) as exc:
            self._drop()
            if isinstance(exc, Failure):
                kind, message = exc.kind, str(exc)
            else:
                kind, message = "timeout", f"no complete response within {self.timeout:g}s"
            return self.stats.fail(kind, message + (" (reused connection)" if self.reused else ""))
        self.stats.latencies.append(time.monotonic() - begin)
        if not (self.keepalive and response.keep_alive):
            if self.keepalive:
                self.stats.reconnects["connection_close"] += 1
            self._drop()
        if response.status != 200:
            return self.stats.fail("status", f"status {response.status}")
        self.stats.requests += 1
        self.stats.ok += 1
        match = HELLO.search(response.body)
        if match:
            self.stats.pids[int(match.group(1))] += 1
        self.started.set()

    async def _exchange(self) -> Response:
        if self.writer is not None and self.reader.at_eof():
            # Closed cleanly after the last complete response: reconnect.
            self.stats.reconnects["server_closed"] += 1
            self._drop()
        if self.writer is None:
            try:
                self.reader, self.writer = await asyncio.open_connection(
                    self.host, self.port, limit=MAX_LINE, ssl=self.tls)
            except OSError as exc:
                raise Failure("connect", f"connect to {self.host}:{self.port}: "
                                         f"{exc.strerror or exc}") from None
            self.stats.connections += 1
        else:
            self.reused = True
        try:
            self.writer.write(self.request)
            await self.writer.drain()
            return await read_response(self.reader)
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
            raise Failure("reset", f"{type(exc).__name__}: {exc.strerror or exc}") from None
        except OSError as exc:
            raise Failure("socket", f"{type(exc).__name__}: {exc.strerror or exc}") from None

    def _drop(self) -> None:
        # abort(): close now, without flushing anything still buffered for writing.
        if self.writer is not None:
            self.writer.transport.abort()
            self.writer = self.reader = None


async def run_load(host: str, port: int, *, clients: int, keepalive: bool, duration: float,
                   timeout: float, path: str = "/", stop_file: str | None = None,
                   on_started=lambda: None, tls_ca: str | None = None,
                   rate: float | None = None) -> Stats:
    """Run *clients* clients until stopped; return their shared Stats.

    *rate*: requests a second in all, each client on its own schedule."""
    loop = asyncio.get_running_loop()
    stats = Stats()
    stop = asyncio.Event()
    started = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    deadline = time.monotonic() + duration

    async def watch_stop_file() -> None:
        # Polling a path is the simplest cross-process "stop" a test can give.
        while not stop.is_set():
            if stop_file and os.path.exists(stop_file):
                stop.set()
            elif time.monotonic() >= deadline:
                stop.set()
            else:
                await asyncio.sleep(STOP_POLL)

    async def announce() -> None:
        await started.wait()
        on_started()

    tls = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
    workers = [Client(host, port, path, keepalive, timeout, stats, started, tls)
               for _ in range(clients)]
    interval = clients / rate if rate else None
    now = time.monotonic()
    tasks = [asyncio.ensure_future(w.run(stop, deadline, interval,
                                         now + i * (interval or 0.0) / clients))
             for i, w in enumerate(workers)]
    helpers = [asyncio.ensure_future(watch_stop_file()), asyncio.ensure_future(announce())]
    try:
        await stop.wait()
        # Requests in flight finish (each bounded by timeout); no new ones start.
        done, pending = await asyncio.wait(tasks, timeout=timeout + 1.0)
        for task in pending:
            task.cancel()
        for task in done:
            task.result()
    finally:
        for task in tasks + helpers:
            task.cancel()
        await asyncio.gather(*tasks, *helpers, return_exceptions=True)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return stats


# -- command line --------------------------------------------------------------

def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` on a loopback address only."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise argparse.ArgumentTypeError(f"{host!r} is not an IP address") from None
        if not loopback:
            raise argparse.ArgumentTypeError(f"{host} is not a loopback address; "
                                             "loadclient only targets this machine")
    return host, int(port)


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loadclient", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", required=True, type=parse_address, metavar="HOST:PORT",
                   help="loopback address to load")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--mode", choices=("keepalive", "close"), default="keepalive")
    p.add_argument("--duration", type=_positive, default=60.0, metavar="SECONDS",
                   help="stop after this long at most (default 60)")
    p.add_argument("--timeout", type=_positive, default=5.0, metavar="SECONDS",
                   help="a request without a complete response by then fails (default 5)")
    p.add_argument("--path", default="/", help="request target (default /)")
    p.add_argument("--stop-file", metavar="PATH", help="stop once this file exists")
    p.add_argument("--json-out", metavar="PATH", help="write the result here (default stdout)")
    p.add_argument("--tls-ca", metavar="PATH", help="HTTPS, verifying the server against "
                                                   "these CA certificates")
    p.add_argument("--rate", type=_positive, metavar="PER_SECOND",
                   help="send this many requests a second in all, each client on a fixed "
                        "schedule (default: each request right after the last)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not 1 <= args.clients <= 1000:
        parser().error(f"--clients {args.clients} is not between 1 and 1000")
    host, port = args.address

    def started() -> None:
        print("loadclient: started", flush=True)

    stats = asyncio.run(run_load(host, port, clients=args.clients,
                                 keepalive=args.mode == "keepalive", duration=args.duration,
                                 timeout=args.timeout, path=args.path, stop_file=args.stop_file,
                                 on_started=started, tls_ca=args.tls_ca, rate=args.rate))
    result = stats.report(address=f"{host}:{port}", mode=args.mode, clients=args.clients)
    text = json.dumps(result, indent=2)
    if args.json_out:
        tmp = args.json_out + ".tmp"
        Path(tmp).write_text(text + "\n")
        os.replace(tmp, args.json_out)      # readers never see half a file
        print(f"loadclient: {result['requests']} requests, {result['ok']} ok, "
              f"{result['failed']} failed", flush=True)
    else:
        print(text, flush=True)
    return 0


# -- wrapper for tests and benches -------------------------------------------

class LoadClient:
    """Runs this file as a child process: start(), wait_started(), stop() -> result."""

    def __init__(self, address: str, *, clients: int = 8, mode: str = "keepalive",
                 duration: float = 120.0, timeout: float = 5.0, path: str = "/",
                 workdir: str | Path | None = None, tls_ca: str | Path | None = None,
                 rate: float | None = None) -> None:
        self.address, self.clients, self.mode = address, clients, mode
        self.tls_ca, self.rate = tls_ca, rate
        self.duration, self.timeout, self.path = duration, timeout, path
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="loadclient-"))
        self.stop_file = self.workdir / "stop"
        self.json_out = self.workdir / "result.json"
        self.proc = None

    def start(self) -> LoadClient:
        from support import Proc

        for stale in (self.stop_file, self.json_out):
            stale.unlink(missing_ok=True)
        argv = [sys.executable, str(Path(__file__).resolve()), "--address", self.address,
                "--clients", str(self.clients), "--mode", self.mode,
                "--duration", str(self.duration), "--timeout", str(self.timeout),
                "--path", self.path, "--stop-file", str(self.stop_file),
                "--json-out", str(self.json_out)]
        if self.tls_ca:
            argv += ["--tls-ca", str(self.tls_ca)]
        if self.rate:
            argv += ["--rate", f"{self.rate:g}"]
        self.proc = Proc(argv, watchdog=self.duration + self.timeout + 30.0)
        return self

    def wait_started(self, timeout: float = 15.0) -> None:
        """Wait until a first request succeeded (fails with the output if not)."""
        self.proc.wait_for_line(r"^loadclient: started$", timeout)

    def stop(self, timeout: float | None = None) -> dict:
        """Stop the load, wait for the process and return its result."""
        self.stop_file.touch()
        code = self.proc.wait(timeout if timeout is not None else self.timeout + 15.0)
        if code != 0 or not self.json_out.exists():
            raise AssertionError(f"loadclient exited {code}; output:\n{self.proc.output}")
        return json.loads(self.json_out.read_text())

    def close(self) -> None:
        if self.proc is not None:
            self.proc.close()
        if self._own_dir:
            for path in (self.stop_file, self.json_out):
                path.unlink(missing_ok=True)
            try:
                self.workdir.rmdir()
            except OSError:
                pass

    def __enter__(self) -> LoadClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
