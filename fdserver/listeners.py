"""Listening sockets: parse ``--bind`` specs, bind them, describe them."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Any

from .errors import AddressInUseError, BindError

DEFAULT_NAME = "http"
DEFAULT_BACKLOG = 1024


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
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise BindError(f"--bind {spec}: expected HOST:PORT, e.g. 0.0.0.0:80 or [::]:80")
    try:
        socket.inet_pton(family, host)
    except OSError:
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
