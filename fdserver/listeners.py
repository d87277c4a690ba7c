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
import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import AddressInUseError, BindError

DEFAULT_NAME = "http"
DEFAULT_BACKLOG = 1024
GUARD_INTERVAL = 1.0        # seconds between checks of the listeners
# struct tcp_info (linux/tcp.h): on a listening socket tcpi_sacked is the
# accept queue's limit (the backlog).
TCPI_SACKED = 28
# Linux's socket filter option (asm-generic/socket.h); Python does not name it.
SO_DETACH_FILTER = 27
# What a holder may set on a listener that the connections accepted from it
# inherit (an SO_LINGER of 0 would reset every one at its close, TCP_CORK
# hold every response back), or that changes how it takes them: the guard
# puts back what it found at the start.  (level, option, size of its value)
# Not TCP_MAXSEG nor TCP_WINDOW_CLAMP: what a listener reads of them cannot
# be set back as it was (536, a user MSS; 0, refused).
_INT = 4
GUARDED_OPTIONS = [
    (socket.SOL_SOCKET, socket.SO_LINGER, 8), (socket.SOL_SOCKET, socket.SO_KEEPALIVE, _INT),
    (socket.SOL_SOCKET, socket.SO_RCVBUF, _INT), (socket.SOL_SOCKET, socket.SO_SNDBUF, _INT),
    (socket.SOL_SOCKET, socket.SO_RCVLOWAT, _INT), (socket.SOL_SOCKET, socket.SO_PRIORITY, _INT),
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, _INT), (socket.IPPROTO_TCP, socket.TCP_CORK, _INT),
    (socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, _INT),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _INT),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _INT),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _INT),
    (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, _INT),
    (socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, _INT),
    (socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16),
    (socket.IPPROTO_IP, socket.IP_TOS, _INT), (socket.IPPROTO_IPV6, socket.IPV6_TCLASS, _INT),
]
_DOUBLED = {(socket.SOL_SOCKET, socket.SO_RCVBUF), (socket.SOL_SOCKET, socket.SO_SNDBUF)}
_OPTION_NAMES = {
    (socket.SOL_SOCKET, socket.SO_LINGER): "SO_LINGER",
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE): "SO_KEEPALIVE",
    (socket.SOL_SOCKET, socket.SO_RCVBUF): "SO_RCVBUF",
    (socket.SOL_SOCKET, socket.SO_SNDBUF): "SO_SNDBUF",
    (socket.SOL_SOCKET, socket.SO_RCVLOWAT): "SO_RCVLOWAT",
    (socket.SOL_SOCKET, socket.SO_PRIORITY): "SO_PRIORITY",
    (socket.IPPROTO_TCP, socket.TCP_NODELAY): "TCP_NODELAY",
    (socket.IPPROTO_TCP, socket.TCP_CORK): "TCP_CORK",
    (socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT): "TCP_DEFER_ACCEPT",
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE): "TCP_KEEPIDLE",
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL): "TCP_KEEPINTVL",
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT): "TCP_KEEPCNT",
    (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT): "TCP_USER_TIMEOUT",
    (socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT): "TCP_NOTSENT_LOWAT",
    (socket.IPPROTO_TCP, socket.TCP_CONGESTION): "TCP_CONGESTION",
    (socket.IPPROTO_IP, socket.IP_TOS): "IP_TOS",
    (socket.IPPROTO_IPV6, socket.IPV6_TCLASS): "IPV6_TCLASS",
}

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


