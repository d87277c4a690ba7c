"""The wire format spoken over fdserver's Unix socket: bytes in, messages out.

No sockets here; :mod:`fdserver.transport` moves these bytes and the
descriptors that ride along with them.

Frame (every message, both directions)::

    offset  size  field
    0       2     magic     b"FD"
    2       1     framing   1 (FRAME_VERSION); anything else is refused
    3       1     reserved  0
    4       4     length    payload size, big-endian uint32, <= MAX_PAYLOAD
    8       n     payload   UTF-8 JSON object with a string "type"

A frame that carries descriptors says how many in its ``"fds"`` field and
has them attached (SCM_RIGHTS) to its first byte, at most MAX_FDS_PER_FRAME
of them.  Anything that does not parse is a protocol error: the peer gets
an ``error`` message and the connection is closed.

Conversation, protocol version 1 (``PROTOCOL_VERSION``)::

    client -> hello      {"versions": [1], "role": "worker" | "ctl",
                          "features": ["share", "dispatch", "heartbeat", "recycle",
                                       "tls", "metrics", "proxy", "shed"],
                                       (optional: the optional messages this
                                        worker reads or sends)
                          "resume": {"state": "ready"}}       (optional)
    server -> welcome    {"version": 1, "server_pid": int, "listeners": int,
                          "handback": bool, "mode": "shared" | "dispatch",
                          "token": str,        (with "handback": true only)
                          "tls": bool,         (TLS material follows: see below)
                          "metrics": bool}     (true: send metrics; only to a
                                                worker with the "metrics" feature)
  worker, first registration (no "resume"):
    server -> listeners  {"listeners": [{"name", "family", "address", "tls"}, ...],
                          "fds": n, "more": bool}        (repeated while more)
    server -> tls        {"serial": n, "chain": PEM, "key": PEM, "listeners": [name, ...],
                          "ca": PEM, "ciphers": str}   (if a listener is TLS; "ca" and
                                                        "ciphers" optional)
  worker re-registering after an fdserver restart ("resume"; keeps its sockets):
    worker -> handback   {"listeners": [{"name", "family", "address"}, ...],
                          "fds": n, "token": the welcome's,
                          "more": bool}        (more frames follow: > 252 listeners)
                         (only if the welcome asked for it; fdserver counts a
                          resumed worker "starting" until its handback shows
                          it holds every listener fdserver serves)
  any worker, any time after:
    worker -> state      {"state": "ready" | "draining"}
    worker -> load       {"connections": open now, "received": dispatched so far}
    worker -> heartbeat  {"lag": seconds,    ("heartbeat": every HEARTBEAT_INTERVAL)
                          "requests": n,     (optional: served so far, for its rate)
                          "connections": n, "received": n}
                         (optional, together: the load, when it changed, in
                          place of a load message; only if the welcome said
                          "beat_load": with hundreds of workers, one message
                          a second each instead of two)
    worker -> metrics    {"requests": [[status, method, listener, n], ...],
                          "durations": [[listener, [n per DURATION_BUCKETS + 1],
                                         seconds], ...]}
                         (only if the welcome said "metrics": the responses
                          since the last report; at most one a second, and a
                          last one during the drain)
    worker -> recycle    {"requests": n,     ("recycle": may I drain and exit now?)
                          "drain": seconds}  (optional: the most its drain and
                                              shutdown take; fdserver waits that
                                              long, up to MAX_DRAIN, before the
                                              next turn)
    server -> recycle    {}                  (your turn: one worker at a time)
    server -> tls        {"serial": n, ...}  (renewed material, after a reload)
    worker -> tls        {"serial": n, "ok": bool, "error": str}   (whether it took it)
    server -> shed       {"connections": n}  (end n keep-alive connections after their
                                              next responses, within a while: the load
                                              is uneven; only to a worker with the
                                              "shed" feature)
  shared mode (workers accept on the listeners themselves):
    server -> share      {"connections": total open, "workers": ready workers}
  dispatch mode (fdserver accepts; workers hold the listeners only for handback):
    server -> connections {"listener": name, "family": "AF_INET" | "AF_INET6",
                           "peers": [[host, port], ...], "fds": n}
                           (the connections accepted for this worker in one go)
    server -> released   {}    (answer to "draining": no more connections follow)
  ctl only (request -> answer, any number):
    ctl    -> status     {}
    server -> status     {"server": {...}, "listeners": [...], "workers": [...]}
    ctl    -> wait       {"pid": int, "state": str, "timeout": float}
    server -> waited     {"pid": int, "state": str | null, "ok": bool}
    ctl    -> reload     {}
    server -> reloaded   {"ok": bool, "message": str, "certificate": {...}, "workers": n}
    ctl    -> drain      {"wait": seconds}   (optional: answer once every balancer
                                              that asked the agent lately was told)
    ctl    -> undrain    {}
    server -> drained    {"drained": bool, "persisted": bool,
                          "told": [host, ...], "waiting": [host, ...]}
                         (only with --agent; else an error)
  any time:
    server -> error      {"message": str}       then the server closes

Who the peer is comes from SO_PEERCRED on the server's side, never from the
payload.  A worker's connection stays open for the worker's whole life: it is
the registration, and its end (EOF) means the process is gone.

"""

