"""Property-based fuzzing (hypothesis) of the wire format and of a live fdserver.

Two parts:

* The frame decoder, in process: every valid message survives encode() and
  any chunking of the byte stream; any bytes at all make Decoder.feed return
  validated messages or raise ProtocolError, never anything else, and a
  decoder that raised stays poisoned.
* Hostile peers against one real fdserver (and one real fdapp worker, so
  there is something to break): random conversations of raw bytes and
  hand-built frames, with descriptors of every cheap kind attached.  After
  the run, fdserver must be alive, must have logged no traceback, must hold
  no more descriptors than before, and must still serve its worker (fdctl
  status, HTTP).

Nothing here checks exact error texts: only the shape of what fdserver does.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import select
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fdserver.ctl import Control
from fdserver.errors import ProtocolError
from fdserver.protocol import (
    _SCHEMA,
    FRAME_VERSION,
    HEADER,
    MAGIC,
    MAX_ANSWER,
    MAX_FDS_PER_FRAME,
    MAX_INT,
    MAX_PAYLOAD,
    Decoder,
    encode,
    validate,
)
from fdserver.transport import PARTIAL_FRAME_DEADLINE, Channel, close_fds

from support import PROJECT, Proc, http_get, run, script, wait_until

FAST = settings(deadline=None, database=None, max_examples=200,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def frame(payload: bytes, version: int = FRAME_VERSION, length: int | None = None,
          reserved: int = 0) -> bytes:
    """A frame built by hand: the encoder would refuse most of what we send."""
    size = len(payload) if length is None else length
    return HEADER.pack(MAGIC, version, reserved, size) + payload


# -- JSON values ----------------------------------------------------------------------

_keys = st.text(max_size=8)
# Values that survive a JSON round trip unchanged (no NaN, no infinities).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=12)
# Anything Python's json module writes, NaN and Infinity included (as bare words).
wild_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12) | st.floats()
    | st.sampled_from([2 ** 53, 2 ** 53 + 1, -(2 ** 53) - 1, 2 ** 64, 10 ** 30, 1e300, -0.0]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=12)

_BY_TYPE = {
    int: st.integers(-MAX_INT, MAX_INT),
    float: st.floats(-MAX_INT, MAX_INT, allow_nan=False),
    str: st.text(max_size=20),
    bool: st.booleans(),
    list: st.lists(json_values, max_size=4),
    dict: st.dictionaries(_keys, json_values, max_size=4),
}


def _of_type(field: str, expected: type | tuple[type, ...]) -> st.SearchStrategy:
    if field == "fds":
        return st.integers(0, MAX_FDS_PER_FRAME)
    types = expected if isinstance(expected, tuple) else (expected,)
    return st.one_of([_BY_TYPE.get(t, json_values) for t in types])


@st.composite
def valid_messages(draw) -> dict[str, Any]:
    """A message of a schema type with every required field of the right type."""
    kind = draw(st.sampled_from(sorted(_SCHEMA)))
    schema = _SCHEMA[kind]
    message = {field: draw(_of_type(field, expected)) for field, expected in schema.items()}
    extras = draw(st.dictionaries(
        _keys.filter(lambda k: k not in schema and k not in ("type", "fds")), json_values,
        max_size=3))
    message.update(extras)
    if "fds" not in schema and draw(st.booleans()):
        message["fds"] = draw(st.integers(0, MAX_FDS_PER_FRAME))
    message["type"] = kind
    return message


def _schema_shaped(kind: str, values: st.SearchStrategy) -> st.SearchStrategy:
    """A message of *kind* whose fields are sometimes right, sometimes anything."""
    schema = _SCHEMA.get(kind, {})
    fields = {f: st.one_of(_of_type(f, t), values) for f, t in schema.items()}
    return st.fixed_dictionaries(
        {"type": st.just(kind)},
        optional={**fields, "fds": st.integers(-3, MAX_FDS_PER_FRAME + 3) | values})


hostile_objects = st.one_of(
    st.sampled_from(sorted(_SCHEMA) + ["teleport", "", "hello\x00"]).flatmap(
        lambda kind: _schema_shaped(kind, wild_values)),
    st.dictionaries(_keys, wild_values, max_size=5),
    wild_values,
)


# -- payload and stream texts -----------------------------------------------------------

_NUMBERS = [b"1" + b"0" * 5000, b"-" + b"9" * 4400, b"1e999", b"-1e999", b"1e-999", b"NaN",
            b"Infinity", b"-Infinity", b"9007199254740993", b"1.5e300", b"0x10", b"01", b"1.",
            b"true", b"null"]


@st.composite
def hostile_payloads(draw) -> bytes:
    """JSON texts, mostly broken in one of the ways peers break them."""
    text = json.dumps(draw(hostile_objects)).encode()
    how = draw(st.sampled_from(["plain", "plain", "deep", "number", "non-utf8", "truncated",
                                "surrogate", "binary"]))
    if how == "deep":
        n = draw(st.integers(1, 40_000))
        open_, close = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"),
                                             (b'{"type":"hello","x":[', b"]}")]))
        closed = draw(st.booleans())
        return open_ * n + (b"1" if open_.endswith(b":") else b"") + (close * n if closed else b"")
    if how == "number":
        number = draw(st.sampled_from(_NUMBERS))
        field = draw(st.sampled_from([b"pid", b"timeout", b"fds", b"extra", b"connections"]))
        kind = draw(st.sampled_from([b"wait", b"load", b"hello", b"handback"]))
        return (b'{"type":"' + kind + b'","pid":1,"state":"ready","timeout":1,"connections":0,'
                b'"received":0,"versions":[1],"role":"ctl","listeners":[],"' + field + b'":'
                + number + b"}")
    if how == "non-utf8":
        at = draw(st.integers(0, len(text)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80",
                                     b"\xf4\x90\x80\x80"]))
        return text[:at] + junk + text[at:]
    if how == "truncated":
        return text[:draw(st.integers(0, len(text)))]
    if how == "surrogate":
        return b'{"type":"\\ud800","role":"\\udfff","versions":[1]}'
    if how == "binary":
        return draw(st.binary(max_size=64))
    return text


@st.composite
def hostile_pieces(draw) -> bytes:
    """One piece of a hostile byte stream."""
    how = draw(st.sampled_from(["frame", "frame", "frame", "valid", "version", "length",
                                "over-limit", "raw", "magic-prefix"]))
    if how == "valid":
        return encode(draw(valid_messages().filter(_encodable)))
    if how == "raw":
        return draw(st.binary(max_size=64))
    if how == "magic-prefix":
        return MAGIC[:draw(st.integers(0, 2))] + draw(st.binary(max_size=16))
    if how == "over-limit":
        return frame(draw(st.binary(max_size=16)), length=draw(
            st.integers(MAX_PAYLOAD + 1, 2 ** 32 - 1)))
    payload = draw(hostile_payloads())
    if how == "version":
        return frame(payload, version=draw(st.integers(0, 255)),
                     reserved=draw(st.integers(0, 255)))
    if how == "length":
        return frame(payload, length=draw(st.integers(0, MAX_PAYLOAD)))
    return frame(payload)


def _encodable(message: dict) -> bool:
    try:
        encode(message)
    except ProtocolError:
        return False
    return True


hostile_streams = st.lists(hostile_pieces(), min_size=1, max_size=4).map(b"".join)


def chunks_of(data: st.DataObject, stream: bytes) -> list[bytes]:
    """*stream* cut at random points (empty chunks included)."""
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8), label="cuts")
    points = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in zip(points, points[1:], strict=False)]


def assert_valid_message(message: Any) -> None:
    assert isinstance(message, dict), message
    assert isinstance(message.get("type"), str) and message["type"] in _SCHEMA, message
    assert validate(message) is message


# -- part 1: the decoder, in process ------------------------------------------------------

@FAST
@given(st.lists(valid_messages(), min_size=1, max_size=5), st.data())
def test_fuzz_valid_messages_round_trip_through_any_chunking(messages, data):
    frames = []
    for message in messages:
        try:
            frames.append(encode(message))
        except ProtocolError:
            assume(False)           # e.g. a stricter schema than _SCHEMA says
    decoder = Decoder()
    decoded = []
    for chunk in chunks_of(data, b"".join(frames)):
        decoded += decoder.feed(chunk)
    assert decoded == messages
    assert decoder.pending == 0


@settings(FAST, max_examples=400)
@given(hostile_streams, st.data())
def test_fuzz_hostile_bytes_give_messages_or_protocol_error(stream, data):
    decoder = Decoder()
    decoded: list = []
    failed = False
    try:
        for chunk in chunks_of(data, stream):
            decoded += decoder.feed(chunk)
    except ProtocolError:
        failed = True
    for message in decoded:
        assert_valid_message(message)
    if failed:
        # Poisoned: nothing more is parsed, not even a perfectly good frame.
        for more in (b"", encode({"type": "status"}), b"FD"):
            with pytest.raises(ProtocolError):
                decoder.feed(more)
    # How the bytes were cut changes nothing: the same stream in one go
    # fails the same way, or gives the same messages.
    whole = Decoder()
    try:
        at_once = whole.feed(stream)
    except ProtocolError:
        assert failed, f"fails in one go, not in chunks: {stream[:200]!r}"
    else:
        assert not failed, f"fails in chunks, not in one go: {stream[:200]!r}"
        assert at_once == decoded
        assert whole.pending == decoder.pending


@FAST
@given(wild_values | hostile_objects)
def test_fuzz_validate_and_encode_accept_or_raise_protocol_error(message):
    try:
        checked = validate(message)
    except ProtocolError:
        checked = None
    if checked is not None:
        assert checked is message
        assert_valid_message(message)
    try:
        data = encode(message) if isinstance(message, dict) else None
    except ProtocolError:
        return
    if data is not None:
        assert checked is not None, "encode() accepted what validate() refused"
        assert len(data) - HEADER.size <= MAX_PAYLOAD
        assert Decoder().feed(data) == [message]


@FAST
@given(hostile_streams)
def test_fuzz_what_the_decoder_accepts_encodes_back_the_same(stream):
    try:
        messages = Decoder().feed(stream)
    except ProtocolError:
        return
    for message in messages:
        try:
            data = encode(message, MAX_ANSWER)
        except ProtocolError:
            continue        # e.g. 1e999 in an extra field: read as inf, not writable
        assert Decoder(MAX_ANSWER).feed(data) == [message]


# -- part 2: hostile peers against a real fdserver ------------------------------------------

HOSTILE_EXAMPLES = 1200     # about 20-25 s on 2 cores
# "listener" is a copy of fdserver's own listening socket, "received" one that
# fdserver sent this peer.  Not here: the peer's own end of its connection,
# which keeps fdserver's end open until the partial-frame deadline (5 s; see
# test_worker_sending_its_own_socket_in_a_partial_frame_is_still_noticed_gone).
FD_KINDS = ("pipe-read", "pipe-write", "file", "udp", "tcp", "tcp-listening",
            "unix-listening", "devnull", "eventfd", "listener", "received")
STATES = ["ready", "draining", "starting", "gone", "handshake", "ctl", "bogus"]
READ_WAIT = 0.05        # a mid-conversation read waits this long for an answer
CLOSE_WAIT = 5.0        # fdserver closes a half-closed connection within this


class Target:
    """A running fdserver, its real worker, and a copy of its listener."""

    def __init__(self, server: Proc, path: str, address: str, folder: Path) -> None:
        self.server, self.path, self.address, self.folder = server, path, address, folder
        self.worker: Proc | None = None
        self.listener = -1                   # a descriptor of fdserver's listener
        self.described: dict = {}            # and how fdserver describes it

    def status(self) -> dict:
        result = run([script("fdctl"), "--socket", self.path, "status", "--json"])
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def worker_states(self) -> dict[int, str]:
        return {w["pid"]: w["state"] for w in self.status()["workers"]}

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.server.pid}/fd"))


@contextlib.contextmanager
def serving(folder: Path, worker: bool):
    """fdserver (leftover hostile peers die after 1s), and maybe a real worker."""
    path = str(folder / "fd.sock")       # short: a socket path fits 107 bytes
    started: list[Proc] = []
    target = None
    try:
        server = Proc([script("fdserver"), "--socket", path, "--bind", "127.0.0.1:0",
                       "--handshake-timeout", "1"])
        started.append(server)
        address = server.wait_for_line(r"serving \w+ on (\S+?)[,;]").group(1)
        target = Target(server, path, address, folder)
        if worker:
            target.listener, target.described = _take_listener(path)
            target.worker = Proc([script("fdapp"), "app:make_app", "--socket", path],
                                 cwd=PROJECT)
            started.append(target.worker)
            target.worker.wait_for_line(r"ready: serving")
            wait_until(lambda: target.worker_states() == {target.worker.pid: "ready"},
                       what="the worker to be ready, and the only worker")
        yield target
    finally:
        if target is not None and target.listener >= 0:
            os.close(target.listener)
        for proc in reversed(started):
            proc.close()


def _take_listener(path: str) -> tuple[int, dict]:
    """Register as a worker just long enough to get a copy of the listener."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    channel = Channel(sock)
    try:
        sock.connect(path)
        channel.send({"type": "hello", "versions": [1], "role": "worker"})
        while True:
            message, fds = channel.receive()
            if message["type"] == "listeners" and fds:
                close_fds(fds[1:])
                return fds[0], message["listeners"][0]
            close_fds(fds)
    finally:
        channel.close()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("fz"), worker=True) as found:
        yield found


