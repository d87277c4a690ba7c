"""Hostile peers on fdserver's Unix socket against a real fdserver process.

Every case checks three things: fdserver is still alive; it answered the
hostile peer with an error frame or closed it; and a real fdapp can still
join and serve HTTP, and ``fdctl status`` still works, while the hostile
connections are still open on our side.
"""

from __future__ import annotations

import array
import json
import os
import re
import select
import socket
import time

import pytest

import fdserver
from fdserver.client import connect as client_connect
from fdserver.protocol import FRAME_VERSION, HEADER, MAGIC, Decoder, encode
from fdserver.transport import close_fds

from support import http_get, run, script

TIMEOUT = 10.0
HELLO = {"type": "hello", "versions": [1], "role": "worker"}


# -- helpers ----------------------------------------------------------------------

def frame(payload: bytes | dict | list, version: int = FRAME_VERSION) -> bytes:
    """A frame built by hand (the encoder would refuse most of these)."""
    if not isinstance(payload, bytes):
        payload = json.dumps(payload).encode()
    return HEADER.pack(MAGIC, version, 0, len(payload)) + payload


def connect(server) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(server.socket)
    return sock


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    assert sock.sendmsg([data], ancdata) == len(data)


def read_until_closed(sock: socket.socket, timeout: float = TIMEOUT) -> list[dict]:
    """Every message fdserver sends until it closes; fails if it does not close in time."""
    decoder = Decoder()
    messages: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"fdserver did not close the connection within {timeout}s; "
                                 f"it sent {messages}")
        sock.settimeout(left)
        try:
            data, ancdata, _, _ = sock.recvmsg(64 * 1024, socket.CMSG_SPACE(252 * 4))
        except ConnectionResetError:
            return messages              # closed with our bytes unread: also closed
        except TimeoutError:
            continue
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                close_fds(fds)
        if not data:
            return messages
        messages += decoder.feed(data)


def assert_refused(sock: socket.socket, pattern: str, timeout: float = TIMEOUT) -> str:
    """fdserver answers with one error frame matching *pattern*, then closes."""
    messages = read_until_closed(sock, timeout)
    assert messages and messages[-1]["type"] == "error", messages
    assert [m for m in messages if m["type"] == "error"] == messages[-1:], messages
    message = messages[-1]["message"]
    assert re.search(pattern, message), message
    return message


def assert_still_open(sock: socket.socket) -> None:
    """fdserver has neither answered nor closed this connection."""
    sock.setblocking(False)
    try:
        data = sock.recv(1)
    except BlockingIOError:
        return
    finally:
        sock.settimeout(TIMEOUT)
    raise AssertionError(f"fdserver answered or closed the connection: {data!r}")


def assert_all_closed(read_fd: int, timeout: float = TIMEOUT) -> None:
    """EOF on a pipe: fdserver closed the copy of its write end we sent it."""
    ready, _, _ = select.select([read_fd], [], [], timeout)
    assert ready, "fdserver still holds a descriptor it was sent"
    assert os.read(read_fd, 1) == b""


def assert_log_clean(server) -> None:
    bad = [line for line in server.lines
           if "Traceback" in line or " ERROR " in line or "Exception in callback" in line]
    assert not bad, server.output


def assert_serving(server, start_fdapp) -> None:
    """fdserver is alive, a new worker joins and serves HTTP, fdctl status works."""
    assert server.popen.poll() is None, server.output
    worker = start_fdapp(server)
    assert http_get(server.address) == (200, f"Hello from {worker.pid}\n")
    result = run([script("fdctl"), "--socket", server.socket, "status"])
    assert result.returncode == 0, result.stderr
    assert any(line.split()[:3] == [str(worker.pid), str(os.getuid()), "ready"]
               for line in result.stdout.splitlines()), result.stdout
    assert server.popen.poll() is None, server.output
    assert_log_clean(server)


def wait_for_closed_log(server, reason: str) -> None:
    server.wait_for_line(rf"WARNING closed connection from pid {os.getpid()} "
                         rf"uid {os.getuid()}: {re.escape(reason)}")


# -- raw bytes ---------------------------------------------------------------------