import json
import struct
from typing import (
    Any,
    Literal,
    NotRequired,
    TypedDict,
    TypeVar,
    cast,
    get_args,
    get_origin,
    get_type_hints,
)

from .errors import ProtocolError

# No ``from __future__ import annotations`` here: the schema below is read off
# the message classes at import time, NotRequired included.

MAGIC = b"FD"
FRAME_VERSION = 1
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
HEADER = struct.Struct("!2sBBI")
MAX_PAYLOAD = 64 * 1024            # what fdserver accepts from any peer
MAX_ANSWER = 16 * 1024 * 1024      # what a client accepts (a status of many workers)
MAX_INT = 2 ** 53                  # integers JSON peers agree on
# SCM_MAX_FD in the Linux kernel is 253; keep one spare, as the design asks.
MAX_FDS_PER_FRAME = 252

# What a metrics report may name: the methods counted by name (others are
# "other"), and the upper bounds of the request duration histogram's buckets
# (seconds; Prometheus's defaults), the +Inf bucket after them.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT",
                     "TRACE"})
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0)

# -- the words of the conversation ----------------------------------------------------

Role = Literal["worker", "ctl"]
# Who accepts connections: every worker on the shared listeners, or fdserver.
Mode = Literal["shared", "dispatch"]
# What a worker reports of itself.
Reported = Literal["ready", "draining"]
# A worker's life as fdserver sees it; fdctl can wait for each.
WorkerState = Literal["starting", "ready", "draining", "gone"]
# Any peer's, in the status: before its hello, and a ctl's.
PeerState = Literal["handshake", "starting", "ready", "draining", "gone", "ctl"]
# How long a worker that sends heartbeats (feature "heartbeat") may stay
# silent before its status says "unresponsive", in heartbeat intervals.
HEARTBEAT_INTERVAL = 1.0
LATE_BEATS = 3


# Shared mode: each of REPORT_WORKERS workers reports its load at most every
# SHARED_REPORT_INTERVAL, and beyond that many workers each less often.  A
# busy worker's reports seldom share a tick with the others': at 20 ms, two
# busy workers woke fdserver 100 times a second (2% of a core, the budget).
SHARED_REPORT_INTERVAL = 0.05
REPORT_WORKERS = 2
MAX_REPORT_INTERVAL = 1.0

# The longest drain a worker's recycle ask counts (a worker could claim any).
MAX_DRAIN = 600.0


def shared_report_interval(workers: int) -> float:
    """How often a worker in shared mode reports its load, with *workers* ready:
    all together about as often as REPORT_WORKERS workers would."""
    return min(SHARED_REPORT_INTERVAL * max(1, workers / REPORT_WORKERS), MAX_REPORT_INTERVAL)


