"""Listening sockets: parse ``--bind`` specs, bind them, describe them, and
put them right when a process holding them changed them.

Every worker holds the very listening sockets fdserver holds, and the
non-blocking flag (on the open file description) and the listening state
are shared by all holders.  One worker's ``setblocking(True)`` would make
everyone's accept wait for a connection, and its ``shutdown()`` would stop
the port for all, outliving the worker.  So fdserver accepts only when poll
says a connection waits (:func:`nonblocking_accept`), and checks its
listeners every GUARD_INTERVAL, setting them back (:func:`put_right`).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import AddressInUseError, BindError

DEFAULT_NAME = "http"
DEFAULT_BACKLOG = 1024
GUARD_INTERVAL = 1.0        # seconds between checks of the listeners

log = logging.getLogger("fdserver")


@dataclass(frozen=True)
class BindSpec:
    name: str
    host: str
    port: int
    family: socket.AddressFamily

    @property
    def address(self) -> str:
        return format_address(self.family, (self.host, self.port))


@dataclass
class Listener:
    """A bound, listening socket and the name apps know it by."""

    name: str
    sock: socket.socket
    tls: bool = False       # workers wrap its connections in TLS (fdserver.certificates)
    proxy: bool = False     # its connections start with a PROXY header (fdserver.proxyproto)

    @property
    def family(self) -> str:
        return self.sock.family.name

    @property
    def address(self) -> str:
        return format_address(self.sock.family, self.sock.getsockname())

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"name": self.name, "family": self.family,
                                     "address": self.address}
        if self.tls:
            described["tls"] = True
        if self.proxy:
            described["proxy"] = True
        return described


def format_address(family: int, sockaddr: tuple[Any, ...]) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def parse_bind(spec: str) -> BindSpec:
    """Parse ``[NAME=]HOST:PORT``; IPv6 hosts are bracketed: ``[::]:80``."""
    name, sep, rest = spec.partition("=")
    if not sep:
        name, rest = DEFAULT_NAME, spec
    if not name.isidentifier():
        raise BindError(f"--bind {spec}: listener name {name!r} must be a word like 'http'")
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
        family = socket.AF_INET6
    else:
        host, sep, port = rest.rpartition(":")
        family = socket.AF_INET
    if sep and host and port.isdigit() and int(port) > 65535:
        raise BindError(f"--bind {spec}: port {int(port)} is out of range (0-65535)")
    if not sep or not host or not port.isdigit():
        raise BindError(f"--bind {spec}: expected HOST:PORT, e.g. 0.0.0.0:80 or [::]:80")
    try:
        socket.inet_pton(family, host)
    except OSError:
        if family == socket.AF_INET and ":" in host:
            raise BindError(f"--bind {spec}: an IPv6 address goes in brackets: "
                            f"[{host}]:{port}") from None
        raise BindError(f"--bind {spec}: {host!r} is not a numeric IP address") from None
    return BindSpec(name, host, int(port), family)


def bind(spec: BindSpec, backlog: int = DEFAULT_BACKLOG) -> Listener:
    """Bind and listen, non-blocking, with SO_REUSEADDR (as tornado's netutil)."""
    try:
        sock = _listening(spec, backlog)
    except OSError as exc:
        error = AddressInUseError if exc.errno == errno.EADDRINUSE else BindError
        raise error(f"cannot bind {spec.address}: {_why(exc, spec.port)}") from None
    return Listener(spec.name, sock)


def bind_own(flag: str, given: str, spec: BindSpec, backlog: int = 128) -> socket.socket:
    """A listening socket fdserver serves itself (``--metrics``, ``--agent``): never
    handed to a worker; errors name *flag* and the address as *given*."""
    try:
        return _listening(spec, backlog)
    except OSError as exc:
        why = (exc.strerror or str(exc)).lower()
        if exc.errno == errno.EADDRINUSE:
            why += f" (another fdserver's {flag}, or another program, on it?)"
        elif exc.errno == errno.EACCES and spec.port < 1024:
            why += " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        raise BindError(f"{flag} {given}: cannot bind: {why}") from None


def _listening(spec: BindSpec, backlog: int) -> socket.socket:
    sock = socket.socket(spec.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if spec.family == socket.AF_INET6:
            # Let 0.0.0.0:80 and [::]:80 be bound side by side.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((spec.host, spec.port))
        sock.listen(backlog)
        # O_NONBLOCK lives on the open file description that every holder
        # shares; Tornado's accept loop needs it.
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind_all(specs: list[BindSpec], backlog: int = DEFAULT_BACKLOG, *,
             defer_in_use: bool = False) -> tuple[list[Listener], list[BindSpec]]:
    """Bind every spec; return the listeners and the specs found in use.

    Without *defer_in_use*, an address in use is an error like any other.
    """
    listeners: list[Listener] = []
    in_use: list[BindSpec] = []
    try:
        for spec in specs:
            try:
                listeners.append(bind(spec, backlog))
            except AddressInUseError:
                if not defer_in_use:
                    raise
                in_use.append(spec)
    except BindError:
        for listener in listeners:
            listener.sock.close()
        raise
    return listeners, in_use


def _why(exc: OSError, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use (is another server, or an old fdserver's worker, on it?)"
    if exc.errno == errno.EACCES and port < 1024:
        return ("permission denied: ports below 1024 need privilege (start fdserver "
                "as root with --user NAME, or grant it CAP_NET_BIND_SERVICE)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return "address not available on this host"
    return (exc.strerror or str(exc)).lower()


def put_right(sock: socket.socket, backlog: int = DEFAULT_BACKLOG,
              address: Any = None) -> list[str]:
    """Undo what a holder of listening socket *sock* may have changed for all.

    Sets O_NONBLOCK again if it was cleared, and listens again if the socket
    was shut down.  A port given in the bind stays bound (listen() needs no
    privilege); one the kernel chose (port 0) was let go, though getsockname()
    still shows it, and is bound again to *address* (what getsockname() said
    before).  Returns what was wrong, as phrases for a log line; raises
    OSError if listening again failed (another socket took the port meanwhile).
    """
    wrong = []
    flags = fcntl.fcntl(sock.fileno(), fcntl.F_GETFL)
    if not flags & os.O_NONBLOCK:
        fcntl.fcntl(sock.fileno(), fcntl.F_SETFL, flags | os.O_NONBLOCK)
        wrong.append("made blocking")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        wrong.append("shut down")
        if address is not None:
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno != errno.EINVAL:   # EINVAL: still bound, as it should be
                    raise
        sock.listen(backlog)
        if address is not None and sock.getsockname() != address:
            raise OSError(errno.EADDRINUSE, f"listening again on {sock.getsockname()}")
    return wrong


def nonblocking_accept(sock: socket.socket,
                       accept: Callable[[], tuple[int, Any]]) -> Callable[[], tuple[int, Any]]:
    """*accept* (a raw accept of *sock*), called only when poll says a
    connection waits: it cannot block even if a holder cleared O_NONBLOCK
    (unless another holder takes that connection in between)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)

    def guarded() -> tuple[int, Any]:
        if not poller.poll(0):
            raise BlockingIOError
        return accept()
    return guarded


class ListenerGuard:
    """Checks *listeners* every GUARD_INTERVAL and puts them right, saying so."""

    def __init__(self, loop: asyncio.AbstractEventLoop, listeners: list[Listener],
                 backlog: int = DEFAULT_BACKLOG) -> None:
        self._loop = loop
        self._listeners = listeners
        self._backlog = backlog
        self._timer: asyncio.TimerHandle | None = None
        self._failing: set[int] = set()        # listeners whose repair failed, logged once
        # fd -> its bound address, from the start (a port the kernel chose
        # is let go by a shutdown: getsockname() then says port 0)
        self._addresses: dict[int, Any] = {listener.sock.fileno(): listener.sock.getsockname()
                                           for listener in listeners}

    def start(self) -> None:
        self._timer = self._loop.call_later(GUARD_INTERVAL, self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self.check()
        self.start()

    def check(self) -> None:
        for listener in self._listeners:
            fd = listener.sock.fileno()
            if fd < 0:
                continue
            if fd not in self._addresses:
                self._addresses[fd] = listener.sock.getsockname()
            try:
                wrong = put_right(listener.sock, self._backlog, self._addresses[fd])
            except OSError as exc:
                if fd not in self._failing:
                    self._failing.add(fd)
                    log.error("listener %s %s was shut down by a process holding it, and "
                              "cannot listen again: %s", listener.name, listener.address,
                              (exc.strerror or str(exc)).lower())
                continue
            self._failing.discard(fd)
            if wrong:
                log.warning("listener %s %s was %s by a process holding it (a worker); "
                            "put right", listener.name, listener.address, " and ".join(wrong))
