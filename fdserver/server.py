"""The fdserver daemon: hands its listeners to every worker that connects.

One asyncio loop, one Unix socket, one registration connection per worker.
Each connection is isolated: a peer that sends garbage, stalls or floods is
closed on its own without slowing anyone else, and the listeners themselves
never pass through this loop (fdserver is not in the data path).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import secrets
import signal
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from . import __version__
from .listeners import Listener
from .privileges import AllowList
from .placement import Dispatcher, SharePublisher, estimate
from .recovery import Recovery
from .errors import ProtocolError
from .peerlog import PeerLog
from .protocol import MAX_ANSWER, MAX_FDS_PER_FRAME, PROTOCOL_VERSION, encode, negotiate
from .socketfile import SocketFile
from .systemd import Notifier
from .transport import Channel, LoopChannel, close_fds, peer_credentials

log = logging.getLogger("fdserver")

WAITABLE_STATES = ("starting", "ready", "draining", "gone")
MAX_WAITS_PER_CTL = 16          # fdctl waits for one worker at a time
# Connections only root and fdserver's own user may use: however many others
# open, the operator's fdctl and root's workers still get in.
RESERVED_PEERS = 64


@dataclass(eq=False)
class Peer:
    pid: int
    uid: int
    gid: int
    connected_at: float
    role: str | None = None          # None until the hello arrives
    state: str = "handshake"         # workers: starting -> ready -> draining
    ready_at: float | None = None
    connections: int = 0             # open, as last reported by the worker
    received: int = 0                # dispatched connections it reported receiving
    dispatched: int = 0              # dispatched connections sent to it
    last_dispatch: int = -1
    features: frozenset[str] = frozenset()   # optional messages it reads
    token: str | None = None         # its welcome asked for a handback with this
    resumed: str | None = None       # the state it says it resumes in, until shown
    holds: bool = False              # was given, or has shown, this fdserver's listeners
    shown: set[tuple[int, int]] = field(default_factory=set)   # sockets it handed back
    channel: LoopChannel | None = None
    timer: asyncio.TimerHandle | None = None
    waits: list["_Wait"] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "state": self.state,
                "connections": estimate(self), "connected_at": _iso(self.connected_at),
                "ready_at": _iso(self.ready_at) if self.ready_at else None}


@dataclass(eq=False)
class _Wait:
    asker: Peer
    pid: int
    state: str
    timer: asyncio.TimerHandle | None = None


class Server:
    """Serves *listeners* to workers that connect on *socket_file*."""

    def __init__(
        self,
        listeners: list[Listener],
        socket_file: SocketFile,
        *,
        handshake_timeout: float = 5.0,
        ctl_idle_timeout: float = 60.0,
        max_pending_per_uid: int = 64,
        max_peers: int = 4096,
        max_ctl_per_uid: int = 64,
        max_workers_per_uid: int = 1024,
        allow: AllowList | None = None,
        notifier: Notifier | None = None,
        recovery: Recovery | None = None,
        dispatch: bool = False,
        dispatch_timeout: float = 10.0,
    ) -> None:
        self.listeners = listeners
        self.socket_file = socket_file
        self.handshake_timeout = handshake_timeout
        self.ctl_idle_timeout = ctl_idle_timeout
        self.max_pending_per_uid = max_pending_per_uid
        self.max_peers = max_peers
        self.max_ctl_per_uid = max_ctl_per_uid
        self.max_workers_per_uid = max_workers_per_uid
        self.allow = allow or AllowList()
        self.notifier = notifier
        self.recovery = recovery if recovery and not recovery.done else None
        self._deferred: list[Peer] = []        # new workers waiting for a recovery
        self._give_up: asyncio.TimerHandle | None = None
        self.mode = "dispatch" if dispatch else "shared"
        self.dispatch_timeout = dispatch_timeout
        self._placement: Dispatcher | SharePublisher | None = None
        self.peers: set[Peer] = set()
        self.started_at = time.time()
        self._waits: dict[_Wait, None] = {}       # in the order they came
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warn = PeerLog(log)

    # -- life cycle --------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then clean up and return.

        Raises BindError if a recovery (see :mod:`fdserver.recovery`) times out.
        """
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._warn.loop = loop
        stop = loop.create_future()
        for signum in (signal.SIGTERM, signal.SIGINT):
            # The handler only resolves a future; the loop does the work.
            loop.add_signal_handler(signum, lambda s=signum: stop.done() or stop.set_result(s))
        loop.add_reader(self.socket_file.sock.fileno(), self._accept)
        if self.recovery:
            log.info("cannot bind %s: address in use; waiting up to %gs for a worker to "
                     "hand it back; socket %s", self.recovery.describe(),
                     self.recovery.timeout, self.socket_file.path)
            self._notify(f"MAINPID={os.getpid()}")
            failure = self.recovery.failure()
            self._give_up = loop.call_later(
                self.recovery.timeout, lambda: stop.done() or stop.set_exception(failure))
        else:
            self._serving()
        try:
            signum = await stop
            log.info("%s: shutting down; workers keep serving", signal.Signals(signum).name)
        finally:
            self._shut_down()

    def _serving(self) -> None:
        if self.mode == "dispatch":
            self._placement = Dispatcher(self._loop, self.listeners, self._unsorted_workers,
                                         wait_timeout=self.dispatch_timeout)
            self._placement.start()
        else:
            self._placement = SharePublisher(self._loop, self._unsorted_workers)
        served = ", ".join(f"{l.name} on {l.address}" for l in self.listeners)
        log.info("serving %s; socket %s; %s mode", served, self.socket_file.path, self.mode)
        self._notify("READY=1", f"MAINPID={os.getpid()}")

    def _shut_down(self) -> None:
        self._notify("STOPPING=1", "STATUS=stopping; workers keep serving")
        self._loop.remove_reader(self.socket_file.sock.fileno())
        placement, self._placement = self._placement, None
        if isinstance(placement, Dispatcher):
            placement.close()
        for peer in list(self.peers):
            peer.channel.flush_now()        # connections on their way to workers
            peer.channel.close(None)
        problem = self.socket_file.close()
        if problem:
            log.warning("%s; the next fdserver will replace it as stale", problem)
        for listener in self.listeners:
            listener.sock.close()      # close, never shutdown(): workers share it
        self._warn.flush()

    # -- connections -------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, _ = self.socket_file.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                # Out of descriptors: back off for a moment instead of spinning
                # on a socket that stays readable.
                log.warning("accept on %s failed: %s; retrying in 0.1s",
                            self.socket_file.path, exc.strerror)
                fileno = self.socket_file.sock.fileno()
                self._loop.remove_reader(fileno)
                self._loop.call_later(0.1, self._loop.add_reader, fileno, self._accept)
                return
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        pid, uid, gid = peer_credentials(conn)
        # A flood of connections that never say hello must not lock real
        # workers out: past the limits, the oldest silent one makes room.
        pending = [p for p in self.peers if p.role is None]
        same_uid = [p for p in pending if p.uid == uid]
        reserved = (0, os.getuid())
        limit = self.max_peers - (0 if uid in reserved else min(RESERVED_PEERS,
                                                                self.max_peers // 4))
        if len(same_uid) >= self.max_pending_per_uid:
            self._evict(min(same_uid, key=lambda p: p.connected_at))
        elif len(self.peers) >= limit:
            # Room kept for root must not be taken by evicting root's own.
            evictable = pending if uid in reserved else [p for p in pending
                                                         if p.uid not in reserved]
            if not evictable:
                self._refuse_full(conn, pid, uid, limit)
                return
            self._evict(min(evictable, key=lambda p: p.connected_at))
        peer = Peer(pid=pid, uid=uid, gid=gid, connected_at=time.time())
        self.peers.add(peer)
        peer.channel = LoopChannel(
            Channel(conn, server_side=True), self._loop,
            on_message=lambda msg, fds: self._on_message(peer, msg, fds),
            on_close=lambda reason: self._on_close(peer, reason),
            on_unsent=self._take_back,
        )
        self._arm(peer, self.handshake_timeout, "no hello within the handshake timeout")

    def _refuse_full(self, conn: socket.socket, pid: int, uid: int, limit: int) -> None:
        """Say why before closing: "no fdserver answered" would mislead."""
        busiest, count = collections.Counter(p.uid for p in self.peers).most_common(1)[0]
        reason = (f"fdserver is at its limit of {limit} connections for uid {uid} "
                  f"({len(self.peers)} open, {count} of them from uid {busiest})")
        self._warn.warning(uid, "refused pid %d uid %d: %s", pid, uid, reason)
        try:
            conn.send(encode({"type": "error", "message": reason}, MAX_ANSWER),
                      socket.MSG_DONTWAIT)
        except OSError:
            pass
        conn.close()

    def _take_back(self, messages: list[tuple[dict[str, Any], list[int]]]) -> None:
        """Connections queued for a worker that went away before it got them."""
        if isinstance(self._placement, Dispatcher):
            self._placement.take_back(messages)
        else:
            for _, fds in messages:
                close_fds(fds)

    def _evict(self, peer: Peer) -> None:
        self._warn.warning(peer.uid, "too many connections without a hello; closing the "
                           "oldest (pid %d uid %d)", peer.pid, peer.uid)
        peer.channel.close(None)       # logged above, at a bounded rate

    def _arm(self, peer: Peer, timeout: float, reason: str) -> None:
        if peer.timer:
            peer.timer.cancel()
        peer.timer = self._loop.call_later(
            timeout, lambda: peer.channel.send_and_close({"type": "error", "message": reason}))

    def _on_close(self, peer: Peer, reason: str | None) -> None:
        self.peers.discard(peer)
        if peer.timer:
            peer.timer.cancel()
        for wait in list(peer.waits):
            self._end_wait(wait, ok=False, answer=False)
        if peer.role == "worker":
            log.info("worker pid %d gone (was %s)%s", peer.pid, peer.state,
                     f": {reason}" if reason else "")
            peer.state = "gone"
            self._worker_changed(peer)
        elif reason:
            self._warn.warning(peer.uid, "closed connection from pid %d uid %d: %s", peer.pid,
                               peer.uid, reason)

    # -- messages ----------------------------------------------------------

    def _on_message(self, peer: Peer, message: dict[str, Any], fds: list[int]) -> None:
        if fds and not (peer.role == "worker" and message["type"] == "handback"):
            close_fds(fds)
            return self._refuse(peer, f"unexpected descriptors with {message['type']}")
        try:
            if peer.role is None:
                self._on_hello(peer, message)
            elif peer.role == "worker" and message["type"] == "handback":
                self._on_handback(peer, message, fds)
            elif peer.role == "worker" and message["type"] == "state":
                self._on_state(peer, message["state"])
            elif peer.role == "worker" and message["type"] == "load":
                # Clamped: one worker's word must not overflow everyone's share.
                peer.connections = min(max(0, message["connections"]), self.max_peers * 1024)
                peer.received = min(max(0, message["received"]), peer.dispatched)
                if self._placement:
                    self._placement.changed()
            elif peer.role == "ctl" and message["type"] == "status":
                peer.channel.send({"type": "status", **self.status()})
            elif peer.role == "ctl" and message["type"] == "wait":
                self._on_wait(peer, message)
            else:
                raise ProtocolError(f"unexpected {message['type']} message from a {peer.role}")
        except ProtocolError as exc:
            self._refuse(peer, str(exc))
        if peer.role == "ctl" and not peer.waits and not peer.channel.closed:
            self._arm(peer, self.ctl_idle_timeout, "idle for too long")

    def _refuse(self, peer: Peer, reason: str) -> None:
        peer.channel.send_and_close({"type": "error", "message": reason})

    def _on_hello(self, peer: Peer, message: dict[str, Any]) -> None:
        if message["type"] != "hello":
            raise ProtocolError(f"expected hello, got {message['type']}")
        version = negotiate(message)
        if message["role"] == "worker" and not self.allow.allows(peer.uid, peer.gid):
            self._warn.warning(peer.uid, "refused worker pid %d uid %d gid %d: not allowed",
                               peer.pid, peer.uid, peer.gid)
            raise ProtocolError(f"uid {peer.uid} gid {peer.gid} may not receive the listeners; "
                                f"allowed: {self.allow.describe()}")
        if message["role"] == "worker" and peer.uid not in (0, os.getuid()):
            workers = sum(1 for p in self.peers if p.role == "worker" and p.uid == peer.uid)
            if workers >= self.max_workers_per_uid:
                self._warn.warning(peer.uid, "refused worker pid %d uid %d: it has %d workers "
                                   "already", peer.pid, peer.uid, workers)
                raise ProtocolError(f"too many workers from uid {peer.uid} (at most "
                                    f"{self.max_workers_per_uid})")
        if message["role"] == "ctl":
            ctls = sum(1 for p in self.peers if p.role == "ctl" and p.uid == peer.uid)
            if ctls >= self.max_ctl_per_uid:
                raise ProtocolError(f"too many fdctl connections from uid {peer.uid}")
        peer.role = message["role"]
        features = message.get("features")
        if isinstance(features, list):
            peer.features = frozenset(f for f in features[:16] if isinstance(f, str))
        peer.timer.cancel()
        peer.timer = None
        resume = message.get("resume") if peer.role == "worker" else None
        welcome = {"type": "welcome", "version": version, "server_pid": os.getpid(),
                   "listeners": len(self.listeners), "handback": False, "mode": self.mode}
        if isinstance(resume, dict):
            # A handback must echo this: it answers this welcome, not a guess.
            peer.token = secrets.token_hex(16)
            welcome.update(handback=True, token=peer.token)
            peer.channel.channel.accept_fds = True     # its handback may follow
        peer.channel.send(welcome)
        if isinstance(resume, dict):
            # A running worker re-registering after an fdserver restart: it
            # keeps the listeners it holds, and the state it is in once its
            # handback shows it holds ours; "starting" until then.
            state = resume.get("state")
            peer.resumed = state if state in ("ready", "draining") else None
            peer.state = "starting"
            log.info("worker pid %d uid %d re-registering", peer.pid, peer.uid)
            self._worker_changed(peer)
        elif peer.role == "worker":
            peer.state = "starting"
            if self.recovery:
                self._deferred.append(peer)      # listeners follow once recovered
            else:
                self._hand_over(peer)
            log.info("worker pid %d uid %d connected", peer.pid, peer.uid)
            self._notify()
        else:
            peer.state = "ctl"

    def _hand_over(self, peer: Peer) -> None:
        peer.holds = True
        batches = [self.listeners[i:i + MAX_FDS_PER_FRAME]
                   for i in range(0, len(self.listeners), MAX_FDS_PER_FRAME)] or [[]]
        for n, batch in enumerate(batches, 1):
            peer.channel.send(
                {"type": "listeners", "listeners": [l.describe() for l in batch],
                 "fds": len(batch), "more": n < len(batches)},
                [l.sock.fileno() for l in batch])

    def _on_handback(self, peer: Peer, message: dict[str, Any], fds: list[int]) -> None:
        if peer.token is None or message.get("token") != peer.token:
            close_fds(fds)
            self._warn.warning(peer.uid, "refused handback from pid %d uid %d: it does not "
                               "answer this fdserver's welcome", peer.pid, peer.uid)
            raise ProtocolError("handback refused: it does not carry the token of this "
                                "fdserver's welcome")
        peer.shown |= _identities(fds)
        if self.recovery:
            self._recover(peer, message, fds)
        else:
            close_fds(fds)           # recovered already, or nothing to recover
        last = not message.get("more")          # more than 252 come in several frames
        if last:
            peer.token = None
            peer.channel.channel.accept_fds = False
        ours = _identities(l.sock.fileno() for l in self.listeners)
        if peer.resumed and peer.state == "starting" and (last or (ours and ours <= peer.shown)):
            state, peer.resumed = peer.resumed, None
            if ours and ours <= peer.shown:
                peer.holds = True
                peer.state = state
                if state == "ready":
                    peer.ready_at = time.time()
                log.info("worker pid %d uid %d re-registered (%s)", peer.pid, peer.uid, state)
                self._worker_changed(peer)
            else:
                log.info("worker pid %d uid %d re-registered (starting: it does not hold "
                         "this fdserver's listeners)", peer.pid, peer.uid)

    def _recover(self, peer: Peer, message: dict[str, Any], fds: list[int]) -> None:
        try:
            taken = self.recovery.take(fds, message["listeners"])
        except ProtocolError as exc:
            self._warn.warning(peer.uid, "refused handback from pid %d uid %d: %s", peer.pid,
                               peer.uid, exc)
            raise
        for listener in taken:
            log.info("took back %s on %s from worker pid %d", listener.name, listener.address,
                     peer.pid)
        self.listeners.extend(taken)
        if self.recovery.done:
            self.recovery = None
            self._give_up.cancel()
            self._serving()
            for waiting in self._deferred:
                if not waiting.channel.closed:
                    self._hand_over(waiting)
            self._deferred.clear()

    def _on_state(self, peer: Peer, state: str) -> None:
        allowed = {"starting": ("ready", "draining"), "ready": ("draining",), "draining": ()}
        if state == peer.state:
            return
        if state not in allowed[peer.state]:
            raise ProtocolError(f"worker cannot go from {peer.state} to {state}")
        if state == "ready" and not peer.holds:
            # Only a worker that can serve may count: dispatch would send it
            # connections, a rolling restart would move on.
            raise ProtocolError("worker cannot be ready: it holds none of this fdserver's "
                                "listeners")
        peer.state = state
        if state == "ready":
            peer.ready_at = time.time()
        log.info("worker pid %d %s", peer.pid, state)
        if state == "draining" and self.mode == "dispatch":
            peer.channel.send({"type": "released"})     # nothing is dispatched to it now
        self._worker_changed(peer)

    def _worker_changed(self, peer: Peer) -> None:
        """A worker's state changed: answer waits, tell systemd, re-place load."""
        self._check_waits(peer)
        self._notify()
        if self._placement:
            self._placement.worker_changed()

    def _notify(self, *lines: str) -> None:
        if self.notifier:
            counts = collections.Counter(p.state for p in self.workers())
            summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no workers"
            self.notifier.notify(*lines, f"STATUS=serving {len(self.listeners)} listeners; "
                                         f"{summary}")

    # -- status and waiting ------------------------------------------------

    def _unsorted_workers(self) -> list[Peer]:
        # On the dispatch path: no sorting, no copies beyond the filter.
        return [p for p in self.peers if p.role == "worker"]

    def workers(self) -> list[Peer]:
        return sorted(self._unsorted_workers(), key=lambda p: p.connected_at)

    def status(self) -> dict[str, Any]:
        return {
            "server": {"pid": os.getpid(), "uid": os.getuid(), "version": __version__,
                       "mode": self.mode,
                       "protocol": PROTOCOL_VERSION, "socket": self.socket_file.path,
                       "started_at": _iso(self.started_at)},
            "listeners": [l.describe() for l in self.listeners],
            "workers": [p.describe() for p in self.workers()],
        }

    def _on_wait(self, asker: Peer, message: dict[str, Any]) -> None:
        if message["state"] not in WAITABLE_STATES:
            raise ProtocolError(f"cannot wait for state {message['state'][:40]!r}")
        if len(asker.waits) >= MAX_WAITS_PER_CTL:
            raise ProtocolError(f"too many waits at once on one connection "
                                f"(at most {MAX_WAITS_PER_CTL})")
        timeout = min(max(float(message["timeout"]), 0.0), 3600.0)   # bounded by validate()
        wait = _Wait(asker, message["pid"], message["state"])
        wait.timer = self._loop.call_later(timeout, lambda: self._end_wait(wait, ok=False))
        asker.waits.append(wait)
        self._waits[wait] = None
        if asker.timer:
            asker.timer.cancel()
            asker.timer = None
        if self._state_of(wait.pid) == wait.state:      # already there
            self._end_wait(wait, ok=True)

    def _state_of(self, pid: int) -> str:
        for peer in self.peers:
            if peer.role == "worker" and peer.pid == pid:
                return peer.state
        return "gone"

    def _check_waits(self, changed: Peer) -> None:
        for wait in list(self._waits):
            if wait.pid == changed.pid and self._state_of(wait.pid) == wait.state:
                self._end_wait(wait, ok=True)

    def _end_wait(self, wait: _Wait, ok: bool, answer: bool = True) -> None:
        if wait not in self._waits:
            return
        del self._waits[wait]
        wait.asker.waits.remove(wait)
        wait.timer.cancel()
        if answer:
            wait.asker.channel.send({"type": "waited", "pid": wait.pid,
                                     "state": self._state_of(wait.pid), "ok": ok})
            if not wait.asker.waits:
                self._arm(wait.asker, self.ctl_idle_timeout, "idle for too long")


def _identities(fds: Any) -> set[tuple[int, int]]:
    """(device, inode) of each descriptor: equal for the very same socket."""
    found = set()
    for fd in fds:
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        found.add((st.st_dev, st.st_ino))
    return found


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")