def on_the_tick(now: float, interval: float, last: float = 0.0) -> float:
    """The first whole multiple of *interval* after *now*, on the monotonic clock,
    and after *last* (the previous tick): a timer of a coarser clock (uvloop's
    is in ms) may run a moment before its tick, and must not get it again.

    Every event loop's ``time()`` reads CLOCK_MONOTONIC, which Linux keeps
    system-wide, so workers that send heartbeats and load reports on these
    ticks send them together, and fdserver reads them in one wakeup: with 256
    workers that costs it a fifth of the CPU that one wakeup per message
    does (docs/modes.md).
    """
    tick = (max(now, last) // interval + 1) * interval
    # A tick divided by an interval that binary floating point cannot hold
    # exactly (0.05) may floor to the one before, and give the same tick again.
    return tick + interval if tick <= last else tick


ROLES: tuple[Role, ...] = get_args(Role)
REPORTED_STATES: tuple[Reported, ...] = get_args(Reported)
WAITABLE_STATES: tuple[WorkerState, ...] = get_args(WorkerState)

_T = TypeVar("_T")


def one_of(value: object, choices: tuple[_T, ...]) -> _T | None:
    """*value* if it is one of *choices* (typed as they are), else None."""
    for choice in choices:
        if value == choice:
            return choice
    return None


# -- messages -------------------------------------------------------------------------
#
# One class per message type.  Required fields are the schema validate()
# checks, in this order, with their JSON types (float: any number); optional
# fields are not checked, so a reader checks them itself (typed ``object``).

class HelloMessage(TypedDict):
    type: Literal["hello"]
    versions: list[Any]
    role: str
    pid: NotRequired[object]                # informational: SO_PEERCRED is what counts
    features: NotRequired[object]
    resume: NotRequired[object]


class WelcomeMessage(TypedDict):
    type: Literal["welcome"]
    version: int
    server_pid: int
    listeners: int
    handback: NotRequired[object]
    mode: NotRequired[object]
    token: NotRequired[object]
    tls: NotRequired[object]
    metrics: NotRequired[object]
    beat_load: NotRequired[object]


class ListenersMessage(TypedDict):
    type: Literal["listeners"]
    listeners: list[Any]                    # [{"name", "family", "address"}, ...]
    fds: int
    more: bool


class StateMessage(TypedDict):
    type: Literal["state"]
    state: str


class HandbackMessage(TypedDict):
    type: Literal["handback"]
    listeners: list[Any]
    fds: int
    token: NotRequired[object]
    more: NotRequired[object]               # more than MAX_FDS_PER_FRAME: more frames follow


class LoadMessage(TypedDict):
    type: Literal["load"]
    connections: int
    received: int


class ShareMessage(TypedDict):
    type: Literal["share"]
    connections: int
    workers: int


class ShedMessage(TypedDict):
    type: Literal["shed"]
    connections: int


class ConnectionsMessage(TypedDict):
    type: Literal["connections"]
    listener: str
    peers: list[Any]                        # [[host, port], ...]
    fds: int
    family: NotRequired[object]


class ReleasedMessage(TypedDict):
    type: Literal["released"]


class StatusMessage(TypedDict):
    type: Literal["status"]
    # The answer's; a request has none.
    server: NotRequired[dict[str, Any]]
    listeners: NotRequired[list[dict[str, Any]]]
    workers: NotRequired[list[dict[str, Any]]]


class WaitMessage(TypedDict):
    type: Literal["wait"]
    pid: int
    state: str
    timeout: float


class WaitedMessage(TypedDict):
    type: Literal["waited"]
    pid: int
    ok: bool
    state: NotRequired[object]


class HeartbeatMessage(TypedDict):
    type: Literal["heartbeat"]
    lag: float                              # how late the worker's loop ran this beat (s)
    requests: NotRequired[object]           # requests served so far
    connections: NotRequired[object]        # with "received": the load, as in a load message
    received: NotRequired[object]


class RecycleMessage(TypedDict):
    # worker -> server: "may I recycle now?"; server -> worker: "your turn"
    type: Literal["recycle"]
    requests: NotRequired[object]           # what the worker served (the ask only)
    drain: NotRequired[object]              # the most its drain and shutdown take (s)


class TLSMessage(TypedDict):
    # server -> worker: the certificate material (feature "tls");
    # worker -> server: whether it took it ("ok", or "error").
    type: Literal["tls"]
    serial: int                             # which material: one more per reload
    chain: NotRequired[object]              # PEM: the certificate, then its chain
    key: NotRequired[object]                # PEM: the private key
    ca: NotRequired[object]                 # PEM: CAs for client certificates
    ciphers: NotRequired[object]            # an OpenSSL cipher list
    listeners: NotRequired[object]          # the names of the listeners that serve TLS
    tickets: NotRequired[object]            # hex: session ticket keys all workers share
    ok: NotRequired[object]
    error: NotRequired[object]


class ReloadMessage(TypedDict):
    # ctl -> server: re-read the certificate and key and push them to the workers
    type: Literal["reload"]


class ReloadedMessage(TypedDict):
    type: Literal["reloaded"]
    ok: bool
    message: str
    certificate: NotRequired[object]        # what is in service: subject, not_after, ...
    workers: NotRequired[object]            # how many workers took it


class MetricsMessage(TypedDict):
    # worker -> server, the responses since its last report (feature "metrics")
    type: Literal["metrics"]
    requests: list[Any]                     # [[status, method, listener, n], ...]
    durations: list[Any]                    # [[listener, [n per bucket], seconds], ...]


class DrainMessage(TypedDict):
    type: Literal["drain"]
    wait: NotRequired[object]               # seconds: answer once the balancers know


class UndrainMessage(TypedDict):
    type: Literal["undrain"]


class DrainedMessage(TypedDict):
    type: Literal["drained"]
    drained: bool
    persisted: NotRequired[object]
    told: NotRequired[object]               # balancers the agent told "drain"
    waiting: NotRequired[object]            # balancers not told yet (at the wait's end)


class ErrorMessage(TypedDict):
    type: Literal["error"]
    message: str


Message = (HelloMessage | WelcomeMessage | ListenersMessage | StateMessage | HandbackMessage
           | LoadMessage | ShareMessage | ShedMessage | ConnectionsMessage | ReleasedMessage
           | StatusMessage | WaitMessage | WaitedMessage | HeartbeatMessage | RecycleMessage
           | TLSMessage | ReloadMessage | ReloadedMessage | MetricsMessage | DrainMessage
           | UndrainMessage | DrainedMessage | ErrorMessage)


def _json_type(hint: Any) -> type | tuple[type, ...]:
    if hint is float:
        return (int, float)                 # JSON has one kind of number
    origin: type = get_origin(hint) or hint     # list[Any] -> list
    return origin


# Required fields per message type, with the JSON types they must have.
_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    get_args(get_type_hints(kind)["type"])[0]: {
        field: _json_type(hint) for field, hint in get_type_hints(kind).items()
        if field in kind.__required_keys__ and field != "type"}
    for kind in get_args(Message)
}


