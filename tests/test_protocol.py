"""The wire format, table by table: valid frames, truncated ones, hostile ones.

Bytes in, messages out, no sockets: every case builds its frame by hand so
the test does not trust the encoder it is checking.
"""

from __future__ import annotations

import json

import pytest

from fdserver.errors import ProtocolError
from fdserver.protocol import (
    FRAME_VERSION,
    HEADER,
    MAGIC,
    MAX_FDS_PER_FRAME,
    MAX_PAYLOAD,
    SUPPORTED_VERSIONS,
    Decoder,
    encode,
    negotiate,
    on_the_tick,
    validate,
)


def frame(payload: bytes | str | object, *, magic: bytes = MAGIC, version: int = FRAME_VERSION,
          reserved: int = 0, length: int | None = None) -> bytes:
    """A frame built by hand; *payload* may be raw bytes, text or a JSON value."""
    if isinstance(payload, str):
        payload = payload.encode()
    elif not isinstance(payload, bytes):
        payload = json.dumps(payload).encode()
    size = len(payload) if length is None else length
    return HEADER.pack(magic, version, reserved, size) + payload


VALID = {
    "hello": {"type": "hello", "versions": [1], "role": "worker"},
    "hello-ctl-extra-field": {"type": "hello", "versions": [1, 2], "role": "ctl", "pid": 42},
    "welcome": {"type": "welcome", "version": 1, "server_pid": 1234, "listeners": 2},
    "listeners-none": {"type": "listeners", "listeners": [], "fds": 0, "more": False},
    "listeners-one": {"type": "listeners", "fds": 1, "more": True, "listeners": [
        {"name": "http", "family": "AF_INET", "address": "127.0.0.1:8080"}]},
    "listeners-max-fds": {"type": "listeners", "listeners": [], "fds": MAX_FDS_PER_FRAME,
                          "more": False},
    "state-ready": {"type": "state", "state": "ready"},
    "state-draining": {"type": "state", "state": "draining"},
    "status-request": {"type": "status"},
    "status-answer": {"type": "status", "server": {"pid": 1}, "listeners": [], "workers": []},
    "wait-int-timeout": {"type": "wait", "pid": 7, "state": "ready", "timeout": 5},
    "wait-float-timeout": {"type": "wait", "pid": 7, "state": "gone", "timeout": 0.25},
    "waited-null-state": {"type": "waited", "pid": 7, "state": None, "ok": False},
    "waited": {"type": "waited", "pid": 7, "state": "ready", "ok": True},
    "error-unicode": {"type": "error", "message": "caf\u00e9 \u2603 \U0001f600 \"quoted\"\n"},
}


# -- valid frames -------------------------------------------------------------

@pytest.mark.parametrize("message", VALID.values(), ids=VALID.keys())
def test_encode_decode_round_trip(message):
    data = encode(message)
    magic, framing, reserved, length = HEADER.unpack_from(data)
    assert (magic, framing, reserved) == (b"FD", 1, 0)
    assert length == len(data) - HEADER.size
    assert json.loads(data[HEADER.size:].decode("utf-8")) == message
    decoder = Decoder()
    assert decoder.feed(data) == [message]
    assert decoder.pending == 0


@pytest.mark.parametrize("message", VALID.values(), ids=VALID.keys())
def test_byte_at_a_time(message):
    data = encode(message)
    decoder = Decoder()
    for i, byte in enumerate(data[:-1]):
        assert decoder.feed(bytes([byte])) == []
        assert decoder.pending == i + 1
    assert decoder.feed(data[-1:]) == [message]
    assert decoder.pending == 0


def test_several_frames_in_one_feed_in_order():
    messages = list(VALID.values())
    assert Decoder().feed(b"".join(encode(m) for m in messages)) == messages


def test_several_frames_split_at_every_offset():
    messages = [VALID["hello"], VALID["listeners-one"], VALID["state-ready"]]
    stream = b"".join(encode(m) for m in messages)
    for cut in range(len(stream) + 1):
        decoder = Decoder()
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert got == messages, f"split at {cut}"
        assert decoder.pending == 0


def test_a_frame_and_a_half_keeps_the_half_pending():
    first, second = encode(VALID["hello"]), encode(VALID["state-ready"])
    decoder = Decoder()
    assert decoder.feed(first + second[:5]) == [VALID["hello"]]
    assert decoder.pending == 5
    assert decoder.feed(second[5:]) == [VALID["state-ready"]]


@pytest.mark.parametrize("message", [VALID["hello"], VALID["listeners-one"]],
                         ids=["hello", "listeners"])
def test_truncated_frame_is_not_an_error_until_completed(message):
    data = encode(message)
    for cut in range(len(data)):
        decoder = Decoder()
        assert decoder.feed(data[:cut]) == [], f"cut at {cut}"
        assert decoder.pending == cut