# -- conversations ---------------------------------------------------------------------

def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """Like st.one_of, with weights (one_of merges repeated branches)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(table.__getitem__)


def _maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly the right kind of value, sometimes any JSON value at all."""
    return weighted((3, strategy), (1, wild_values))


def hostile_messages(pids: list[int], address: str) -> st.SearchStrategy:
    pid = st.sampled_from(pids) | st.integers()
    roles = st.sampled_from(["worker", "ctl", "worker", "ctl", "root", ""]) | st.text(max_size=6)
    hello = st.fixed_dictionaries(
        {"type": st.just("hello"), "role": _maybe(roles),
         "versions": _maybe(st.lists(st.integers(-1, 3) | wild_values, max_size=4))},
        optional={"features": _maybe(st.lists(st.sampled_from(["share", "dispatch"])
                                              | st.text(max_size=8), max_size=20)),
                  "resume": _maybe(st.fixed_dictionaries(
                      {}, optional={"state": _maybe(st.sampled_from(STATES))}))})
    listener = st.fixed_dictionaries({
        "name": _maybe(st.sampled_from(["default", "http"]) | st.text(max_size=8)),
        "family": _maybe(st.sampled_from(["AF_INET", "AF_INET6", "AF_UNIX"])),
        "address": _maybe(st.sampled_from([address, "127.0.0.1:0", "[::1]:80"])
                          | st.text(max_size=20)),
    })
    token = _maybe(st.text(max_size=40) | st.binary(min_size=16, max_size=16).map(bytes.hex))
    handback = st.fixed_dictionaries(
        {"type": st.just("handback"), "listeners": _maybe(st.lists(listener, max_size=4))},
        optional={"token": token, "recovery": token})
    state = st.fixed_dictionaries({"type": st.just("state"),
                                   "state": _maybe(st.sampled_from(STATES))})
    load = st.fixed_dictionaries({"type": st.just("load"), "connections": _maybe(st.integers()),
                                  "received": _maybe(st.integers())})
    wait = st.fixed_dictionaries({
        "type": st.just("wait"), "pid": _maybe(pid), "state": _maybe(st.sampled_from(STATES)),
        "timeout": _maybe(st.floats(0, 1.5) | st.integers(-5, 2) | st.just(3600))})
    others = st.sampled_from(sorted(_SCHEMA) + ["teleport", ""]).flatmap(
        lambda kind: _schema_shaped(kind, wild_values))
    message = weighted((1, hello), (2, handback), (2, state), (2, load),
                       (2, st.just({"type": "status"})), (2, wait), (2, others),
                       (2, hostile_objects))
    extras = st.dictionaries(st.text(max_size=6), wild_values, max_size=2)
    return st.tuples(message, extras).map(
        lambda t: {**t[1], **t[0]} if isinstance(t[0], dict) else t[0])


