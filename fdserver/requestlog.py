"""What an app process notes of each response: counts for fdserver, the access log.

One hook per process, :class:`RequestLog`, wrapped around the app's
``Application.log_request``: Tornado calls it exactly once for every
response a ``RequestHandler`` finishes (errors, redirects and websocket
handshakes included), with the handler, its status and its duration.  It is
installed only when something wants it (fdserver asked for metrics at the
welcome, or ``fdapp --access-log``): otherwise the request path is Tornado's
own.

Counts travel to fdserver as ``metrics`` messages (:mod:`fdserver.protocol`)
holding the *deltas* since the last one: at most one a second, only when
something changed, and a last one during the drain, once every connection
has ended and before the registration closes.  fdserver adds them to the
host's totals (:mod:`fdserver.metrics`), so a worker's counts outlive it.
What a worker killed with SIGKILL counted since its last report is lost.

Responses Tornado's HTTP layer writes without a handler (``400 Bad Request``
for a request it cannot parse) are neither counted nor logged; nor are those
of an app that is not a ``tornado.web.Application``.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import tornado.web
from tornado.log import access_log as tornado_access_log

from . import _tornado
from .protocol import DURATION_BUCKETS, METHODS, MetricsMessage, on_the_tick
from .tls import LISTENER_ATTRIBUTE

log = logging.getLogger("fdapp")
access_log = logging.getLogger("fdserver.access")

REPORT_INTERVAL = 1.0
# Rows per metrics message: far below the 64 KiB frame limit.
MAX_ROWS = 512
ACCESS_FORMATS = ("text", "json")
# Control characters and quotes in a logged path, escaped: one line per request.
_ESCAPES = {c: f"\\x{c:02x}" for c in range(0x20)} | {0x7f: "\\x7f", 0x22: '\\"',
                                                      0x5c: "\\\\"}


def skip_unlogged_lines(app: Any) -> None:
    """Have Tornado's ``log_request`` format its access line only if its logger
    will write it.

    ``Application.log_request`` builds the line (3.4 us a response here)
    before ``tornado.access`` decides to drop it, and fdapp drops its lines
    below WARNING: most responses formatted a line nobody read.  Only for
    Tornado's own ``log_request`` (not a subclass's), and not while the app's
    settings have a ``log_function``, which gets every response as before.
    Installed before :meth:`RequestLog.install`, which wraps what it finds.
    """
    if not (isinstance(app, tornado.web.Application)
            and type(app).log_request is tornado.web.Application.log_request):
        return
    original = app.log_request
    settings = app.settings

    def log_request(handler: Any) -> None:
        if _tornado_writes(settings, handler.get_status()):
            original(handler)

    # For RequestLog.install: one function a response, not two in a row.
    log_request._fdserver_tornado = (original, settings)  # type: ignore[attr-defined]
    app.log_request = log_request  # type: ignore[method-assign]


def _tornado_writes(settings: dict[str, Any], status: int) -> bool:
    """Whether Tornado's log_request would write (or pass on) a line for *status*."""
    # Tornado's levels: info below 400, warning below 500, error above.
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    return "log_function" in settings or tornado_access_log.isEnabledFor(level)


