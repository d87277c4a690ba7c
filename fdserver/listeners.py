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
import ctypes
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

from .accept import accept_queue
from .errors import AddressInUseError, BindError

DEFAULT_NAME = "http"
DEFAULT_BACKLOG = 1024
GUARD_INTERVAL = 1.0        # seconds between checks of the listeners
# Linux's socket filter option (asm-generic/socket.h); Python does not name it.
SO_DETACH_FILTER = 27
# What a holder may set on a listener that the connections accepted from it
# inherit (an SO_LINGER of 0 would reset every one at its close, TCP_CORK
# hold every response back, IP_TTL 1 keep every answer from leaving the
# host), or that decides which connections it takes at all (IP_MINTTL): the
# guard puts back what it found at the start.  (level, option, value size, name)
_INT = 4
GUARDED_OPTIONS = [
    (socket.SOL_SOCKET, socket.SO_LINGER, 8, "SO_LINGER"),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, _INT, "SO_KEEPALIVE"),
    (socket.SOL_SOCKET, socket.SO_RCVLOWAT, _INT, "SO_RCVLOWAT"),
    (socket.SOL_SOCKET, socket.SO_PRIORITY, _INT, "SO_PRIORITY"),
    (socket.SOL_SOCKET, 47, _INT, "SO_MAX_PACING_RATE"),
    (socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16, "SO_BINDTODEVICE"),
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, _INT, "TCP_NODELAY"),
    (socket.IPPROTO_TCP, socket.TCP_CORK, _INT, "TCP_CORK"),
    (socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, _INT, "TCP_DEFER_ACCEPT"),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _INT, "TCP_KEEPIDLE"),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _INT, "TCP_KEEPINTVL"),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _INT, "TCP_KEEPCNT"),
    (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, _INT, "TCP_USER_TIMEOUT"),
    (socket.IPPROTO_TCP, socket.TCP_MAXSEG, _INT, "TCP_MAXSEG"),
    (socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, _INT, "TCP_NOTSENT_LOWAT"),
    (socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16, "TCP_CONGESTION"),
    (socket.IPPROTO_IP, socket.IP_TOS, _INT, "IP_TOS"),
    (socket.IPPROTO_IP, socket.IP_TTL, _INT, "IP_TTL"),
    (socket.IPPROTO_IP, 21, _INT, "IP_MINTTL"),
    (socket.IPPROTO_IPV6, socket.IPV6_TCLASS, _INT, "IPV6_TCLASS"),
    (socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, _INT, "IPV6_UNICAST_HOPS"),
    (socket.IPPROTO_IPV6, 73, _INT, "IPV6_MINHOPCOUNT"),
]
# Not the buffer sizes: set on a listener, one also locks it (connections
# accepted from it are no longer sized by the kernel), which nothing but a
# new socket clears, and a connect() changes them without a lock: what they
# read says neither.
# TCP_MAXSEG reads the MSS a holder set, else whatever the socket last had:
# setting 0 unsets the holder's.
_MAXSEG = (socket.IPPROTO_TCP, socket.TCP_MAXSEG)
_OPTION_NAMES = {(level, option): name for level, option, _, name in GUARDED_OPTIONS}

