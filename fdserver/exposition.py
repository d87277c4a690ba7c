"""``fdserver --metrics HOST:PORT``: the host's metrics, and its health, over HTTP.

``GET /metrics`` answers in the Prometheus text format (OpenMetrics if the
scraper asks for it), built by ``prometheus_client`` from a collector that
reads fdserver's own state at each scrape: :class:`fdserver.metrics.HostMetrics`
(what the workers reported, and fdserver's own events), the workers
connected now and the listeners' accept queues.  ``GET /health`` answers 200
while at least one worker is ready (and not unresponsive), 503 otherwise.
The metrics are listed in docs/metrics.md.

The endpoint runs on fdserver's event loop, and everything it reads from a
client is bounded: at most MAX_CLIENTS connections at once, a request head
of at most MAX_HEAD bytes within READ_TIMEOUT seconds, one request per
connection, and a response the client must take within WRITE_TIMEOUT
seconds.  A slow or hostile scraper costs one connection slot, never the
loop.  When all are taken, a newcomer makes room by closing the connection
that has waited longest for its request among those of the source with the
most waiting (a balancer's health check sends its request at once): a pile
of idle connections, or a flood of new ones from one source, cannot keep
/health from answering another.  A source is an IPv4 address or an IPv6 /64,
and all of loopback is one: a local user may connect from any 127.x.y.z.
Many hosts flooding together can still close a check.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from .accept import accept_queue
from .errors import BindError
from .listeners import Listener, bind_own, parse_bind
from .metrics import Histogram, HostMetrics, states
from .peer import Peer, estimate

log = logging.getLogger("fdserver")

MAX_CLIENTS = 64
MAX_HEAD = 8192
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0


def bind_metrics(spec: str) -> socket.socket:
    """Bind the endpoint's socket for ``--metrics HOST:PORT`` (before a privilege drop)."""
    if "=" in spec:
        raise BindError(f"--metrics {spec}: expected HOST:PORT, e.g. 127.0.0.1:9100")
    try:
        parsed = parse_bind(spec)
    except BindError as exc:
        raise BindError(str(exc).replace("--bind", "--metrics", 1)) from None
    return bind_own("--metrics", spec, parsed, backlog=64)


def address_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


class HostCollector(Collector):
    """fdserver's state as Prometheus metric families, read at each scrape."""

    def __init__(self, metrics: HostMetrics, workers: Callable[[], Iterable[Peer]],
                 listeners: list[Listener], mode: str) -> None:
        self.metrics = metrics
        self.workers = workers
        self.listeners = listeners
        self.mode = mode

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        workers = list(self.workers())
        gauge = GaugeMetricFamily("fdserver_workers", "Worker processes registered now, by "
                                  "state (unresponsive: ready, but its heartbeats stopped)",
                                  labels=["state"])
        for state, n in states(workers).items():
            gauge.add_metric([state], n)
        yield gauge
        requests = CounterMetricFamily(
            "fdserver_http_requests", "Responses written by the workers of this host, those "
            "that have exited included", labels=["code", "method", "listener"])
        for (code, method, listener), n in sorted(m.requests.items()):
            requests.add_metric([str(code), method, listener], n)
        yield requests
        durations = HistogramMetricFamily(
            "fdserver_http_request_duration_seconds", "Time from a request's start to its "
            "response's end, in the worker, over every worker of this host",
            labels=["listener"])
        for listener, histogram in sorted(m.durations.items()):
            durations.add_metric([listener], histogram.cumulative(), histogram.total)
        yield durations
        yield GaugeMetricFamily("fdserver_open_connections", "HTTP connections open in the "
                                "workers now, as they last reported them",
                                value=sum(estimate(p) for p in workers))
        lag = GaugeMetricFamily("fdserver_worker_lag_seconds_max", "The largest event-loop "
                                "lag a ready worker reported in its last heartbeat",
                                value=max((p.lag for p in workers if p.state == "ready"),
                                          default=0.0))
        yield lag
        queue = GaugeMetricFamily("fdserver_listen_queue_length", "Connections waiting in a "
                                  "listener's accept queue (the kernel's)",
                                  labels=["listener", "address"])
        limit = GaugeMetricFamily("fdserver_listen_queue_limit", "The accept queue's limit "
                                  "(the listen backlog)", labels=["listener", "address"])
        for one in self.listeners:
            found = accept_queue(one.sock)
            if found is not None:
                queue.add_metric([one.name, one.address], found[0])
                limit.add_metric([one.name, one.address], found[1])
        yield queue
        yield limit
        yield CounterMetricFamily("fdserver_worker_starts", "Workers that registered",
                                  value=m.worker_starts)
        exits = CounterMetricFamily("fdserver_worker_exits", "Workers whose registration "
                                    "ended, by the state they were in (draining: a drained "
                                    "exit; starting or ready: they died or were killed)",
                                    labels=["state"])
        for state in ("starting", "ready", "draining"):
            exits.add_metric([state], m.worker_exits.get(state, 0))
        yield exits
        yield _histogram("fdserver_drain_duration_seconds", "Time from a worker's draining to "
                         "its exit", m.drains)
        if self.mode == "dispatch":
            waits = Histogram(m.dispatch_waits.bounds, list(m.dispatch_waits.counts),
                              m.dispatch_waits.total)
            waits.counts[0] += m.dispatched_at_once
            yield _histogram("fdserver_dispatch_wait_seconds", "Time a dispatched connection "
                             "waited in fdserver for a ready worker (0: one was ready)", waits)
            yield CounterMetricFamily("fdserver_dispatch_expired", "Connections answered 503 "
                                      "after waiting --unavailable-timeout for a ready worker",
                                      value=m.dispatch_expired)
        yield CounterMetricFamily("fdserver_registrations_refused", "Connections to fdserver's "
                                  "socket refused before or at their hello (not allowed, too "
                                  "many, bad hello)", value=m.refused)
        yield CounterMetricFamily("fdserver_shed_asked_connections", "Keep-alive connections "
                                  "the busiest workers were asked to end after a response, to "
                                  "even out the load (an ask may be done in part)",
                                  value=m.shed_asked)


