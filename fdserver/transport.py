"""Frames and descriptors over a Unix stream socket.

:class:`Channel` turns a connected ``AF_UNIX`` socket into a stream of
``(message, fds)`` pairs and back.  It works on blocking sockets (the short
handshake of an app process, fdctl) and on non-blocking ones driven by an
asyncio loop (:class:`LoopChannel`, used by fdserver and by app processes
after the handshake).

Descriptors are received with ``MSG_CMSG_CLOEXEC`` and marked non-inheritable
again by hand: a copy leaked into a child process keeps a port bound after
everyone else closed it.  A truncated control message (``MSG_CTRUNC``, e.g.
the receiver ran out of descriptors) closes whatever did arrive and fails
loudly rather than losing listeners silently.
"""

from __future__ import annotations

import array
import asyncio
import collections
import errno
import fcntl
import os
import socket
import struct
import termios
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from .errors import ProtocolError, TransportError
from .protocol import (
    MAX_ANSWER,
    MAX_FDS_PER_FRAME,
    MAX_PAYLOAD,
    Decoder,
    ErrorMessage,
    Message,
    encode,
    fd_count,
)

RECV_BYTES = 64 * 1024
_ZERO = bytes(4)                # an int for ioctl() to fill in
# A peer that does not read its answers must not make us buffer without end.
MAX_OUTPUT = 1024 * 1024
# How long a peer being closed gets to read its last message.
CLOSING_GRACE = 2.0
# How long descriptors may wait for the rest of their frame.  Held without a
# deadline, a peer could park descriptors here for good, its own socket
# among them, so that its connection never even reaches EOF.
PARTIAL_FRAME_DEADLINE = 5.0
# Plain ints: socket's flags are IntFlag members, and every & on one goes
# through enum's Python code, on each message received.
_CMSG_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_ANCBUFSIZE = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * 4)