def conversations(pids: list[int], address: str) -> st.SearchStrategy:
    """(steps, ending): what one hostile peer sends, and how it leaves."""
    messages = hostile_messages(pids, address)
    some_kinds = st.lists(st.sampled_from(FD_KINDS), max_size=10).map(tuple)

    @st.composite
    def frame_step(draw, message=None) -> tuple:
        kinds = draw(some_kinds) if draw(st.integers(0, 2)) == 0 else ()
        message = draw(messages) if message is None else dict(message)
        if isinstance(message, dict):
            announce = draw(st.sampled_from(["exact", "exact", "keep", "random"]))
            if announce == "exact":
                message["fds"] = len(kinds)
            elif announce == "random":
                message["fds"] = draw(st.integers(-1, MAX_FDS_PER_FRAME + 2) | wild_values)
        how = draw(st.sampled_from(["json"] * 6 + ["mangled", "version", "length"]))
        payload = (draw(hostile_payloads()) if how == "mangled"
                   else json.dumps(message).encode())
        if how == "version":
            data = frame(payload, version=draw(st.integers(0, 255)))
        elif how == "length":
            data = frame(payload, length=draw(st.integers(0, 2 ** 32 - 1)))
        else:
            data = frame(payload)
        if draw(st.integers(0, 5)) == 0:          # stop short: a frame cut in two
            data = data[:draw(st.integers(1, len(data)))]
        return ("frame", data, kinds)

    raw_step = st.tuples(st.just("bytes"), st.binary(min_size=1, max_size=256), some_kinds)
    # A handback that answers the welcome (its token, fdserver's own listener
    # described as fdserver describes it), or gets one of those wrong.
    handback_step = st.tuples(
        st.just("handback"), st.lists(st.sampled_from(FD_KINDS + ("listener",) * 4),
                                      max_size=4).map(tuple),
        st.booleans(), st.none() | st.text(max_size=32))
    # What a well-behaved worker or ctl sends, so conversations get somewhere.
    proper = st.one_of(
        st.fixed_dictionaries({"type": st.just("state"),
                               "state": st.sampled_from(["ready", "draining"])}),
        st.fixed_dictionaries({"type": st.just("load"), "connections": st.integers(0, 100),
                               "received": st.integers(0, 100)}),
        st.just({"type": "status"}),
        st.fixed_dictionaries({"type": st.just("wait"), "pid": st.sampled_from(pids),
                               "state": st.sampled_from(STATES[:4]),
                               "timeout": st.floats(0, 0.2)}),
    ).map(lambda m: ("frame", encode(m), ()))
    step = weighted((4, frame_step()), (2, proper), (1, raw_step), (1, handback_step),
                    (1, st.just(("read",))))
    hello = st.sampled_from([
        {"type": "hello", "versions": [1], "role": "worker"},
        {"type": "hello", "versions": [1], "role": "worker", "features": ["share"]},
        {"type": "hello", "versions": [1], "role": "worker", "resume": {"state": "ready"}},
        {"type": "hello", "versions": [1], "role": "worker", "resume": {"state": "draining"}},
        {"type": "hello", "versions": [1], "role": "ctl"},
        {"type": "hello", "versions": [1], "role": "ctl"},
        {"type": "hello", "versions": [1], "role": "ctl"},
    ])
    clean_hello = hello.map(lambda m: ("frame", encode(m), ()))
    # Mostly a proper hello first, so that the rest reaches a worker's or a ctl's code.
    opening = weighted((6, clean_hello), (1, hello.flatmap(lambda m: frame_step(m))),
                       (2, step), (1, st.none()))
    return st.tuples(
        opening, st.lists(step, max_size=5),
        st.sampled_from(["half-close", "half-close", "linger", "abrupt", "abandon"]),
    ).map(lambda t: ([s for s in [t[0], *t[1]] if s is not None], t[2]))