RAW = {
    "binary-garbage": (bytes(range(255, -1, -1)), r"^bad frame magic"),
    "http-request": (b"GET / HTTP/1.1\r\nHost: fdserver\r\n\r\n", r"^bad frame magic"),
    "oversized-length-header": (HEADER.pack(MAGIC, FRAME_VERSION, 0, 2**32 - 1),
                                r"^frame of 4294967295 bytes exceeds the 65536-byte limit"),
    "wrong-frame-version": (frame(HELLO, version=2), r"^unsupported frame version 2$"),
    "non-utf8-payload": (frame(b'{"type": "hello\xff"}'), r"not UTF-8 JSON"),
    "deeply-nested-json": (frame(b"[" * 30_000 + b"]" * 30_000), r"JSON"),
    "json-not-an-object": (frame([HELLO]), r"not a JSON object"),
    "unknown-type": (frame({"type": "teleport", "fds": 0}), r"unknown message type 'teleport'"),
    "bool-for-int": (frame({"type": "wait", "pid": True, "state": "ready", "timeout": 1}),
                     r"wait message has a missing or bad 'pid'"),
    "huge-int-timeout": (frame(b'{"type":"wait","pid":1,"state":"ready","timeout":1' +
                               b"0" * 400 + b"}"),
                         r"wait message has a missing or bad 'timeout'"),
    "fds-count-out-of-range": (frame({**HELLO, "fds": 253}), r"announces 253 descriptors"),
    "unsupported-versions-only": (
        frame({"type": "hello", "versions": [0, 2, 99], "role": "worker"}),
        r"^no common protocol version: server speaks \[1\], client offered \[0, 2, 99\]$"),
    "unknown-role": (frame({"type": "hello", "versions": [1], "role": "root"}),
                     r"^unknown role 'root'$"),
    "not-hello-first": (frame({"type": "status"}), r"^expected hello, got status$"),
}


@pytest.mark.parametrize("data, pattern", RAW.values(), ids=RAW.keys())
def test_hostile_bytes_get_an_error_frame_and_a_close(start_fdserver, start_fdapp, data, pattern):
    # A short handshake timeout so a peer fdserver fails to refuse at once
    # shows up as the wrong error, not as a slow test.
    server = start_fdserver("--handshake-timeout", "3")
    with connect(server) as hostile:
        hostile.sendall(data)
        reason = assert_refused(hostile, pattern)
        wait_for_closed_log(server, reason)
        assert_serving(server, start_fdapp)


# -- stalling peers ------------------------------------------------------------------

STALLS = {
    "idle": b"",
    "one-byte": b"F",
    "half-a-header": frame(HELLO)[:5],
    "header-without-payload": frame(HELLO)[:HEADER.size],
    "half-a-frame": frame(HELLO)[:HEADER.size + 10],
}


@pytest.mark.parametrize("data", STALLS.values(), ids=STALLS.keys())
def test_stalling_peer_is_closed_after_the_handshake_timeout(start_fdserver, start_fdapp, data):
    server = start_fdserver("--handshake-timeout", "0.5")
    started = time.monotonic()
    with connect(server) as hostile:
        hostile.sendall(data)
        reason = assert_refused(hostile, r"^no hello within the handshake timeout$")
        assert time.monotonic() - started >= 0.5, "closed before the handshake timeout"
        wait_for_closed_log(server, reason)
        assert_serving(server, start_fdapp)


def test_worker_joins_while_stalling_peers_hold_their_connections(start_fdserver, start_fdapp):
    server = start_fdserver("--handshake-timeout", "30")
    stalled = [connect(server) for _ in STALLS]
    try:
        for sock, data in zip(stalled, STALLS.values(), strict=False):
            sock.sendall(data)
        assert_serving(server, start_fdapp)
        for sock in stalled:
            assert_still_open(sock)
    finally:
        for sock in stalled:
            sock.close()