Ancdata = list[tuple[int, int, bytes]]
Recvmsg = Callable[[int, int, int], tuple[bytes, Ancdata, int, Any]]
# A message and the descriptors that came (or go) with it.
Envelope = tuple[Message, list[int]]


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def adopt_listener(fd: int, shut_down_ok: bool = False) -> socket.socket:
    """Wrap a received descriptor, checking it is a listening stream socket.

    Closes *fd* and raises TransportError if it is anything else.  With
    *shut_down_ok*, a TCP socket some holder shut down (no longer listening)
    passes too: the caller checks its address and listens on it again.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        os.close(fd)
        raise TransportError(f"received descriptor {fd} is not a socket: {exc.strerror}") from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        proto = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot inspect received socket: {exc.strerror}") from None
    if kind != socket.SOCK_STREAM or not (listening or shut_down_ok):
        sock.close()
        raise TransportError("received descriptor is not a listening stream socket")
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or proto != socket.IPPROTO_TCP:
        sock.close()
        raise TransportError("received descriptor is not a listening TCP socket")
    sock.set_inheritable(False)
    return sock


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Channel:
    """Framed messages with attached descriptors over one Unix socket.

    *recvmsg* is a seam for tests: it defaults to the socket's own and lets a
    test produce failures the kernel cannot be made to produce on demand.
    """

    def __init__(self, sock: socket.socket, *, recvmsg: Recvmsg | None = None,
                 server_side: bool = False) -> None:
        self.sock = sock
        self._recvmsg = recvmsg or sock.recvmsg
        # fdserver reads small frames from anyone; its answers can be larger.
        self._decoder = Decoder(MAX_PAYLOAD if server_side else MAX_ANSWER)
        self._send_limit = MAX_ANSWER if server_side else MAX_PAYLOAD
        self._fds: collections.deque[int] = collections.deque()
        self._inbox: collections.deque[Envelope] = collections.deque()
        # (bytes left, fds to attach, the message if we own those fds and
        # close them once sent, else None)
        self._outbox: collections.deque[tuple[memoryview, list[int], Message | None]] = \
            collections.deque()
        self._output_size = 0
        self.closed = False
        # Whether descriptors may wait here for the rest of their frame: a
        # peer that may not send any must not park them (fdserver opens it
        # only to a worker that its welcome asked for a handback).
        self.accept_fds = not server_side

    # -- receiving ---------------------------------------------------------

    def receive_some(self) -> bool:
        """Read once from the socket; return False at EOF.

        Raises BlockingIOError on a non-blocking socket with nothing to read,
        TransportError or ProtocolError when the connection is unusable.
        """
        data, ancdata, flags, _ = self._recvmsg(RECV_BYTES, _ANCBUFSIZE, _CMSG_CLOEXEC)
        fds = _fds_from(ancdata) if ancdata else []
        if flags & _MSG_CTRUNC:
            close_fds(fds)
            raise TransportError(
                "descriptors were truncated in transit (MSG_CTRUNC); "
                "is this process out of file descriptors (ulimit -n)?"
            )
        self._fds.extend(fds)
        if not data:
            return False
        for message in self._decoder.feed(data):
            count = fd_count(message)
            if count > len(self._fds):
                raise ProtocolError(f"{message['type']} message announced {count} "
                                    f"descriptors but {len(self._fds)} arrived")
            self._inbox.append((message, [self._fds.popleft() for _ in range(count)]))
        waiting = len(self._fds)
        if waiting and self._decoder.pending and not self.accept_fds:
            self._drop_waiting(f"unexpected descriptors ({waiting}, with a frame not yet "
                               "complete)")
        if waiting > MAX_FDS_PER_FRAME or (waiting and not self._decoder.pending):
            # Descriptors ride on a frame's first byte: at most one frame's
            # worth can be waiting for the rest of its frame.
            self._drop_waiting(f"{waiting} unannounced descriptors received")
        return True

    def _drop_waiting(self, reason: str) -> NoReturn:
        """Close the descriptors no complete frame has claimed; the peer is refused."""
        close_fds(self._fds)
        self._fds.clear()
        raise ProtocolError(reason)

    @property
    def holds_partial(self) -> bool:
        """Descriptors have arrived whose frame has not, yet."""
        return bool(self._fds)

    def next_message(self) -> Envelope | None:
        """The next complete message and its descriptors, if one has arrived."""
        return self._inbox.popleft() if self._inbox else None

    def receive(self) -> Envelope:
        """Block until a whole message is in (honours the socket's timeout)."""
        while not self._inbox:
            if not self.receive_some():
                raise TransportError("connection closed by peer")
        return self._inbox.popleft()

    # -- sending -----------------------------------------------------------

    def queue(self, message: Message, fds: list[int] | tuple[int, ...] = (), *,
              owned: bool = False) -> None:
        """Append a frame to the output; call flush() to write it.

        With *owned*, the channel takes the descriptors over and closes them
        once sent (or when it closes, unless take_unsent() took them back):
        the caller must not close them.  If the output is full, this raises
        TransportError and the descriptors stay the caller's.
        """
        if len(fds) != fd_count(message):
            raise ValueError("message 'fds' count does not match the descriptors given")
        frame = encode(message, self._send_limit)
        if self._output_size + len(frame) > MAX_OUTPUT:
            raise TransportError("peer is not reading its messages (output buffer full)")
        self._outbox.append((memoryview(frame), list(fds), message if owned else None))
        self._output_size += len(frame)

    def flush(self) -> bool:
        """Write what the socket takes now; True once everything is sent."""
        while self._outbox:
            data, fds, owned_message = self._outbox[0]
            ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            sent = self.sock.sendmsg([data], ancdata)
            self._output_size -= sent
            if owned_message is not None:
                close_fds(fds)      # the peer has its copies now
            if sent < len(data):
                # Descriptors travel with the first byte only.
                self._outbox[0] = (data[sent:], [], None)
                return False
            self._outbox.popleft()
        return True

    def send(self, message: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Queue and write a frame on a blocking socket."""
        self.queue(message, fds)
        while not self.flush():
            pass

    @property
    def wants_write(self) -> bool:
        return bool(self._outbox)

    def take_unsent(self) -> list[Envelope]:
        """Take back the owned messages not yet begun, with their descriptors."""
        taken = [(message, fds) for _, fds, message in self._outbox if message is not None]
        if taken:
            kept = [entry for entry in self._outbox if entry[2] is None]
            self._outbox = collections.deque(kept)
            self._output_size = sum(len(entry[0]) for entry in kept)
        return taken

    def discard_input(self) -> None:
        """Drop what was received and not yet taken, closing its descriptors."""
        close_fds(self._fds)
        self._fds.clear()
        for _, fds in self._inbox:
            close_fds(fds)
        self._inbox.clear()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.discard_input()
        for _, fds, owned_message in self._outbox:
            if owned_message is not None:
                close_fds(fds)
        self._outbox.clear()
        self.sock.close()


def _fds_from(ancdata: Ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % received.itemsize])
            fds.extend(received)
    if not _CMSG_CLOEXEC:
        # Without MSG_CMSG_CLOEXEC (not Linux) they arrive inheritable.
        for fd in fds:
            os.set_inheritable(fd, False)
    return fds


class LoopChannel:
    """A non-blocking Channel driven by an asyncio loop.

    *on_message(message, fds)* runs for each message (it owns the fds);
    *on_close(reason)* runs once when the connection ends, with None for a
    clean EOF or a one-line reason.  *on_unsent(messages)*, if given, runs
    just before it with the owned messages that never went out, as
    ``(message, fds)`` pairs it then owns (otherwise their fds are closed).
    """

    def __init__(
        self,
        channel: Channel,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[Message, list[int]], None],
        on_close: Callable[[str | None], None],
        on_unsent: Callable[[list[Envelope]], None] | None = None,
    ) -> None:
        self.channel = channel
        self._loop = loop
        self._on_message = on_message
        self._on_close = on_close
        self._on_unsent = on_unsent
        self._writing = False
        self._closing = False
        self._partial: asyncio.TimerHandle | None = None
        channel.sock.setblocking(False)
        loop.add_reader(channel.sock.fileno(), self._readable)
        # Messages read together with the handshake are already in the inbox.
        loop.call_soon(self._deliver)

    @property
    def closed(self) -> bool:
        return self.channel.closed

    def peer_has_unread(self) -> bool:
        """Whether the peer has yet to read something sent to it.

        On a Unix socket SIOCOUTQ (TIOCOUTQ) counts what was sent and not yet
        read by the other end, in the kernel's accounting units: 0 when the
        peer has read everything.
        """
        if self.channel.wants_write:
            return True
        try:
            return fcntl.ioctl(self.channel.sock.fileno(), termios.TIOCOUTQ, _ZERO) != _ZERO
        except OSError:
            return False

    @property
    def usable(self) -> bool:
        """Open and not on its way to closing: worth sending work to."""
        return not self.channel.closed and not self._closing

    def flush_now(self) -> None:
        """Write what the socket takes right now (before a close)."""
        if not self.closed:
            try:
                self.channel.flush()
            except OSError:
                pass

    def send(self, message: Message, fds: list[int] | tuple[int, ...] = (), *,
             owned: bool = False) -> None:
        if self.closed or self._closing:
            if owned:
                self._give_back([(message, list(fds))])
            return
        try:
            self.channel.queue(message, fds, owned=owned)
        except TransportError as exc:
            self.close(str(exc), unsent=[(message, list(fds))] if owned else [])
            return
        self._write()

    def send_and_close(self, message: ErrorMessage) -> None:
        """Send a last message (an error), then close once it is written.

        Nothing more is read from the peer meanwhile, and a peer that has not
        read what is queued for it within CLOSING_GRACE is cut off.
        """
        if self.closed or self._closing:
            return
        self.send(message)
        if self.closed:
            return
        self._closing = True
        if not self.channel.wants_write:
            self.close(message.get("message"))
            return
        self._loop.remove_reader(self.channel.sock.fileno())
        self.channel.discard_input()
        self._loop.call_later(CLOSING_GRACE, self.close, message.get("message"))

    def _write(self) -> None:
        try:
            done = self.channel.flush()
        except BlockingIOError:
            done = False
        except OSError as exc:
            # A peer that left (EPIPE) may have said its last words first
            # (a worker's "draining", its last metrics): read them before closing.
            self._read_what_is_left()
            self.close(f"write failed: {exc.strerror or exc}")
            return
        if done:
            if self._writing:
                self._loop.remove_writer(self.channel.sock.fileno())
                self._writing = False
            if self._closing:
                self.close(None)
        elif not self._writing:
            self._loop.add_writer(self.channel.sock.fileno(), self._write)
            self._writing = True

    def _readable(self) -> None:
        try:
            alive = self.channel.receive_some()
        except BlockingIOError:
            return
        except (ProtocolError, TransportError) as exc:
            if not self._closing:
                self.send_and_close({"type": "error", "message": str(exc)})
            else:
                self.close(str(exc))
            return
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                self.close(None)
            else:
                self.close(f"read failed: {exc.strerror or exc}")
            return
        self._deliver()
        if not alive:
            self.close(None)
        elif self.channel.holds_partial and self._partial is None:
            self._partial = self._loop.call_later(PARTIAL_FRAME_DEADLINE, self._partial_expired)
        elif not self.channel.holds_partial and self._partial is not None:
            self._partial.cancel()
            self._partial = None

    def _read_what_is_left(self) -> None:
        for _ in range(64):           # bounded: what a peer sent before it left
            if self.closed or self._closing:
                return
            try:
                alive = self.channel.receive_some()
            except (OSError, ProtocolError, TransportError):
                return
            self._deliver()
            if not alive:
                return

    def _partial_expired(self) -> None:
        self._partial = None
        if not self.closed and self.channel.holds_partial:
            self.send_and_close({"type": "error", "message": "a frame with descriptors stayed "
                                 f"incomplete for {PARTIAL_FRAME_DEADLINE:g}s"})

    def _deliver(self) -> None:
        while not self.closed and not self._closing:
            item = self.channel.next_message()
            if item is None:
                break
            self._on_message(*item)

    def close(self, reason: str | None,
              unsent: list[Envelope] | None = None) -> None:
        if self.closed:
            return
        if self._partial is not None:
            self._partial.cancel()
            self._partial = None
        unsent = self.channel.take_unsent() + (unsent or [])     # oldest first
        fileno = self.channel.sock.fileno()
        self._loop.remove_reader(fileno)
        if self._writing:
            self._loop.remove_writer(fileno)
        self.channel.close()
        self._give_back(unsent)
        self._on_close(reason)

    def _give_back(self, unsent: list[Envelope]) -> None:
        if unsent and self._on_unsent:
            self._on_unsent(unsent)
        else:
            for _, fds in unsent:
                close_fds(fds)