class RequestLog:
    """Counts responses for fdserver and writes the access log, as asked.

    *listeners* are (name, family, address) of the listeners this process
    serves: the listener a connection came in on is read off its local
    address, once per connection, and only when there is more than one name.
    """

    def __init__(self, listeners: list[tuple[str, str, str]], *,
                 access_log_format: str | None = None) -> None:
        names = sorted({name for name, _, _ in listeners})
        self._only_name = names[0] if len(names) == 1 else None
        self._by_address: dict[tuple[str, int], str] = {}
        self._by_port: dict[int, str] = {}
        for name, _, address in listeners:
            host, _, port = address.rpartition(":")
            if port.isdigit():
                self._by_address[(host.strip("[]"), int(port))] = name
                self._by_port.setdefault(int(port), name)
        self.access_format = access_log_format
        self.counting = False
        # Since the last report: (status, method, listener, duration bucket) ->
        # responses, and listener -> seconds.  One dict update a response; the
        # rows and histograms are summed from it once a report.
        self._counts: dict[tuple[int, str, str, int], int] = {}
        self._seconds: dict[str, float] = {}
        self._pid = os.getpid()

    # -- the hook ------------------------------------------------------------

    def install(self, app: Any) -> bool:
        """Wrap *app*'s log_request; False (and said once) if it has none."""
        original = getattr(app, "log_request", None)
        if not callable(original):
            log.warning("the app is a %s, not a tornado.web.Application: its requests are "
                        "neither counted nor access-logged", type(app).__name__)
            return False
        if getattr(original, "_fdserver_request_log", None) is not None:
            return True            # installed already (a re-registration)

        # Counted first: an app's own log_function that raises must not make
        # a response go uncounted.
        record = self.record
        tornado_own = getattr(original, "_fdserver_tornado", None)
        if tornado_own is None:
            def log_request(handler: Any) -> None:
                record(handler)
                original(handler)
        else:
            # Over skip_unlogged_lines': its test inline, a call less a response.
            inner, settings = tornado_own

            def log_request(handler: Any) -> None:
                if _tornado_writes(settings, record(handler)):
                    inner(handler)

        log_request._fdserver_request_log = self    # type: ignore[attr-defined]
        app.log_request = log_request
        return True

    def record(self, handler: Any) -> int:
        """Count and log one response; its status."""
        request = handler.request
        status: int = handler.get_status()
        duration = request.request_time()
        listener = self._only_name or self._listener_of(request)
        if self.counting:
            method = request.method
            # Bucket i holds durations <= DURATION_BUCKETS[i]; the last, the rest.
            key = (status, method if method in METHODS else "other", listener,
                   bisect.bisect_left(DURATION_BUCKETS, duration))
            counts = self._counts
            counts[key] = counts.get(key, 0) + 1
            seconds = self._seconds
            seconds[listener] = seconds.get(listener, 0.0) + duration
        if self.access_format and access_log.isEnabledFor(logging.INFO):
            access_log.info(self._access_line(handler, request, status, duration, listener))
        return status

    def _listener_of(self, request: Any) -> str:
        stream = getattr(request.connection, "stream", None)
        # fdapp's acceptor names each connection's listener (see fdserver.listener_of).
        name = getattr(stream, LISTENER_ATTRIBUTE, None)
        if name is None:
            name = "other"
            sock = getattr(stream, "socket", None)
            try:
                local = sock.getsockname() if sock is not None else None
            except OSError:
                local = None
            if isinstance(local, tuple):
                name = (self._by_address.get((local[0], local[1]))
                        or self._by_port.get(local[1], "other"))
            if stream is not None:
                setattr(stream, LISTENER_ATTRIBUTE, name)
        return str(name)

    def _access_line(self, handler: Any, request: Any, status: int, duration: float,
                     listener: str) -> str:
        size = _tornado.response_length(handler)
        if self.access_format == "json":
            return json.dumps({
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "pid": self._pid, "listener": listener, "client": request.remote_ip,
                "method": request.method, "path": request.uri, "status": status,
                "bytes": size, "duration": round(duration, 6)}, ensure_ascii=False)
        path = str(request.uri).translate(_ESCAPES)
        return (f"{self._pid} {listener} {request.remote_ip} "
                f"\"{str(request.method).translate(_ESCAPES)} {path}\" {status} "
                f"{'-' if size is None else size} {duration * 1000:.3f}ms")

    # -- reports -------------------------------------------------------------

    def take_reports(self) -> list[MetricsMessage]:
        """The deltas since the last call, as messages (none if nothing changed)."""
        if not self._counts:
            return []
        requests: dict[tuple[int, str, str], int] = {}
        histograms: dict[str, list[int]] = {}
        for (code, method, listener, bucket), n in self._counts.items():
            requests[(code, method, listener)] = requests.get((code, method, listener), 0) + n
            histograms.setdefault(listener, [0] * (len(DURATION_BUCKETS) + 1))[bucket] += n
        messages = _messages(requests, histograms, self._seconds)
        self._counts = {}
        self._seconds = {}
        return messages


def _messages(requests: dict[tuple[int, str, str], int], histograms: dict[str, list[int]],
              seconds: dict[str, float]) -> list[MetricsMessage]:
    """Counts per (status, method, listener), and per listener its histogram and
    seconds, as metrics messages of at most MAX_ROWS rows each."""
    rows: list[list[Any]] = [[*key, n] for key, n in requests.items()]
    durations: list[list[Any]] = [[listener, counts, round(seconds.get(listener, 0.0), 6)]
                                  for listener, counts in histograms.items()]
    return [{"type": "metrics", "requests": rows[start:start + MAX_ROWS],
             "durations": durations if start == 0 else []}
            for start in range(0, max(len(rows), 1), MAX_ROWS)]


class Reporter:
    """Sends a RequestLog's deltas through *send* every REPORT_INTERVAL, when changed,
    on the ticks of *clock* (the loop's time) that every worker shares."""

    def __init__(self, requests: RequestLog, send: Callable[[MetricsMessage], bool],
                 call_later: Callable[[float, Callable[[], None]], Any],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.requests = requests
        self._send = send
        self._call_later = call_later
        self._clock = clock
        self._due = 0.0                  # the tick of the next report
        self._timer: Any = None
        self._held: list[MetricsMessage] = []

    def start(self) -> None:
        self.requests.counting = True
        if self._timer is None:
            self._schedule()

    def _tick(self) -> None:
        self._schedule()
        self.flush()

    def _schedule(self) -> None:
        now = self._clock()
        self._due = on_the_tick(now, REPORT_INTERVAL, last=self._due)
        self._timer = self._call_later(self._due - now, self._tick)

    def flush(self) -> None:
        """Send what is counted now; kept for the next try if there is no channel."""
        self._held += self.requests.take_reports()
        while self._held:
            if not self._send(self._held[0]):
                if len(self._held) > 64:      # no fdserver for long: merge, stay bounded
                    self._held = _merged(self._held)
                return
            self._held.pop(0)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _merged(messages: list[MetricsMessage]) -> list[MetricsMessage]:
    requests: dict[tuple[int, str, str], int] = {}
    histograms: dict[str, list[int]] = {}
    seconds: dict[str, float] = {}
    for message in messages:
        for code, method, listener, n in message["requests"]:
            requests[(code, method, listener)] = requests.get((code, method, listener), 0) + n
        for listener, counts, total in message["durations"]:
            histogram = histograms.setdefault(listener, [0] * (len(DURATION_BUCKETS) + 1))
            for i, n in enumerate(counts):
                histogram[i] += n
            seconds[listener] = seconds.get(listener, 0.0) + total
    return _messages(requests, histograms, seconds)
