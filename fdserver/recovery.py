"""Taking listeners back from the workers when fdserver restarts.

If fdserver dies (SIGKILL, OOM, a crash) or is restarted for an upgrade, the
workers keep serving: each holds its own copy of every listener.  But the
port is still bound by that kernel socket, so the new fdserver's ``bind``
fails with EADDRINUSE and no new worker could ever join.  Instead of failing,
the new fdserver waits a bounded time for a worker to hand the listener back:

* running workers notice the EOF on their registration, reconnect with a
  ``resume`` hello, and when the welcome asks for it, send a ``handback``
  message with their listening sockets attached;
* fdserver accepts a handed-back socket only from an allowed peer (the
  allow-list, checked on SO_PEERCRED like every worker), only in answer to
  its own welcome (the handback echoes the welcome's token), only if it is a
  listening TCP socket in fdserver's own network namespace (SO_NETNS_COOKIE),
  and only if its bound address is exactly one of the ``--bind`` addresses
  it could not bind.  fdserver never sets SO_REUSEPORT, so while that socket
  lives no other socket in the namespace can be bound to the same address:
  a match is the very socket the old fdserver bound, with its accept queue
  intact;
* if nobody hands it back in time, fdserver fails as it always did:
  ``cannot bind ADDRESS: address already in use``.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from typing import Any

from .errors import BindError, ProtocolError, TransportError
from .listeners import DEFAULT_BACKLOG, BindSpec, Listener, format_address, put_right
from .transport import adopt_listener, close_fds

DEFAULT_RECOVER_TIMEOUT = 10.0
# Linux >= 5.14; Python's socket module does not name it.
SO_NETNS_COOKIE = getattr(socket, "SO_NETNS_COOKIE", 71)

log = logging.getLogger("fdserver")


def netns_cookie(sock: socket.socket) -> int | None:
    """The network namespace *sock* lives in, or None if the kernel can't say."""
    try:
        cookie: int = struct.unpack(
            "Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
        return cookie
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
            return None
        raise


def same_address(spec: BindSpec, sock: socket.socket) -> bool:
    """Is *sock* bound to exactly the address *spec* names?"""
    if sock.family != spec.family:
        return False
    host, port = sock.getsockname()[:2]
    try:
        return (port == spec.port and
                socket.inet_pton(spec.family, host) == socket.inet_pton(spec.family, spec.host))
    except OSError:             # e.g. a scoped IPv6 address: not one we bind
        return False


class Recovery:
    """The --bind addresses still missing, and the rules for taking them back."""

    def __init__(self, missing: list[BindSpec], timeout: float = DEFAULT_RECOVER_TIMEOUT,
                 backlog: int = DEFAULT_BACKLOG) -> None:
        self.specs = list(missing)       # what could not be bound at start
        self.missing = list(missing)     # what no worker has handed back yet
        self.timeout = timeout
        self.backlog = backlog           # to listen again on one a worker shut down
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as own:
            self.netns = netns_cookie(own)
        if self.netns is None:
            log.warning("this kernel cannot tell a socket's network namespace "
                        "(SO_NETNS_COOKIE, Linux 5.14); handed-back listeners are checked "
                        "by address only")

    @property
    def done(self) -> bool:
        return not self.missing

    def describe(self, specs: list[BindSpec] | None = None) -> str:
        return ", ".join(spec.address for spec in (self.missing if specs is None else specs))

    def failure(self) -> BindError:
        return BindError(f"cannot bind {self.describe()}: address already in use, and no "
                         f"worker handed it back within {self.timeout:g}s (is another "
                         "server on it?)")

    def take(self, fds: list[int], described: list[Any]) -> list[Listener]:
        """Adopt the handed-back descriptors that fill a missing address.

        A socket for an address already taken back (another worker was
        faster) is closed.  Anything else refuses the whole handback: every
        descriptor is closed and ProtocolError says why.
        """
        if len(described) != len(fds):
            close_fds(fds)
            raise ProtocolError(f"handback describes {len(described)} sockets "
                                f"but carries {len(fds)}")
        socks: list[socket.socket] = []
        try:
            for i, fd in enumerate(fds):
                try:
                    socks.append(adopt_listener(fd, shut_down_ok=True))
                except TransportError as exc:
                    close_fds(fds[i + 1:])
                    raise ProtocolError(f"handback refused: {exc}") from None
            for sock in list(socks):
                if self.netns is not None and netns_cookie(sock) != self.netns:
                    raise ProtocolError(
                        f"handback refused: the socket bound to {_address(sock)} is in "
                        "another network namespace")
                if not any(same_address(spec, sock) for spec in self.specs):
                    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                        # Shut down while no fdserver put it right: its port was
                        # free, and this fdserver bound it afresh.  Dead, not hostile.
                        log.warning("ignored the socket handed back for %s: a process "
                                    "holding it had shut it down", _address(sock))
                        socks.remove(sock)
                        sock.close()
                        continue
                    raise ProtocolError(
                        f"handback refused: a socket bound to {_address(sock)} matches no "
                        f"--bind address this fdserver recovers ({self.describe(self.specs)})")
            for sock in socks:
                # One shut down or made blocking by some holder is still the
                # bound socket: fdserver's to put right, not a reason to lose it.
                try:
                    wrong = put_right(sock, self.backlog)
                except OSError as exc:
                    raise ProtocolError(
                        f"handback refused: the socket bound to {_address(sock)} was shut "
                        f"down and cannot listen again: {exc.strerror}") from None
                if wrong:
                    log.warning("the socket handed back for %s had been %s by a process "
                                "holding it; put right", _address(sock), " and ".join(wrong))
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        taken: list[Listener] = []
        for sock in socks:
            spec = next((s for s in self.missing if same_address(s, sock)), None)
            if spec is None:
                sock.close()
            else:
                self.missing.remove(spec)
                taken.append(Listener(spec.name, sock))
        return taken


def _address(sock: socket.socket) -> str:
    return format_address(sock.family, sock.getsockname())