def _listening(spec: BindSpec, backlog: int, v6only: bool = True) -> socket.socket:
    sock = socket.socket(spec.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if spec.family == socket.AF_INET6:
            # Let 0.0.0.0:80 and [::]:80 be bound side by side (a listener
            # systemd made may take both: replaced, it still does).
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
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
    was shut down, or with *backlog* again if its queue's limit changed.  A
    port given in the bind stays bound through a shutdown (listen() needs no
    privilege); one the kernel chose (port 0) was let go, though getsockname()
    still shows it, and is bound again to *address* (what getsockname() said
    before).  A socket filter is taken off.  Returns what was wrong, as
    phrases for a log line; raises FilterLocked for a filter locked on it, and
    OSError if it cannot listen again (connected meanwhile, or its port taken).
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
    elif queue_limit(sock) not in (None, backlog):
        wrong.append("given another backlog")
        sock.listen(backlog)
    try:
        # Never asked with getsockopt(SO_GET_FILTER): its length counts
        # instructions, not bytes, and a short buffer overflows.
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        wrong.append("given a socket filter")
    except OSError as exc:
        if exc.errno != errno.ENOENT:       # ENOENT: none; EPERM: locked (SO_LOCK_FILTER)
            raise FilterLocked(exc.errno, "a locked socket filter") from None
    return wrong


class FilterLocked(OSError):
    """A socket filter a holder locked on the listener: it still listens,
    filtered, and nothing but closing every copy of it takes the filter off."""


def queue_limit(sock: socket.socket) -> int | None:
    """The accept queue's limit of a listening TCP socket (TCP_INFO), or None."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCPI_SACKED + 4)
    except OSError:
        return None
    if len(info) < TCPI_SACKED + 4:
        return None
    limit: int = struct.unpack_from("I", info, TCPI_SACKED)[0]
    return limit


def options_of(sock: socket.socket) -> dict[tuple[int, int], bytes]:
    """What *sock* holds of GUARDED_OPTIONS (those its family has)."""
    held = {}
    for level, name, size in GUARDED_OPTIONS:
        if level == socket.IPPROTO_IP and sock.family != socket.AF_INET:
            continue
        if level == socket.IPPROTO_IPV6 and sock.family != socket.AF_INET6:
            continue
        try:
            held[level, name] = sock.getsockopt(level, name, size)
        except OSError:
            continue
    return held


def put_back_options(sock: socket.socket,
                     held: dict[tuple[int, int], bytes]) -> tuple[list[str], list[str]]:
    """Set back what changed of *held* (options_of at the start): the names
    of those set back, and of those that could not be (dropped from *held*:
    tried once, said once)."""
    put_back, failed = [], []
    for (level, name), value in list(held.items()):
        try:
            if sock.getsockopt(level, name, len(value)) == value:
                continue
            given = value
            if (level, name) in _DOUBLED:       # the kernel doubles what it is given
                given = struct.pack("i", struct.unpack("i", value)[0] // 2)
            sock.setsockopt(level, name, given)
            ok = sock.getsockopt(level, name, len(value)) == value
        except OSError:
            ok = False
        option = _OPTION_NAMES.get((level, name), str(name))
        if ok:
            put_back.append(option)
        else:
            failed.append(option)
            del held[level, name]
    return put_back, failed


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
    """Checks *listeners* every GUARD_INTERVAL and puts them right, saying so.

    A listener that can never listen again (a holder shut it down, then
    connected it) is, with *replace* (dispatch mode: fdserver accepts), replaced
    by a new socket bound to the same address; otherwise, or if fdserver may
    no longer bind it (a port below 1024 after --user), it is no longer
    served nor handed out (running workers could not take a new socket: in
    shared mode the port then refuses connections, rather than queue them
    for nobody).  Either way inside *changing* (the placement's
    changing_listeners), so that nothing watches a descriptor being closed.
    A filter locked on a listener cannot be taken off: said once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, listeners: list[Listener],
                 backlog: int = DEFAULT_BACKLOG,
                 changing: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
                 replace: bool = True) -> None:
        self._loop = loop
        self._listeners = listeners
        self._backlog = backlog
        self._replace = replace
        self._locked: set[int] = set()          # listeners with a locked filter, said once
        self._changing = changing or contextlib.nullcontext
        self._timer: asyncio.TimerHandle | None = None
        # fd -> (bound address, queue limit, options), from the start: a port
        # the kernel chose is let go by a shutdown (getsockname() then lies)
        self._known: dict[int, tuple[Any, int, dict[tuple[int, int], bytes]]] = {}
        for listener in listeners:
            self._know(listener.sock)

    def _know(self, sock: socket.socket) -> tuple[Any, int, dict[tuple[int, int], bytes]]:
        known = self._known.get(sock.fileno())
        if known is None:
            known = (sock.getsockname(), queue_limit(sock) or self._backlog, options_of(sock))
            self._known[sock.fileno()] = known
        return known

    def start(self) -> None:
        self._timer = self._loop.call_later(GUARD_INTERVAL, self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        try:
            self.check()
        finally:
            self.start()            # a failed check (a bug) must not end the checks

    def check(self) -> None:
        for listener in list(self._listeners):
            if listener.sock.fileno() < 0:
                continue
            try:
                self._check(listener)
            except OSError as exc:          # one listener's trouble: the others still
                log.warning("cannot check listener %s: %s", listener.name,
                            (exc.strerror or str(exc)).lower())

    def _check(self, listener: Listener) -> None:
        address, limit, options = self._know(listener.sock)
        try:
            wrong = put_right(listener.sock, limit, address)
        except FilterLocked:
            if listener.sock.fileno() not in self._locked:
                self._locked.add(listener.sock.fileno())
                log.error("listener %s %s was given a locked socket filter by a process "
                          "holding it: it drops what the filter says until every process "
                          "holding it (fdserver too) has closed it", listener.name,
                          listener.address)
            return
        except OSError as exc:
            self._unusable(listener, address, limit, exc)
            return
        put_back, failed = put_back_options(listener.sock, options)
        wrong += [f"given another {name}" for name in put_back]
        if wrong:
            log.warning("listener %s %s was %s by a process holding it (a worker); "
                        "put right", listener.name, listener.address, ", ".join(wrong))
        if failed:
            log.error("listener %s %s was given another %s by a process holding it, "
                      "which fdserver cannot set back", listener.name, listener.address,
                      ", ".join(failed))

    def _unusable(self, listener: Listener, address: Any, limit: int, exc: OSError) -> None:
        why = (exc.strerror or str(exc)).lower()
        spec = BindSpec(listener.name, address[0], address[1], listener.sock.family)
        fresh: socket.socket | None = None
        cannot = ("in shared mode running workers could not take it: restart fdserver and "
                  "the workers")
        if self._replace:
            v6only = (listener.sock.family == socket.AF_INET6 and bool(
                listener.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)))
            try:
                fresh = _listening(spec, limit, v6only)
            except OSError as bind_exc:
                cannot = _why(bind_exc, spec.port)
        old = listener.sock
        with self._changing():
            self._known.pop(old.fileno(), None)
            if fresh is not None:
                listener.sock = fresh
                self._know(fresh)
            else:
                self._listeners.remove(listener)
            old.close()
        if fresh is not None:
            log.error("listener %s %s was made unusable by a process holding it (%s); "
                      "listening on a new socket", listener.name, spec.address, why)
        else:
            log.error("listener %s %s was made unusable by a process holding it (%s), and "
                      "is not bound again (%s): it is no longer served nor handed to new "
                      "workers", listener.name, spec.address, why, cannot)
