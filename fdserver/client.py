"""What an app process uses to get its listening sockets from fdserver.

Standard library plus fdserver's wire protocol, transport and TLS material
modules only: an unprivileged app process never imports daemon code.
Typical use, with any Tornado app::

    registration = fdserver.client.register("/run/fdserver/fdserver.sock")
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(registration.sockets())
    registration.report("ready")

The registration connection must stay open for the process's life: fdserver
lists the process while it is open and forgets it on EOF.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypedDict, Unpack

from .errors import ConnectError, ProtocolError, RefusedError, TransportError, UntrustedServerError
from .protocol import (
    SUPPORTED_VERSIONS,
    HandbackMessage,
    HelloMessage,
    ListenersMessage,
    Message,
    Mode,
    Reported,
    Role,
    TLSMessage,
    WelcomeMessage,
    batches,
)
from .tls import not_dumpable, server_context
from .transport import Channel, adopt_listener, close_fds, peer_credentials

DEFAULT_CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
CONNECT_MAX_DELAY = 0.5


@dataclass
class ReceivedListener:
    name: str
    family: str
    address: str
    sock: socket.socket
    tls: bool = False           # serve it with TLS (Registration.ssl_context())
    proxy: bool = False         # its connections start with a PROXY protocol header


@dataclass
class Registration:
    """An app process's listeners and its open channel to fdserver."""

    path: str
    channel: Channel
    server_pid: int
    listeners: list[ReceivedListener]
    # "shared": accept on the listeners; "dispatch": fdserver sends connections
    mode: Mode = "shared"
    # who may serve *path*: checked again on every reconnect
    server_uids: frozenset[int] = frozenset({0})
    # the certificate material for the TLS listeners (feature "tls"), if any
    tls: TLSMessage | None = field(default=None, repr=False)     # holds the key
    # fdserver asks for metrics reports (feature "metrics", fdserver --metrics)
    metrics: bool = False
    # fdserver takes the load in heartbeats (see fdserver.protocol)
    beat_load: bool = False

    def sockets(self, name: str | None = None) -> list[socket.socket]:
        """The listening sockets, all of them or those called *name*."""
        return [listener.sock for listener in self.listeners
                if name is None or listener.name == name]

    def ssl_context(self) -> ssl.SSLContext | None:
        """The context to serve the TLS listeners with; None if there are none."""
        return server_context(self.tls) if self.tls else None

    def report(self, state: Reported) -> None:
        """Tell fdserver this process is ``ready`` or ``draining`` (blocking)."""
        self.channel.send({"type": "state", "state": state})


def trusted_server_uids(server_uid: int | None = None) -> frozenset[int]:
    """The uids a worker accepts as its fdserver: root, its own, *server_uid*."""
    return frozenset({0, os.geteuid(), *(() if server_uid is None else (server_uid,))})


def retry_delays(cap: float) -> Iterator[float]:
    """How long to wait before each next try to reach fdserver: 50 ms, doubling, capped."""
    delay = 0.05
    while True:
        yield delay
        delay = min(delay * 2, cap)


class HelloOptions(TypedDict, total=False):
    features: list[str]         # the optional messages this process reads
    resume: dict[str, str]      # {"state": ...}: a running worker re-registering


def connect(path: str, role: Role, timeout: float = DEFAULT_CONNECT_TIMEOUT,
            server_uids: frozenset[int] | None = None,
            **hello: Unpack[HelloOptions]) -> tuple[Channel, WelcomeMessage]:
    """Connect and say hello, retrying while nobody listens at *path*.

    Retries for up to *timeout* seconds, so app processes may start before
    fdserver; returns a blocking Channel past the welcome, and the welcome.
    With *server_uids*, the process serving *path* must run as one of them
    (SO_PEERCRED) before anything is sent: UntrustedServerError otherwise.
    """
    deadline = time.monotonic() + timeout
    delays = retry_delays(CONNECT_MAX_DELAY)
    while True:
        try:
            return _handshake(path, role, hello, server_uids)
        except _Retry as why:
            delay = next(delays)
            if time.monotonic() + delay > deadline:
                within = f" within {timeout:g}s" if timeout > 0 else ""
                raise ConnectError(f"no fdserver answered at {path}{within} ({why}); "
                                   "is fdserver running?", str(why)) from None
            time.sleep(delay)