# -- one hostile peer ------------------------------------------------------------------------

class Peer:
    """A hostile client connection and every descriptor it made or received."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.own: list[int] = []          # descriptors we made; closed at the end
        self.received: list[int] = []     # descriptors fdserver sent us
        self.decoder = Decoder(MAX_ANSWER)
        self.messages: list[dict] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(CLOSE_WAIT)
        try:
            self.sock.connect(target.path)
        except OSError:
            self.close()
            assert target.server.popen.poll() is None, target.server.output
            raise

    def make(self, kind: str) -> int:
        """A descriptor of *kind* to send; the peer closes it at the end."""
        if kind in ("pipe-read", "pipe-write"):
            r, w = os.pipe()
            self.own += [r, w]
            return r if kind == "pipe-read" else w
        if kind == "file":
            fd, name = tempfile.mkstemp(dir=self.target.folder)
            os.unlink(name)
        elif kind == "devnull":
            fd = os.open(os.devnull, os.O_RDWR)
        elif kind == "eventfd":
            fd = os.eventfd(0)
        elif kind == "listener":
            return self.target.listener
        elif kind == "received":
            return self.received[-1] if self.received else self.make("devnull")
        else:
            family, type_ = {"udp": (socket.AF_INET, socket.SOCK_DGRAM),
                             "unix-listening": (socket.AF_UNIX, socket.SOCK_STREAM)
                             }.get(kind, (socket.AF_INET, socket.SOCK_STREAM))
            with socket.socket(family, type_) as sock:
                if kind == "tcp-listening":
                    sock.bind(("127.0.0.1", 0))
                    sock.listen()
                elif kind == "unix-listening":
                    sock.bind("")              # Linux autobind: an abstract address
                    sock.listen()
                fd = sock.detach()
        self.own.append(fd)
        return fd

    def send(self, data: bytes, kinds: tuple[str, ...]) -> bool:
        """Send one step; False once fdserver has stopped taking our bytes.

        MSG_NOSIGNAL, and the errors of a peer that closed on us caught: fdserver
        may close the connection halfway through any step.
        """
        fds = [self.make(kind) for kind in kinds]
        try:
            if fds:
                ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                data = data[self.sock.sendmsg([data], ancdata, socket.MSG_NOSIGNAL):]
            if data:
                self.sock.sendall(data, socket.MSG_NOSIGNAL)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            return False
        return True

    def handback(self, kinds: tuple[str, ...], described: bool, token: str | None) -> bool:
        """A handback frame, built from what fdserver has said so far."""
        if self.read(READ_WAIT, until=lambda ms: any(m["type"] == "welcome" for m in ms)):
            return False
        if token is None:
            welcomes = [m for m in self.messages if m["type"] == "welcome"]
            token = welcomes[-1].get("token") if welcomes else None
        listeners = ([self.target.described] * len(kinds) if described
                     else [self.target.described])
        message = {"type": "handback", "listeners": listeners, "fds": len(kinds),
                   "token": token}
        return self.send(frame(json.dumps(message).encode()), kinds)

    def read(self, wait: float, until: Callable[[list[dict]], bool] | None = None) -> bool:
        """Read what arrives within *wait* (or until *until(messages)*); True at EOF."""
        deadline = time.monotonic() + wait
        while not (until and until(self.messages)):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return False
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(
                    256 * 1024, socket.CMSG_SPACE(MAX_FDS_PER_FRAME * 4),
                    socket.MSG_CMSG_CLOEXEC)
            except ConnectionResetError:
                return True
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self.received += fds
            assert not flags & socket.MSG_CTRUNC, "fdserver sent more descriptors than a frame"
            if not data:
                return True
            # Whatever fdserver sends is well formed, and nothing follows an error.
            for message in self.decoder.feed(data):
                assert not any(m["type"] == "error" for m in self.messages), self.messages
                assert_valid_message(message)
                self.messages.append(message)
        return False

    def converse(self, steps: list[tuple], ending: str) -> None:
        for step in steps:
            if step[0] == "read":
                if self.read(READ_WAIT):
                    return                   # fdserver closed on us
            elif step[0] == "handback":
                if not self.handback(*step[1:]):
                    break
            elif not self.send(*step[1:]):
                break
        if ending == "half-close":
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            assert self.read(CLOSE_WAIT), (
                f"fdserver kept a half-closed connection open for {CLOSE_WAIT}s; "
                f"it sent {self.messages}")
            if not self.decoder.pending:
                announced = sum(m.get("fds", 0) for m in self.messages)
                assert announced == len(self.received), (self.messages, self.received)
        elif ending == "linger":
            self.read(READ_WAIT)

    def close(self) -> None:
        self.sock.close()
        close_fds(self.own + self.received)
        self.own, self.received = [], []


# -- the runs ----------------------------------------------------------------------------

def assert_log_clean(proc: Proc) -> None:
    bad = [line for line in proc.lines
           if "Traceback" in line or " ERROR " in line or "Exception in callback" in line]
    assert not bad, proc.output


def wait_for_fd_count(target: Target, limit: int, timeout: float) -> None:
    """Wait until fdserver holds at most *limit* descriptors; say which it holds if not."""
    try:
        wait_until(lambda: target.fd_count() <= limit, timeout=timeout)
    except AssertionError:
        pid = target.server.pid
        held = []
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                held.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        raise AssertionError(f"fdserver still holds {len(held)} descriptors, not at most "
                             f"{limit}, after {timeout}s: {sorted(held)}") from None


@pytest.mark.timeout(150)
def test_fuzz_hostile_peers_leave_fdserver_serving(target):
    server, worker = target.server, target.worker
    before = target.fd_count()
    abandoned: list[Peer] = []       # left open for a while, at most 8 at a time

    @settings(deadline=None, database=None, max_examples=HOSTILE_EXAMPLES,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])
    @given(conversations([os.getpid(), worker.pid, server.pid, 1, 0, -1], target.address))
    def hostile_peer(conversation):
        steps, ending = conversation
        peer = Peer(target)
        try:
            peer.converse(steps, ending)
        finally:
            if ending == "abandon":
                abandoned.append(peer)
                while len(abandoned) > 8:
                    abandoned.pop(0).close()
            else:
                peer.close()

    try:
        hostile_peer()
    finally:
        for peer in abandoned:
            peer.close()

    assert server.popen.poll() is None, server.output
    assert_log_clean(server)
    # Every hostile connection is closed, so fdserver lets go of every
    # descriptor it was sent or opened for them; only the real worker is left.
    wait_for_fd_count(target, before + 2, timeout=20)
    wait_until(lambda: target.worker_states() == {worker.pid: "ready"},
               what=f"the real worker to be the only one, and ready: {target.status()}")
    assert http_get(target.address) == (200, f"Hello from {worker.pid}\n")
    assert server.popen.poll() is None and worker.popen.poll() is None, server.output
    assert_log_clean(server)
    assert_log_clean(worker)


def test_worker_sending_its_own_socket_in_a_partial_frame_is_still_noticed_gone(
        tmp_path_factory):
    with serving(tmp_path_factory.mktemp("fz"), worker=False) as target:
        before = target.fd_count()
        peer = Peer(target)
        try:
            assert peer.send(encode({"type": "hello", "versions": [1], "role": "worker"}), ())
            assert not peer.read(10.0, until=lambda ms: any(m["type"] == "listeners"
                                                            for m in ms)), peer.messages
            r, w = os.pipe()
            peer.own += [r, w]
            # The first 5 bytes of a frame, carrying the peer's own socket and a pipe end.
            data = encode({"type": "status", "fds": 2})[:5]
            sock = peer.sock
            assert sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          array.array("i", [sock.fileno(), w]))]) == len(data)
        finally:
            peer.close()           # the worker exits
        with Control(target.path) as control:
            # Found by the fuzzer: descriptors waiting for the rest of their
            # frame were held with no deadline, and this worker never ended.
            gone, state = control.wait(os.getpid(), "gone", PARTIAL_FRAME_DEADLINE + 5)
        assert gone, f"the worker that exited is still {state!r}"
        wait_for_fd_count(target, before, timeout=3)
        assert_log_clean(target.server)
