"""Descriptors through the real kernel: SCM_RIGHTS over a socketpair.

Every descriptor a test hands over is accounted for afterwards: a pipe's read
end sees EOF only once every copy of its write end is closed, in any process.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import gc
import json
import os
import resource
import select
import socket
import sys

import pytest

from fdserver.errors import ProtocolError, TransportError
from fdserver.protocol import MAX_FDS_PER_FRAME, encode
from fdserver.transport import MAX_OUTPUT, Channel, adopt_listener, close_fds, peer_credentials

TIMEOUT = 10.0


@pytest.fixture
def pair():
    """Two connected AF_UNIX stream sockets, both blocking with a timeout."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (left, right):
        sock.settimeout(TIMEOUT)
    try:
        yield left, right
    finally:
        left.close()
        right.close()


@pytest.fixture
def pipe():
    """(read end, write end); the test may close either, the rest is closed after."""
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        close_fds((r, w))


@contextlib.contextmanager
def listening_sockets(count: int):
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(("127.0.0.1", 0))
            sock.listen(8)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def describe(sock: socket.socket) -> dict:
    host, port = sock.getsockname()
    return {"name": f"l{port}", "family": "AF_INET", "address": f"{host}:{port}"}


def send_raw(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """sendmsg with SCM_RIGHTS, bypassing Channel's own checks."""
    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    assert sock.sendmsg([data], ancdata) == len(data)


def assert_all_closed(read_fd: int, timeout: float = TIMEOUT) -> None:
    """EOF on *read_fd*: no process holds its pipe's write end any more."""
    ready, _, _ = select.select([read_fd], [], [], timeout)
    assert ready, "a copy of the pipe's write end is still open somewhere"
    assert os.read(read_fd, 1) == b""


def assert_closed(*fds: int) -> None:
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def open_fds() -> set[int]:
    gc.collect()
    listed = {int(name) for name in os.listdir("/proc/self/fd")}
    # Drop the descriptor listdir itself used, closed by now.
    return {fd for fd in listed if _is_open(fd)}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def nofile_raised():
    """Raise the soft RLIMIT_NOFILE to the hard limit for this test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- credentials -----------------------------------------------------------------

def test_peer_credentials_are_ours(pair):
    left, right = pair
    assert peer_credentials(left) == (os.getpid(), os.getuid(), os.getgid())
    assert peer_credentials(right) == (os.getpid(), os.getuid(), os.getgid())


# -- a real round trip -------------------------------------------------------------

@pytest.mark.parametrize("inheritable", [False, True], ids=["cloexec", "inheritable-at-sender"])
def test_listener_round_trip_through_scm_rights(pair, inheritable):
    left, right = pair
    with listening_sockets(1) as [original]:
        original.set_inheritable(inheritable)
        message = {"type": "listeners", "listeners": [describe(original)], "fds": 1,
                   "more": False}
        Channel(left).send(message, [original.fileno()])
        received, fds = Channel(right).receive()
        assert received == message
        [fd] = fds
        assert fd != original.fileno()
        # Close-on-exec whatever the sender's flag: a forked child must not keep the port.
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not os.get_inheritable(fd)
        with adopt_listener(fd) as sock:
            assert sock.fileno() == fd
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            assert sock.getsockname() == original.getsockname()
            assert not sock.get_inheritable()
            # A real TCP connection to the original port comes out of the copy.
            sock.settimeout(TIMEOUT)
            with socket.create_connection(original.getsockname(), timeout=TIMEOUT) as client:
                conn, peer = sock.accept()
                with conn:
                    assert peer == client.getsockname()
                    client.sendall(b"ping")
                    assert conn.recv(4) == b"ping"
        assert_closed(fd)
        # The sender's socket is untouched by all this.
        assert original.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def test_descriptors_ride_with_the_first_byte_of_a_split_frame(pair, pipe):
    left, right = pair
    r, w = pipe
    data = encode({"type": "listeners", "listeners": [], "fds": 1, "more": False})
    send_raw(left, data[:3], [w])
    os.close(w)
    channel = Channel(right)
    assert channel.receive_some() is True
    assert channel.next_message() is None        # half a frame: fds held, not stray
    left.sendall(data[3:])
    message, [fd] = channel.receive()
    assert message["fds"] == 1
    os.close(fd)
    assert_all_closed(r)


def test_partial_writes_send_the_descriptors_exactly_once(pair, pipe):
    left, right = pair
    r, w = pipe
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    left.setblocking(False)
    big = {"type": "error", "message": "x" * 60_000, "fds": 1}
    sender, receiver = Channel(left), Channel(right)
    sender.queue(big, [w])
    sender.queue({"type": "status"})

    def flush() -> bool:
        try:
            return sender.flush()
        except BlockingIOError:
            return False

    rounds = 0
    while not flush():
        rounds += 1
        receiver.receive_some()
    os.close(w)         # queue() does not dup: the fd had to stay open until written
    assert rounds > 0, "the frame should not have fit the send buffer at once"
    first, [fd] = receiver.receive()
    assert first == big
    assert receiver.receive() == ({"type": "status"}, [])
    os.close(fd)
    assert_all_closed(r)


def test_more_than_one_frame_of_listeners_is_batched(pair, nofile_raised):
    count = 300
    if nofile_raised < 3 * count + 100:
        pytest.skip(f"hard RLIMIT_NOFILE {nofile_raised} is too low for {count} listeners")
    left, right = pair
    with listening_sockets(count) as originals:
        sender, receiver = Channel(left), Channel(right)
        batches = [originals[i:i + MAX_FDS_PER_FRAME]
                   for i in range(0, count, MAX_FDS_PER_FRAME)]
        assert [len(b) for b in batches] == [252, 48]
        for n, batch in enumerate(batches, 1):
            sender.send({"type": "listeners", "listeners": [describe(s) for s in batch],
                         "fds": len(batch), "more": n < len(batches)},
                        [s.fileno() for s in batch])
        received, sizes, more = [], [], True
        try:
            while more:
                message, fds = receiver.receive()
                sizes.append(len(fds))
                more = message["more"]
                assert len(message["listeners"]) == len(fds)
                received += [adopt_listener(fd) for fd in fds]
            assert sizes == [252, 48]
            assert [s.getsockname() for s in received] == [s.getsockname() for s in originals]
            assert all(not s.get_inheritable() for s in received)
        finally:
            for sock in received:
                sock.close()


def test_a_frame_of_more_than_252_descriptors_is_refused_before_sending(pair):
    left, right = pair
    with listening_sockets(1) as [sock]:
        fds = [sock.fileno()] * (MAX_FDS_PER_FRAME + 1)
        with pytest.raises(ProtocolError, match="announces 253 descriptors"):
            Channel(left).queue({"type": "listeners", "listeners": [], "fds": len(fds),
                                 "more": False}, fds)
    right.setblocking(False)
    with pytest.raises(BlockingIOError):
        right.recv(1)


# -- descriptors that do not match their frame ----------------------------------------

def test_descriptors_on_a_frame_that_announced_none_are_closed(pair, pipe):
    left, right = pair
    r, w = pipe
    send_raw(left, encode({"type": "status"}), [w, w])
    os.close(w)
    channel = Channel(right)
    with pytest.raises(ProtocolError, match="2 unannounced descriptors received"):
        channel.receive_some()
    assert_all_closed(r)
    channel.close()


def test_a_frame_announcing_more_descriptors_than_arrived_is_an_error(pair, pipe):
    left, right = pair
    r, w = pipe
    send_raw(left, encode({"type": "listeners", "listeners": [], "fds": 2, "more": False}), [w])
    os.close(w)
    channel = Channel(right)
    with pytest.raises(ProtocolError, match="announced 2 descriptors but 1 arrived"):
        channel.receive_some()
    channel.close()
    assert_all_closed(r)


def test_queue_refuses_a_count_that_does_not_match_the_descriptors(pair, pipe):
    left, _ = pair
    with pytest.raises(ValueError, match="'fds' count does not match"):
        Channel(left).queue({"type": "status"}, [pipe[1]])
    with pytest.raises(ValueError, match="'fds' count does not match"):
        Channel(left).queue({"type": "status", "fds": 1})


def test_receive_at_eof_is_a_transport_error(pair):
    left, right = pair
    left.sendall(encode({"type": "status"})[:4])
    left.close()
    with pytest.raises(TransportError, match="connection closed by peer"):
        Channel(right).receive()


def test_a_peer_that_never_reads_cannot_grow_our_buffer_without_end(pair):
    left, _ = pair
    left.setblocking(False)
    channel = Channel(left)
    frame = {"type": "error", "message": "x" * 60_000}
    with pytest.raises(TransportError, match="output buffer full"):
        for _ in range(MAX_OUTPUT // 60_000 + 2):
            channel.queue(frame)


# -- adopt_listener ----------------------------------------------------------------

def _unbound_tcp() -> tuple[int, list]:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM).detach(), []


def _bound_tcp_not_listening() -> tuple[int, list]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock.detach(), []


def _connected_tcp() -> tuple[int, list]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    return client.detach(), [server]


def _udp() -> tuple[int, list]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock.detach(), []


def _unix_datagram() -> tuple[int, list]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    return a.detach(), [b]


def _pipe() -> tuple[int, list]:
    r, w = os.pipe()
    return r, [w]


def _dev_null() -> tuple[int, list]:
    return os.open(os.devnull, os.O_RDONLY), []


@pytest.mark.parametrize("make", [_unbound_tcp, _bound_tcp_not_listening, _connected_tcp, _udp,
                                  _unix_datagram, _pipe, _dev_null],
                         ids=lambda f: f.__name__.strip("_"))
def test_adopt_listener_refuses_and_closes_anything_but_a_listener(make):
    fd, keep = make()
    try:
        with pytest.raises(TransportError, match=r"not a (listening stream )?socket"):
            adopt_listener(fd)
        assert_closed(fd)
    finally:
        for other in keep:
            if isinstance(other, int):
                os.close(other)
            else:
                other.close()


def test_adopt_listener_takes_a_listening_socket_and_makes_it_cloexec():
    with listening_sockets(1) as [original]:
        fd = os.dup(original.fileno())
        os.set_inheritable(fd, True)
        with adopt_listener(fd) as sock:
            assert sock.fileno() == fd
            assert not os.get_inheritable(fd)
            assert sock.type == socket.SOCK_STREAM and sock.family == socket.AF_INET


# -- MSG_CTRUNC ----------------------------------------------------------------------

def test_msg_ctrunc_from_the_seam_closes_what_arrived(pair):
    _, right = pair
    r, w = os.pipe()
    data = encode({"type": "listeners", "listeners": [], "fds": 2, "more": False})
    calls = []

    def recvmsg(bufsize, ancbufsize, flags):
        calls.append((bufsize, ancbufsize, flags))
        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]).tobytes())]
        return data, ancdata, socket.MSG_CTRUNC, None

    channel = Channel(right, recvmsg=recvmsg)
    with pytest.raises(TransportError, match=r"MSG_CTRUNC.*ulimit -n"):
        channel.receive_some()
    assert_closed(r, w)
    assert channel.next_message() is None
    [(_, ancbufsize, flags)] = calls
    assert ancbufsize >= socket.CMSG_SPACE(MAX_FDS_PER_FRAME * 4)
    assert flags == socket.MSG_CMSG_CLOEXEC        # received fds are close-on-exec at once


def test_msg_ctrunc_for_real_when_a_frame_carries_more_than_the_receiver_expects(pair, pipe):
    # The kernel takes up to 253 descriptors in one message; Channel makes room for 252.
    left, right = pair
    r, w = pipe
    before = open_fds()
    send_raw(left, encode({"type": "status"}), [w] * (MAX_FDS_PER_FRAME + 1))
    os.close(w)
    channel = Channel(right)
    with pytest.raises(TransportError, match="MSG_CTRUNC"):
        channel.receive_some()
    assert open_fds() <= before - {w}
    assert_all_closed(r)


CHILD = r"""
import json, os, resource, socket, sys
from fdserver.errors import FdserverError
from fdserver.transport import Channel

def open_fds():
    # fstat allocates no descriptor, unlike listing /proc/self/fd.
    found = set()
    for fd in range(4096):
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.add(fd)
    return found

sock = socket.socket(fileno=int(sys.argv[1]))
sock.settimeout(30)
arrived = []

def recvmsg(*args):
    # The kernel's own recvmsg; this only counts what it installed.
    data, ancdata, flags, address = sock.recvmsg(*args)
    arrived.extend(len(cmsg[2]) // 4 for cmsg in ancdata)
    return data, ancdata, flags, address

channel = Channel(sock, recvmsg=recvmsg)
before = open_fds()
free, limit = 0, 0
while free < int(sys.argv[2]):          # leave exactly this many free slots
    if limit not in before:
        free += 1
    limit += 1
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print("ready", limit, flush=True)
try:
    channel.receive_some()
    outcome = {"raised": None, "message": None}
except FdserverError as exc:
    outcome = {"raised": type(exc).__name__, "message": str(exc)}
outcome["arrived"] = sum(arrived)
outcome["leaked"] = sorted(open_fds() - before)
outcome["lost"] = sorted(before - open_fds())
print("RESULT", json.dumps(outcome), flush=True)
sock.recv(1)                            # stay alive until the parent has checked
"""


def test_msg_ctrunc_for_real_in_a_process_out_of_descriptors(pair, procs):
    left, right = pair
    free_slots, sent = 3, 10
    child = procs.start([sys.executable, "-c", CHILD, str(right.fileno()), str(free_slots)],
                        pass_fds=[right.fileno()])
    right.close()
    child.wait_for_line(r"^ready \d+")
    pipes = [os.pipe() for _ in range(sent)]
    try:
        send_raw(left, encode({"type": "listeners", "listeners": [], "fds": sent,
                               "more": False}), [w for _, w in pipes])
        close_fds(w for _, w in pipes)
        result = json.loads(child.wait_for_line(r"^RESULT (.*)$").group(1))
        assert result["raised"] == "TransportError", child.output
        assert "MSG_CTRUNC" in result["message"]
        assert result["arrived"] == free_slots, result
        assert result["leaked"] == [] and result["lost"] == [], result
        # Every copy is gone while the child still lives: the 3 it took in were
        # closed by Channel, the 7 it had no room for were dropped by the kernel.
        for r, _ in pipes:
            assert_all_closed(r)
        assert child.popen.poll() is None
    finally:
        close_fds(r for r, _ in pipes)
        left.close()
    assert child.wait() == 0, child.output


@pytest.mark.parametrize("accept_fds, refusal", [
    (False, r"^unexpected descriptors \(250, with a frame not yet complete\)$"),
    (True, r"^500 unannounced descriptors received$"),
], ids=["peer-not-asked-for-any", "worker-asked-for-a-handback"])
def test_descriptors_cannot_pile_up_behind_an_unfinished_frame(pair, pipe, accept_fds,
                                                               refusal):
    """A peer that dribbles a frame, 250 descriptors per byte, is cut off: at
    once if it may send none, past one frame's worth if it may."""
    left, right = pair
    r, w = pipe
    header = encode({"type": "status"})[:8]         # announces a payload never sent
    send_raw(left, header[:4], [w] * 250)
    send_raw(left, header[4:], [w] * 250)
    os.close(w)
    channel = Channel(right, server_side=True)
    channel.accept_fds = accept_fds
    with pytest.raises(ProtocolError, match=refusal):
        while True:
            channel.receive_some()
    channel.close()         # what was not read yet goes with the socket
    assert_all_closed(r)