def fd_count(message: Message) -> int:
    """How many descriptors ride with *message* (validate() checked the count)."""
    count = message.get("fds", 0)
    return count if isinstance(count, int) else 0


def batches(items: list[_T]) -> list[list[_T]]:
    """*items* cut into runs of at most MAX_FDS_PER_FRAME: one frame's descriptors each."""
    return [items[i:i + MAX_FDS_PER_FRAME] for i in range(0, len(items), MAX_FDS_PER_FRAME)]


def encode(message: Message, limit: int = MAX_PAYLOAD) -> bytes:
    """Return one frame holding *message* (a dict with a ``"type"``).

    *limit* is the largest payload the receiver accepts: fdserver takes
    MAX_PAYLOAD from anyone; its answers may be up to MAX_ANSWER.
    """
    validate(message)
    try:
        payload = _ENCODER.encode(message).encode()
    except ValueError as exc:       # NaN or Infinity: not JSON
        raise ProtocolError(f"{message['type']} message is not valid JSON: {exc}") from None
    if len(payload) > limit:
        raise ProtocolError(
            f"{message['type']} message of {len(payload)} bytes exceeds "
            f"the {limit}-byte frame limit"
        )
    return HEADER.pack(MAGIC, FRAME_VERSION, 0, len(payload)) + payload