class _Retry(Exception):
    """Nobody is serving the path right now; worth another try."""


def _handshake(path: str, role: Role, options: HelloOptions,
               server_uids: frozenset[int] | None) -> tuple[Channel, WelcomeMessage]:
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:          # e.g. out of descriptors (EMFILE)
        raise ConnectError(f"cannot create a socket to reach fdserver at {path}: "
                           f"{exc.strerror}") from None
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise _Retry("no such file") from None
    except ConnectionRefusedError:
        sock.close()
        raise _Retry("connection refused") from None
    except OSError as exc:
        sock.close()
        raise ConnectError(f"cannot connect to fdserver at {path}: {exc.strerror}") from None
    if server_uids is not None:
        pid, uid, _ = peer_credentials(sock)
        if uid not in server_uids:
            sock.close()
            allowed = ", ".join(map(str, sorted(server_uids)))
            raise UntrustedServerError(
                f"the process serving {path} (pid {pid}) runs as uid {uid}, not as fdserver's "
                f"user (uid {allowed}); refusing to talk to it (if fdserver runs as that user, "
                f"pass --server-user)")
    sock.settimeout(HANDSHAKE_TIMEOUT)
    channel = Channel(sock)
    try:
        try:
            # "pid" is informational: fdserver trusts SO_PEERCRED only.
            hello: HelloMessage = {"type": "hello", "versions": list(SUPPORTED_VERSIONS),
                                   "role": role, "pid": os.getpid(), **options}
            channel.send(hello)
            message, fds = channel.receive()
        except (BrokenPipeError, ConnectionResetError, TransportError):
            # A server that is shutting down (or shedding a flood) closed us.
            raise _Retry("connection closed during the handshake") from None
        except TimeoutError:
            raise ConnectError(f"fdserver at {path} did not answer in time") from None
        return channel, check(message, fds, "welcome", path)[0]
    except BaseException:
        channel.close()
        raise


def expect(channel: Channel, kind: str, path: str) -> tuple[Any, list[int]]:
    """Receive one message of type *kind*, turning errors into FdserverErrors.

    The message is the *kind*'s class of :mod:`fdserver.protocol` (the
    schema was checked): the caller annotates it.
    """
    try:
        message, fds = channel.receive()
    except TimeoutError:
        raise ConnectError(f"fdserver at {path} did not answer in time") from None
    except TransportError as exc:
        raise ConnectError(f"fdserver at {path}: {exc}") from None
    except OSError as exc:
        raise ConnectError(f"fdserver at {path}: {exc.strerror or exc}") from None
    return check(message, fds, kind, path)


def check(message: Message, fds: list[int], kind: str, path: str) -> tuple[Any, list[int]]:
    """Return (message, fds) if it is a *kind*; raise on an error or anything else."""
    if message["type"] == "error":
        close_fds(fds)
        raise RefusedError(f"fdserver at {path} refused: {message['message']}")
    if message["type"] != kind:
        close_fds(fds)
        raise ProtocolError(f"fdserver at {path} sent {message['type']}, expected {kind}")
    return message, fds