def _histogram(name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=[])
    family.add_metric([], histogram.cumulative(), histogram.total)
    return family


class MetricsEndpoint:
    """Serves /metrics and /health on *sock* from the running loop."""

    def __init__(self, sock: socket.socket, collector: HostCollector,
                 ready: Callable[[], int]) -> None:
        self.sock = sock
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self.ready = ready
        self.clients = 0
        # Connections still waiting for their request head, oldest first,
        # and the source each came from (source_of).
        self._waiting: dict[asyncio.WriteTransport, str] = {}
        self.address = address_of(sock)
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, sock=self.sock, limit=MAX_HEAD)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.clients >= MAX_CLIENTS:
            if not self._waiting:
                writer.transport.abort()        # all busy taking their answers
                return
            victim = self._victim()
            del self._waiting[victim]
            victim.abort()                      # its _serve ends and frees the slot
        self.clients += 1
        peer = writer.get_extra_info("peername")
        self._waiting[writer.transport] = source_of(peer[0]) if peer else ""
        try:
            try:
                answer = await self._answer(reader)
            finally:
                self._waiting.pop(writer.transport, None)
            if answer is not None:
                writer.write(answer)
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
                writer.close()
            else:
                writer.transport.abort()
        except (TimeoutError, OSError):
            writer.transport.abort()
        except Exception as exc:       # a bug of ours: say so, keep serving
            log.error("metrics endpoint: %s: %s", type(exc).__name__, exc)
            writer.transport.abort()
        finally:
            self.clients -= 1

    def _victim(self) -> asyncio.WriteTransport:
        """The oldest waiting connection of the source with the most waiting."""
        counts = collections.Counter(self._waiting.values())
        most = max(counts.values())
        return next(t for t, source in self._waiting.items() if counts[source] == most)

    async def _answer(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except asyncio.LimitOverrunError:
            return _response(431, b"request head too large\n")
        except (asyncio.IncompleteReadError, TimeoutError, ValueError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _response(400, b"bad request\n")
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return _response(405, b"only GET\n", [("Allow", "GET, HEAD")])
        path = target.partition("?")[0]
        if path == "/metrics":
            accept = next((line.partition(":")[2].strip() for line in lines[1:]
                           if line.lower().startswith("accept:")), "")
            encoder, content_type = choose_encoder(accept)
            body = encoder(self.registry)
            return _response(200, body, [("Content-Type", content_type)], head_only=method ==
                             "HEAD")
        if path == "/health":
            ready = self.ready()
            if ready:
                return _response(200, f"ok: {ready} ready\n".encode(), head_only=method ==
                                 "HEAD")
            return _response(503, b"no ready worker\n", head_only=method == "HEAD")
        return _response(404, b"not found: try /metrics or /health\n")


def source_of(host: str) -> str:
    """Where a connection comes from, as one party may spread it: an IPv4
    address, an IPv6 /64 (one host's usual share), or loopback as a whole."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def _response(code: int, body: bytes, headers: list[tuple[str, str]] | None = None, *,
              head_only: bool = False) -> bytes:
    fields = [("Content-Type", "text/plain; charset=utf-8")] if not headers or all(
        name != "Content-Type" for name, _ in headers) else []
    fields += headers or []
    fields += [("Content-Length", str(len(body))), ("Connection", "close")]
    head = f"HTTP/1.1 {code} {_REASONS[code]}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in fields) + "\r\n"
    return head.encode("latin-1") + (b"" if head_only else body)


def start_endpoint(sock: socket.socket, metrics: HostMetrics,
                   workers: Callable[[], Iterable[Peer]], listeners: list[Listener],
                   mode: str) -> MetricsEndpoint:
    """The endpoint for a Server's state; call ``await endpoint.start()`` in the loop."""
    collector = HostCollector(metrics, workers, listeners, mode)

    def ready() -> int:
        return sum(1 for p in workers() if p.state == "ready" and not p.unresponsive)
    return MetricsEndpoint(sock, collector, ready)