def test_100_idle_connections_do_not_lock_workers_out(start_fdserver, start_fdapp):
    server = start_fdserver("--handshake-timeout", "30")
    idle = []
    try:
        for _ in range(100):
            idle.append(connect(server))
        # The worker connects after all of them, so fdserver meets it last.
        assert_serving(server, start_fdapp)
        for sock in idle:
            # Each one is either still waiting or was told off and closed.
            sock.setblocking(False)
            try:
                data = sock.recv(64 * 1024)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            assert not data or Decoder().feed(data)[0]["type"] == "error", data
    finally:
        for sock in idle:
            sock.close()


# -- peers that say hello, then misbehave --------------------------------------------

@pytest.mark.parametrize("states, pattern", [
    (["draining", "ready"], r"^worker cannot go from draining to ready$"),
    (["ready", "starting"], r"^worker cannot go from ready to starting$"),
    (["gone"], r"^worker cannot go from starting to gone$"),
    (["ready", "no-such-state"], r"^worker cannot go from ready to no-such-state$"),
], ids=["draining-to-ready", "ready-to-starting", "starting-to-gone", "unknown-state"])
def test_worker_with_a_bad_state_transition_is_dropped(start_fdserver, start_fdapp, states,
                                                       pattern):
    server = start_fdserver()
    registration = fdserver.register(server.socket)
    try:
        for sock in registration.sockets():
            sock.close()
        for state in states:
            registration.report(state)
        assert_refused(registration.channel.sock, pattern)
        server.wait_state(os.getpid(), "gone")
        assert_serving(server, start_fdapp)
    finally:
        registration.channel.close()


@pytest.mark.parametrize("role, message, pattern", [
    ("ctl", {"type": "state", "state": "ready"}, r"^unexpected state message from a ctl$"),
    ("ctl", {"type": "listeners", "listeners": [], "fds": 0, "more": False},
     r"^unexpected listeners message from a ctl$"),
    ("ctl", HELLO, r"^unexpected hello message from a ctl$"),
    ("ctl", {"type": "wait", "pid": 1, "state": "bogus", "timeout": 1},
     r"^cannot wait for state 'bogus'$"),
    ("worker", {"type": "status"}, r"^unexpected status message from a worker$"),
    ("worker", {"type": "wait", "pid": 1, "state": "ready", "timeout": 1},
     r"^unexpected wait message from a worker$"),
], ids=["ctl-state", "ctl-listeners", "ctl-second-hello", "ctl-wait-bad-state",
        "worker-status", "worker-wait"])
def test_message_for_another_role_is_refused(start_fdserver, start_fdapp, role, message,
                                             pattern):
    server = start_fdserver()
    channel, welcome = client_connect(server.socket, role)
    try:
        assert welcome["server_pid"] == server.pid
        channel.send(message)
        assert_refused(channel.sock, pattern)
        assert_serving(server, start_fdapp)
    finally:
        channel.close()


# -- descriptors sent to fdserver ------------------------------------------------------

@pytest.mark.parametrize("announced, copies, hello_first, pattern", [
    (1, 1, False, r"^unexpected descriptors with hello$"),
    (0, 1, False, r"^1 unannounced descriptors received$"),
    (252, 253, False, r"MSG_CTRUNC"),
    (1, 1, True, r"^unexpected descriptors with status$"),
], ids=["hello-announcing-them", "hello-not-announcing-them", "more-than-a-frame-holds",
        "ctl-status-after-hello"])
def test_descriptors_sent_to_fdserver_are_refused_and_closed(
        start_fdserver, start_fdapp, announced, copies, hello_first, pattern):
    server = start_fdserver()
    r, w = os.pipe()
    if hello_first:
        hostile = client_connect(server.socket, "ctl")[0].sock
        message = {"type": "status"}
    else:
        hostile = connect(server)
        message = dict(HELLO)
    if announced:
        message["fds"] = announced
    try:
        send_with_fds(hostile, frame(message), [w] * copies)
        os.close(w)
        assert_refused(hostile, pattern)
        assert_all_closed(r)        # fdserver kept no copy, not even of a truncated batch
        assert_serving(server, start_fdapp)
    finally:
        hostile.close()
        close_fds((r, w))