def register(path: str, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
             features: tuple[str, ...] = (),
             server_uids: frozenset[int] | None = None) -> Registration:
    """Register as a worker and receive every listener fdserver holds.

    *features* opt in to messages the caller will read from the channel:
    ``share`` (load shares, shared mode) and ``dispatch`` (accepted
    connections, dispatch mode).  fdapp opts in to both; a plain
    ``add_sockets`` user opts in to none and is sent neither.  ``tls``: the
    caller serves the listeners marked ``tls`` with
    :meth:`Registration.ssl_context`; an fdserver with TLS listeners refuses
    a worker without it (it would serve them as plain HTTP).

    *server_uids* (default: root and this process's own user, see
    :func:`trusted_server_uids`) are the users the process serving *path*
    may run as; anyone else gets nothing, and UntrustedServerError is raised.
    """
    if server_uids is None:
        server_uids = trusted_server_uids()
    if "tls" in features:
        # Before the key can arrive: a process of this user that opened
        # /proc/PID/mem (or attached) while it was dumpable would keep access.
        not_dumpable()
    channel, welcome = connect(path, "worker", connect_timeout, server_uids,
                               features=list(features))
    listeners: list[ReceivedListener] = []
    tls: TLSMessage | None = None
    try:
        more = True
        while more:
            message: ListenersMessage
            message, fds = expect(channel, "listeners", path)
            more = message["more"]
            described = message["listeners"]
            if len(described) != len(fds):
                close_fds(fds)
                raise ProtocolError("listeners message describes "
                                    f"{len(described)} sockets but carries {len(fds)}")
            for i, (meta, fd) in enumerate(zip(described, fds, strict=True)):
                try:
                    sock = adopt_listener(fd)
                except TransportError as exc:
                    close_fds(fds[i + 1:])
                    raise ConnectError(f"fdserver at {path}: listener "
                                       f"{meta.get('name')!r}: {exc}") from None
                listeners.append(ReceivedListener(str(meta.get("name")), str(meta.get("family")),
                                                  str(meta.get("address")), sock,
                                                  meta.get("tls") is True,
                                                  meta.get("proxy") is True))
        if welcome.get("tls"):
            tls, fds = expect(channel, "tls", path)
            close_fds(fds)
    except BaseException:
        for listener in listeners:
            listener.sock.close()
        channel.close()
        raise
    return Registration(path, channel, welcome["server_pid"], listeners, mode_of(welcome),
                        frozenset(server_uids), tls, welcome.get("metrics") is True,
                        welcome.get("beat_load") is True)


def mode_of(welcome: WelcomeMessage) -> Mode:
    """The mode fdserver runs in (one too old to say runs in shared mode)."""
    return "dispatch" if welcome.get("mode") == "dispatch" else "shared"


def resume(path: str, state: Reported, listeners: list[ReceivedListener],
           features: tuple[str, ...] = (),
           server_uids: frozenset[int] | None = None) -> tuple[Channel, WelcomeMessage]:
    """Re-register a running worker with a (re)started fdserver; one attempt.

    The worker keeps its sockets.  The welcome asks for them: a new fdserver
    that could not bind them (the old one's listeners live on in the
    workers) takes them back, and any fdserver checks them before it counts
    the worker ``ready`` again.  They go only to a process running as one of
    *server_uids*, and carry the welcome's token, so fdserver knows they
    answer its welcome (default, as for :func:`register`: root and this
    process's own user).  Returns the channel and the welcome; raises
    ConnectError if nobody answers.
    """
    if server_uids is None:
        server_uids = trusted_server_uids()
    if "tls" in features:
        not_dumpable()          # as for register(): before the key can arrive
    channel, welcome = connect(path, "worker", 0, server_uids, resume={"state": state},
                               features=list(features))
    try:
        if welcome.get("handback"):
            token = welcome.get("token")
            frames = batches(listeners)
            for n, batch in enumerate(frames, 1):
                handback: HandbackMessage = {
                    "type": "handback", "fds": len(batch), "listeners": [
                        {"name": one.name, "family": one.family, "address": one.address}
                        for one in batch],
                    "more": n < len(frames)}
                if isinstance(token, str):
                    handback["token"] = token
                channel.send(handback, [one.sock.fileno() for one in batch])
    except OSError as exc:
        channel.close()
        raise ConnectError(f"fdserver at {path}: handback failed: {exc.strerror}") from None
    return channel, welcome