def validate(message: Any) -> Message:
    """Check *message* against the schema of its type; return it."""
    if not isinstance(message, dict):
        raise ProtocolError("message is not a JSON object")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("message has no string 'type'")
    schema = _SCHEMA.get(kind)
    if schema is None:
        raise ProtocolError(f"unknown message type {kind[:40]!r}")
    for field, expected in schema.items():
        value = message.get(field)
        # bool is an int in Python; JSON keeps them apart, so do we.
        if not isinstance(value, expected) or (
            isinstance(value, bool) and expected is not bool
        ) or (isinstance(value, (int, float)) and not -MAX_INT <= value <= MAX_INT):
            raise ProtocolError(f"{kind} message has a missing or bad {field!r}")
    fds = message.get("fds", 0)
    if not isinstance(fds, int) or isinstance(fds, bool):
        raise ProtocolError(f"{kind} message has a bad 'fds' count")
    if not 0 <= fds <= MAX_FDS_PER_FRAME:
        raise ProtocolError(f"{kind} message announces {fds} descriptors "
                            f"(0..{MAX_FDS_PER_FRAME} allowed)")
    return cast(Message, message)       # as checked above


class Decoder:
    """Incremental frame parser: feed bytes, get complete messages.

    After a ProtocolError the decoder is poisoned: the stream has lost its
    framing and the only safe thing left is to close the connection.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buffer = bytearray()
        self._max_payload = max_payload
        self._failed: ProtocolError | None = None

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message]:
        if self._failed:
            raise self._failed
        self._buffer += data
        messages: list[Message] = []
        try:
            while True:
                message = self._next()
                if message is None:
                    return messages
                messages.append(message)
        except ProtocolError as exc:
            self._failed = exc
            raise

    def _next(self) -> Message | None:
        buf = self._buffer
        # Check the magic as soon as its bytes are in, so garbage fails fast.
        if buf[: len(MAGIC)] != MAGIC[: len(buf)]:
            raise ProtocolError("bad frame magic (not an fdserver peer?)")
        if len(buf) < HEADER.size:
            return None
        _, framing, _, length = HEADER.unpack_from(buf)
        if framing != FRAME_VERSION:
            raise ProtocolError(f"unsupported frame version {framing}")
        if length > self._max_payload:
            raise ProtocolError(f"frame of {length} bytes exceeds the "
                                f"{self._max_payload}-byte limit")
        end = HEADER.size + length
        if len(buf) < end:
            return None
        payload = bytes(buf[HEADER.size:end])
        del buf[:end]
        try:
            message = _DECODER.decode(payload.decode("utf-8"))
        except RecursionError:
            raise ProtocolError("frame payload JSON is nested too deeply") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"frame payload is not UTF-8 JSON: {exc}") from None
        return validate(message)


def _no_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not, and neither do we.
    raise ValueError(f"{name} is not JSON")


# Built once: json.dumps/loads with options build a new coder on every call,
# which is a fair part of a dispatched connection's cost.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def negotiate(hello: HelloMessage) -> int:
    """Pick the protocol version for a client's hello, or raise ProtocolError."""
    offered = [v for v in hello["versions"] if isinstance(v, int) and not isinstance(v, bool)]
    common = set(offered) & set(SUPPORTED_VERSIONS)
    if not common:
        raise ProtocolError(
            f"no common protocol version: server speaks "
            f"{list(SUPPORTED_VERSIONS)}, client offered {hello['versions'][:8]}"
        )
    if hello["role"] not in ROLES:
        raise ProtocolError(f"unknown role {hello['role'][:40]!r}")
    return max(common)