def test_empty_feed_returns_nothing():
    decoder = Decoder()
    assert decoder.feed(b"") == []
    assert decoder.pending == 0


def test_payload_of_exactly_the_limit_is_accepted_and_one_more_byte_is_not():
    overhead = len(encode({"type": "error", "message": ""})) - HEADER.size
    largest = {"type": "error", "message": "x" * (MAX_PAYLOAD - overhead)}
    data = encode(largest)
    assert len(data) == HEADER.size + MAX_PAYLOAD
    assert Decoder().feed(data) == [largest]
    with pytest.raises(ProtocolError, match=r"exceeds the 65536-byte frame limit"):
        encode({"type": "error", "message": "x" * (MAX_PAYLOAD - overhead + 1)})


def test_decoder_honours_a_smaller_max_payload():
    data = encode(VALID["hello"])
    size = len(data) - HEADER.size
    assert Decoder(max_payload=size).feed(data) == [VALID["hello"]]
    with pytest.raises(ProtocolError, match=rf"frame of {size} bytes exceeds the {size - 1}-byte"):
        Decoder(max_payload=size - 1).feed(data[:HEADER.size])


# -- messages the encoder refuses to send --------------------------------------

REFUSED_BY_ENCODE = {
    "not-a-dict": ["hello"],
    "no-type": {"versions": [1], "role": "worker"},
    "type-not-a-string": {"type": 1},
    "unknown-type": {"type": "teleport", "connections": 3},
    "bool-for-int": {"type": "welcome", "version": True, "server_pid": 1, "listeners": 1},
    "int-for-bool": {"type": "listeners", "listeners": [], "fds": 0, "more": 0},
    "fds-over-max": {"type": "listeners", "listeners": [], "fds": MAX_FDS_PER_FRAME + 1,
                     "more": False},
    "fds-negative": {"type": "status", "fds": -1},
    "fds-bool": {"type": "status", "fds": True},
    # json.dumps writes NaN and Infinity by default: frames no JSON parser accepts.
    "nan-timeout": {"type": "wait", "pid": 1, "state": "ready", "timeout": float("nan")},
    "infinite-timeout": {"type": "wait", "pid": 1, "state": "ready", "timeout": float("inf")},
}


@pytest.mark.parametrize("message", REFUSED_BY_ENCODE.values(), ids=REFUSED_BY_ENCODE.keys())
def test_encode_refuses_invalid_messages(message):
    with pytest.raises(ProtocolError):
        encode(message)


# -- hostile and malformed input -------------------------------------------------