log = logging.getLogger("fdserver")
# connect(AF_UNSPEC) for _disconnect, loaded before any privilege drop.
_libc = ctypes.CDLL(None, use_errno=True)


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
    was shut down (and disconnects it first if it was then connected), or
    with *backlog* again if its queue's limit changed.  A port given in the
    bind stays bound through all that (listen() needs no privilege); one the
    kernel chose (port 0) is let go, though getsockname() still shows it, and
    is bound again to *address* (what getsockname() said before).  A socket
    filter is taken off.  Returns what was wrong, as phrases for a log line;
    raises OSError if it cannot listen again (its port taken meanwhile) or a
    filter is locked on it.
    """
    wrong = []
    flags = fcntl.fcntl(sock.fileno(), fcntl.F_GETFL)
    if not flags & os.O_NONBLOCK:
        fcntl.fcntl(sock.fileno(), fcntl.F_SETFL, flags | os.O_NONBLOCK)
        wrong.append("made blocking")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        wrong.append("shut down")
        if _connected(sock):
            wrong.append("connected")
            _disconnect(sock)
        if address is not None:
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno != errno.EINVAL:   # EINVAL: still bound, as it should be
                    raise
        sock.listen(backlog)
    elif (limit := queue_limit(sock)) not in (None, backlog):
        # The kernel caps the limit at net.core.somaxconn: only a limit that
        # listening again changes was changed by somebody.
        sock.listen(backlog)
        if queue_limit(sock) != limit:
            wrong.append("given another backlog")
    if address is not None and sock.getsockname() != address:
        # A kernel-chosen port, let go by a shutdown and bound elsewhere by
        # the holder before anyone listened again.
        raise OSError(errno.EADDRINUSE, f"it is bound to {sock.getsockname()} instead")
    try:
        # Never asked with getsockopt(SO_GET_FILTER): its length counts
        # instructions, not bytes, and a short buffer overflows.
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        wrong.append("given a socket filter")
    except OSError as exc:
        if exc.errno != errno.ENOENT:       # ENOENT: none; EPERM: locked (SO_LOCK_FILTER)
            raise OSError(exc.errno, "a socket filter is locked on it") from None
    return wrong


def _connected(sock: socket.socket) -> bool:
    """Connected, or connecting, since a holder shut it down: its TCP state
    (TCP_INFO's first byte) is neither CLOSE nor LISTEN."""
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return False
    return state not in (_TCP_CLOSE, _TCP_LISTEN)


_TCP_CLOSE, _TCP_LISTEN = 7, 10         # enum tcp_state (include/net/tcp_states.h)
_AF_UNSPEC_ADDRESS = struct.pack("H14x", socket.AF_UNSPEC)


def _disconnect(sock: socket.socket) -> None:
    """connect(AF_UNSPEC): what Python's connect() cannot say; the socket
    keeps its bound port and may listen again."""
    address = ctypes.create_string_buffer(_AF_UNSPEC_ADDRESS, len(_AF_UNSPEC_ADDRESS))
    if _libc.connect(sock.fileno(), address, len(_AF_UNSPEC_ADDRESS)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"cannot disconnect it: {os.strerror(code)}")


def queue_limit(sock: socket.socket) -> int | None:
    """The accept queue's limit of a listening TCP socket (TCP_INFO), or None."""
    queue = accept_queue(sock)
    return queue[1] if queue else None


def options_of(sock: socket.socket) -> dict[tuple[int, int], tuple[int, bytes]]:
    """What *sock* holds of GUARDED_OPTIONS (those its family has): their
    sizes and values."""
    held = {}
    # [::] listeners take IPv4 clients too, unless IPv6-only: then IP options count.
    dual = sock.family == socket.AF_INET6 and not _v6only(sock)
    for level, name, size, _ in GUARDED_OPTIONS:
        if level == socket.IPPROTO_IP and sock.family != socket.AF_INET and not dual:
            continue
        if level == socket.IPPROTO_IPV6 and sock.family != socket.AF_INET6:
            continue
        try:
            held[level, name] = (size, sock.getsockopt(level, name, size))
        except OSError:
            continue
    return held


def _v6only(sock: socket.socket) -> bool:
    try:
        return bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    except OSError:
        return True


def put_back_options(sock: socket.socket, held: dict[tuple[int, int], tuple[int, bytes]]
                     ) -> tuple[list[str], list[str]]:
    """Set back what changed of *held* (options_of at the start): the names
    of those set back, and of those that could not be (dropped from *held*:
    tried once, said once)."""
    put_back, failed = [], []
    for (level, name), (size, value) in list(held.items()):
        try:
            now = sock.getsockopt(level, name, size)
            if now == value:
                continue
            if (level, name) == _MAXSEG:
                if struct.unpack("i", now)[0] >= struct.unpack("i", value)[0]:
                    continue                # not lowered by a holder
                sock.setsockopt(level, name, 0)
                # What it reads now (a connect leaves its own MSS): the value
                # from now on, or this would be "put back" at every check.
                held[level, name] = (size, sock.getsockopt(level, name, size))
                ok = True
            else:
                sock.setsockopt(level, name, value)
                ok = sock.getsockopt(level, name, size) == value
        except OSError:
            ok = False
        option = _OPTION_NAMES[level, name]
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

    Never replaces nor drops a listener: whatever cannot be put right now
    (its port taken by another socket meanwhile, a filter locked on it) is
    said once, and tried again at every check.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, listeners: list[Listener],
                 backlog: int = DEFAULT_BACKLOG) -> None:
        self._loop = loop
        self._listeners = listeners
        self._backlog = backlog
        self._timer: asyncio.TimerHandle | None = None
        self._failing: set[int] = set()         # listeners whose last check failed, said once
        # fd -> [bound address, queue limit, options], from the start: a port
        # the kernel chose is let go by a shutdown (getsockname() then lies)
        self._known: dict[int, list[Any]] = {}
        for listener in listeners:
            self._know(listener.sock)

    def _know(self, sock: socket.socket) -> list[Any]:
        known = self._known.get(sock.fileno())
        if known is None:
            known = [sock.getsockname(), queue_limit(sock) or self._backlog, options_of(sock)]
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
            fd = listener.sock.fileno()
            if fd < 0:
                continue
            try:
                self._check(listener)
            except OSError as exc:
                if fd not in self._failing:
                    self._failing.add(fd)
                    log.error("listener %s %s was changed by a process holding it, and "
                              "cannot be put right now: %s; trying again every %gs",
                              listener.name, format_address(listener.sock.family,
                                                            self._known[fd][0]),
                              (exc.strerror or str(exc)).lower(),
                              GUARD_INTERVAL)
            else:
                if fd in self._failing:
                    self._failing.discard(fd)
                    log.warning("listener %s %s is put right", listener.name,
                                listener.address)

    def _check(self, listener: Listener) -> None:
        known = self._know(listener.sock)
        address, limit, options = known
        error: OSError | None = None
        try:
            wrong = put_right(listener.sock, limit, address)
        except OSError as exc:
            wrong, error = [], exc
        # Either way: a locked filter or a taken port must not keep SO_LINGER
        # 0 on for good.
        put_back, failed = put_back_options(listener.sock, options)
        if error is None:
            # What listen() gave (capped by net.core.somaxconn, which may have
            # changed since): the limit to keep from now on.
            known[1] = queue_limit(listener.sock) or limit
        wrong += [f"given another {name}" for name in put_back]
        if wrong:
            log.warning("listener %s %s was %s by a process holding it (a worker); "
                        "put right", listener.name, listener.address, ", ".join(wrong))
        if failed:
            log.error("listener %s %s was given another %s by a process holding it, "
                      "which fdserver cannot set back", listener.name, listener.address,
                      ", ".join(failed))
        if error is not None:
            raise error