def test_a_handback_that_never_ends_is_cut_off(start_fdserver, start_fdapp):
    # Each frame says "more"; fdserver remembers what each one showed.  A
    # worker sending them for ever grew fdserver's memory without bound.
    from fdserver.server import MAX_HANDBACK_FRAMES

    server = start_fdserver()
    channel, welcome = client_connect(server.socket, "worker", resume={"state": "ready"})
    r, w = os.pipe()
    try:
        assert welcome["handback"]
        for _ in range(MAX_HANDBACK_FRAMES):
            channel.send({"type": "handback", "fds": 1, "more": True,
                          "token": welcome["token"],
                          "listeners": [{"name": "http", "family": "AF_INET",
                                         "address": "x"}]}, [w])
        # Not yet refused: that many frames are allowed.
        assert_still_open(channel.sock)
        channel.send({"type": "handback", "fds": 1, "more": True, "token": welcome["token"],
                      "listeners": [{"name": "http", "family": "AF_INET", "address": "x"}]},
                     [w])
        os.close(w)
        assert_refused(channel.sock, rf"^handback refused: more than {MAX_HANDBACK_FRAMES} "
                                     r"frames")
        assert_all_closed(r)
        assert_serving(server, start_fdapp)
    finally:
        channel.close()
        close_fds((r, w))


# -- floods ----------------------------------------------------------------------------

def test_ctl_that_floods_requests_and_never_reads_is_cut_off(start_fdserver, start_fdapp):
    server = start_fdserver()
    channel, _ = client_connect(server.socket, "ctl")
    hostile = channel.sock
    try:
        # 10 000 status requests (240 kB) answered with ~4 MB fdserver must not buffer.
        try:
            hostile.sendall(encode({"type": "status"}) * 10_000)
        except (BrokenPipeError, ConnectionResetError):
            pass                         # already cut off
        poller = select.poll()
        poller.register(hostile, select.POLLRDHUP | select.POLLHUP)
        assert poller.poll(TIMEOUT * 1000), "fdserver kept the flooding peer"
        server.wait_for_line(r"closed connection from pid \d+ uid \d+: peer is not reading "
                             r"its messages \(output buffer full\)")
        assert_serving(server, start_fdapp)
    finally:
        channel.close()


def test_refused_peer_that_does_not_read_is_cut_off_keeping_nothing_it_sends(
        start_fdserver, start_fdapp):
    server = start_fdserver()
    channel, _ = client_connect(server.socket, "ctl")
    hostile = channel.sock
    r, w = os.pipe()
    try:
        channel.send({"type": "status"})
        answer = len(encode(channel.receive()[0], 1 << 24))
        # Twice what the kernel can buffer for us, and well within fdserver's
        # 1 MiB output limit: fdserver holds answers it cannot write yet...
        with open("/proc/sys/net/core/wmem_default") as f:
            count = 2 * int(f.read()) // answer + 1
        assert count * answer < 1024 * 1024
        hostile.sendall(encode({"type": "status"}) * count)
        # ...when it refuses us, so its error cannot go out at once.
        hostile.sendall(encode({"type": "state", "state": "ready"}))
        for _ in range(2):
            send_with_fds(hostile, frame({"type": "status", "fds": 100}), [w] * 100)
        os.close(w)
        w = -1
        poller = select.poll()
        poller.register(hostile, select.POLLRDHUP | select.POLLHUP)
        assert poller.poll(TIMEOUT * 1000), "fdserver kept a refused peer that does not read"
        wait_for_closed_log(server, "unexpected state message from a ctl")
        assert_all_closed(r)         # none of the descriptors sent after the refusal kept
        assert_serving(server, start_fdapp)
    finally:
        channel.close()
        close_fds([fd for fd in (r, w) if fd >= 0])


def test_a_ctl_connection_may_wait_for_at_most_16_workers_at_once(start_fdserver, start_fdapp):
    server = start_fdserver()
    channel, _ = client_connect(server.socket, "ctl")
    try:
        for pid in range(1_000_000, 1_000_017):
            channel.send({"type": "wait", "pid": pid, "state": "ready", "timeout": 600})
        assert_refused(channel.sock, r"^too many waits at once on one connection \(at most 16\)$")
        assert_serving(server, start_fdapp)
    finally:
        channel.close()