HOSTILE = {
    # framing
    "bad-magic": (b"XX\x01\x00\x00\x00\x00\x02{}", r"bad frame magic"),
    "http-request": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", r"bad frame magic"),
    "tls-client-hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", r"bad frame magic"),
    "lowercase-magic": (frame({"type": "status"}, magic=b"fd"), r"bad frame magic"),
    "frame-version-0": (frame({"type": "status"}, version=0), r"unsupported frame version 0"),
    "frame-version-2": (frame({"type": "status"}, version=2), r"unsupported frame version 2"),
    "frame-version-255": (frame({"type": "status"}, version=255),
                          r"unsupported frame version 255"),
    "length-one-over-max": (frame(b"", length=MAX_PAYLOAD + 1),
                            rf"frame of {MAX_PAYLOAD + 1} bytes exceeds"),
    "length-4GiB": (frame(b"", length=2**32 - 1), rf"frame of {2**32 - 1} bytes exceeds"),
    # payload encoding
    "empty-payload": (frame(b""), r"not UTF-8 JSON"),
    "non-utf8": (frame(b'{"type": "status", "x": "\xff\xfe"}'), r"not UTF-8 JSON"),
    "utf16": (frame('{"type": "status"}'.encode("utf-16")), r"not UTF-8 JSON"),
    "truncated-json": (frame(b'{"type": "hel'), r"not UTF-8 JSON"),
    "trailing-garbage": (frame(b'{"type": "status"} {}'), r"not UTF-8 JSON"),
    "huge-integer": (frame(b'{"type": "welcome", "version": 1' + b"0" * 5000
                           + b', "server_pid": 1, "listeners": 1}'), r"not UTF-8 JSON"),
    # JSON has no NaN or Infinity (RFC 8259); Python's json module accepts them.
    "nan": (frame(b'{"type": "wait", "pid": 1, "state": "ready", "timeout": NaN}'),
            r"JSON"),
    "infinity": (frame(b'{"type": "wait", "pid": 1, "state": "ready", "timeout": -Infinity}'),
                 r"JSON"),
    # Well within the size limit, but deeper than the parser's recursion limit.
    "deeply-nested": (frame(b"[" * 30_000 + b"]" * 30_000), r"JSON"),
    # not an object
    "json-array": (frame([{"type": "status"}]), r"not a JSON object"),
    "json-string": (frame("\"status\""), r"not a JSON object"),
    "json-number": (frame(b"1"), r"not a JSON object"),
    "json-null": (frame(b"null"), r"not a JSON object"),
    "json-true": (frame(b"true"), r"not a JSON object"),
    # type
    "no-type": (frame({"versions": [1], "role": "worker"}), r"no string 'type'"),
    "type-null": (frame({"type": None}), r"no string 'type'"),
    "type-number": (frame({"type": 1}), r"no string 'type'"),
    "type-list": (frame({"type": ["hello"]}), r"no string 'type'"),
    "unknown-type": (frame({"type": "teleport"}), r"unknown message type 'teleport'"),
    "empty-type": (frame({"type": ""}), r"unknown message type ''"),
    # fields
    "hello-no-versions": (frame({"type": "hello", "role": "worker"}),
                          r"hello message has a missing or bad 'versions'"),
    "hello-versions-int": (frame({"type": "hello", "versions": 1, "role": "worker"}),
                           r"missing or bad 'versions'"),
    "hello-role-null": (frame({"type": "hello", "versions": [1], "role": None}),
                        r"missing or bad 'role'"),
    "welcome-version-string": (frame({"type": "welcome", "version": "1", "server_pid": 1,
                                      "listeners": 1}), r"missing or bad 'version'"),
    "welcome-version-bool": (frame({"type": "welcome", "version": True, "server_pid": 1,
                                    "listeners": 1}), r"missing or bad 'version'"),
    "welcome-pid-float": (frame({"type": "welcome", "version": 1, "server_pid": 1.0,
                                 "listeners": 1}), r"missing or bad 'server_pid'"),
    "listeners-more-int": (frame({"type": "listeners", "listeners": [], "fds": 0, "more": 1}),
                           r"missing or bad 'more'"),
    "listeners-no-more": (frame({"type": "listeners", "listeners": [], "fds": 0}),
                          r"missing or bad 'more'"),
    "listeners-fds-bool": (frame({"type": "listeners", "listeners": [], "fds": True,
                                  "more": False}), r"missing or bad 'fds'"),
    "listeners-list-is-dict": (frame({"type": "listeners", "listeners": {}, "fds": 0,
                                      "more": False}), r"missing or bad 'listeners'"),
    "state-number": (frame({"type": "state", "state": 1}), r"missing or bad 'state'"),
    "wait-timeout-bool": (frame({"type": "wait", "pid": 1, "state": "ready", "timeout": True}),
                          r"missing or bad 'timeout'"),
    "wait-timeout-string": (frame({"type": "wait", "pid": 1, "state": "ready",
                                   "timeout": "5"}), r"missing or bad 'timeout'"),
    "wait-pid-bool": (frame({"type": "wait", "pid": False, "state": "ready", "timeout": 1}),
                      r"missing or bad 'pid'"),
    "waited-ok-int": (frame({"type": "waited", "pid": 1, "ok": 1}), r"missing or bad 'ok'"),
    "error-message-null": (frame({"type": "error", "message": None}),
                           r"missing or bad 'message'"),
    # descriptor count
    "fds-negative": (frame({"type": "status", "fds": -1}), r"announces -1 descriptors"),
    "fds-253": (frame({"type": "status", "fds": 253}), r"announces 253 descriptors \(0..252"),
    "fds-huge": (frame({"type": "status", "fds": 2**40}), r"announces \d+ descriptors"),
    "fds-float": (frame({"type": "status", "fds": 1.0}), r"bad 'fds' count"),
    "fds-string": (frame({"type": "status", "fds": "1"}), r"bad 'fds' count"),
    "fds-true": (frame({"type": "status", "fds": True}), r"bad 'fds' count"),
    "fds-null": (frame({"type": "status", "fds": None}), r"bad 'fds' count"),
}


@pytest.mark.parametrize("data, error", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_input_is_a_protocol_error(data, error):
    decoder = Decoder()
    with pytest.raises(ProtocolError, match=error):
        decoder.feed(data)


@pytest.mark.parametrize("data, error", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_input_byte_at_a_time_fails_no_later_than_whole(data, error):
    # Same error, and garbage is caught without waiting for a whole frame.
    decoder = Decoder()
    with pytest.raises(ProtocolError, match=error):
        for i in range(len(data)):
            decoder.feed(data[i:i + 1])


@pytest.mark.parametrize("data, error", HOSTILE.values(), ids=HOSTILE.keys())
def test_decoder_is_poisoned_after_an_error(data, error):
    decoder = Decoder()
    with pytest.raises(ProtocolError) as first:
        decoder.feed(data)
    # The stream has lost its framing: even a perfect frame is refused now.
    for _ in range(2):
        with pytest.raises(ProtocolError) as again:
            decoder.feed(encode(VALID["hello"]))
        assert str(again.value) == str(first.value)


@pytest.mark.parametrize("prefix, expected_at", [
    (b"X", 1), (b"F", None), (b"FX", 2), (b"FD", None), (b"FD\x02", 8), (b"FD\x01\x00", None),
])
def test_garbage_fails_as_soon_as_the_magic_is_wrong(prefix, expected_at):
    decoder = Decoder()
    if expected_at is None:
        assert decoder.feed(prefix) == []
    elif expected_at <= len(prefix):
        with pytest.raises(ProtocolError, match="bad frame magic"):
            decoder.feed(prefix)
    else:
        # The frame version is only known once the whole header is in.
        assert decoder.feed(prefix) == []
        with pytest.raises(ProtocolError, match="unsupported frame version 2"):
            decoder.feed(b"\x00" * (expected_at - len(prefix)))


def test_an_oversized_length_fails_on_the_header_alone():
    # No need to wait for (or buffer) 4 GiB of payload to refuse it.
    decoder = Decoder()
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.feed(HEADER.pack(MAGIC, FRAME_VERSION, 0, 2**32 - 1))


def test_valid_frame_then_garbage_in_one_feed_is_an_error():
    decoder = Decoder()
    with pytest.raises(ProtocolError, match="bad frame magic"):
        decoder.feed(encode(VALID["hello"]) + b"garbage")
    with pytest.raises(ProtocolError):
        decoder.feed(encode(VALID["hello"]))


def test_error_messages_do_not_echo_a_huge_type_name():
    with pytest.raises(ProtocolError) as caught:
        Decoder().feed(frame({"type": "x" * 50_000}))
    assert len(str(caught.value)) < 100


def test_validate_returns_the_message_itself():
    message = dict(VALID["hello"])
    assert validate(message) is message


# -- version negotiation -------------------------------------------------------

@pytest.mark.parametrize("versions, role, expected", [
    ([1], "worker", 1),
    ([1], "ctl", 1),
    ([1, 2, 3], "worker", 1),
    ([7, 1, 0], "ctl", 1),
    ([1, 1, 1], "worker", 1),
    ([1, "2", None, 2.5], "worker", 1),
])
def test_negotiate_picks_the_highest_common_version(versions, role, expected):
    assert negotiate({"type": "hello", "versions": versions, "role": role}) == expected


@pytest.mark.parametrize("versions", [
    [], [0], [2, 3], [True], ["1"], [1.0], [None], [[1]], list(range(2, 1000)),
])
def test_negotiate_without_a_common_version_names_both_sides(versions):
    with pytest.raises(ProtocolError, match=r"no common protocol version") as caught:
        negotiate({"type": "hello", "versions": versions, "role": "worker"})
    message = str(caught.value)
    assert f"server speaks {list(SUPPORTED_VERSIONS)}" in message
    assert f"client offered {versions[:8]}" in message
    assert len(message) < 200


@pytest.mark.parametrize("role", ["root", "", "Worker", "ctl ", "x" * 10_000])
def test_negotiate_refuses_unknown_roles(role):
    with pytest.raises(ProtocolError, match=r"unknown role") as caught:
        negotiate({"type": "hello", "versions": [1], "role": role})
    assert len(str(caught.value)) < 100


def test_negotiate_on_a_decoded_hello():
    [hello] = Decoder().feed(frame({"type": "hello", "versions": [9, 1], "role": "ctl"}))
    assert negotiate(hello) == 1


def test_a_tick_is_the_next_whole_multiple_and_never_the_last_one_again():
    """Workers share ticks (whole multiples of the interval on the monotonic
    clock); a timer that runs a moment before its tick (uvloop's are in ms)
    must not get the same tick again, or it would send twice at once."""
    assert on_the_tick(10.2, 1.0) == 11.0
    assert on_the_tick(10.0, 0.5) == 10.5          # on a tick: the next one
    assert on_the_tick(9.9995, 1.0) == 10.0        # early, without the last tick given
    assert on_the_tick(9.9995, 1.0, last=10.0) == 11.0
    assert on_the_tick(12.3, 1.0, last=10.0) == 13.0   # late: the next after now
    # An interval floating point cannot hold exactly (a load report's 50 ms):
    # a tick floored by it again may come out one tick short.
    for i in range(1000):
        tick = on_the_tick(53905.0 + i * 0.0137, 0.05)
        assert on_the_tick(tick - 0.0005, 0.05, last=tick) > tick
        assert on_the_tick(tick, 0.05, last=tick) > tick
