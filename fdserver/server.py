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
from collections.abc import Callable, Iterable
from typing import Any, TypeGuard

from . import __version__
from .accept import accepted
from .admission import Admission
from .agent import Agent, Capacity, reply
from .certificates import Material
from .errors import ProtocolError
from .hostdrain import DrainState
from .listeners import DEFAULT_BACKLOG, Listener, ListenerGuard
from .metrics import HostMetrics
from .peer import Peer, estimate, iso_time
from .peerlog import PeerLog
from .placement import Dispatcher, SharePublisher
from .privileges import AllowList
from .protocol import (
    MAX_DRAIN,
    MAX_FDS_PER_FRAME,
    MAX_INT,
    PROTOCOL_VERSION,
    REPORTED_STATES,
    ROLES,
    DrainedMessage,
    DrainMessage,
    HandbackMessage,
    HeartbeatMessage,
    HelloMessage,
    LoadMessage,
    Message,
    MetricsMessage,
    Mode,
    PeerState,
    RecycleMessage,
    ReloadedMessage,
    ReloadMessage,
    Role,
    StateMessage,
    StatusMessage,
    TLSMessage,
    WaitMessage,
    WelcomeMessage,
    batches,
    negotiate,
    one_of,
)
from .rebalancing import Rebalancer
from .recovery import Recovery
from .recycling import Recycler
from .renewal import Renewal
from .socketfile import SocketFile
from .systemd import Notifier
from .transport import Channel, Envelope, LoopChannel, close_fds, peer_credentials
from .waits import Waits

log = logging.getLogger("fdserver")

# After an fdserver restart, no recycling turn for this long (fdapp's default
# --graceful-timeout): a worker recycling meanwhile drains without re-registering.
RECYCLE_HOLD_AFTER_RESTART = 30.0
# A handback comes in frames of at most MAX_FDS_PER_FRAME sockets: this many
# carry far more listeners than any fdserver binds, and bound what a worker
# can make fdserver remember (the identities of what it handed back).
MAX_HANDBACK_FRAMES = 16


# A message handler: the message is of the type its key in Server._handlers names.
Handler = Callable[[Peer, Any, list[int]], None]


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
        unavailable_timeout: float = 10.0,
        tls: Material | None = None,
        metrics_socket: socket.socket | None = None,
        agent: tuple[socket.socket, Capacity, DrainState] | None = None,
        agent_linger: float = 2.0,
        proxy_listeners: frozenset[str] = frozenset(),
        backlog: int = DEFAULT_BACKLOG,
    ) -> None:
        self.listeners = listeners
        self.backlog = backlog
        self._guard: ListenerGuard | None = None
        self.socket_file = socket_file
        self.handshake_timeout = handshake_timeout
        self.ctl_idle_timeout = ctl_idle_timeout
        self.max_peers = max_peers
        self.notifier = notifier
        self.recovery = recovery if recovery and not recovery.done else None
        self._deferred: list[Peer] = []        # new workers waiting for a recovery
        self._give_up: asyncio.TimerHandle | None = None
        self.mode: Mode = "dispatch" if dispatch else "shared"
        # With no ready worker, connections get a 503 after this long (both modes).
        self.unavailable_timeout = unavailable_timeout
        self._tls_material = tls
        self.renewal: Renewal | None = None        # made with the loop, from *tls*
        self._placement: Dispatcher | SharePublisher | None = None
        self._rebalancer: Rebalancer | None = None
        self.peers: set[Peer] = set()
        # What the workers served and fdserver's own events; served over HTTP
        # on *metrics_socket* (fdserver --metrics, see fdserver.exposition).
        self.metrics = HostMetrics()
        # What a report may name, those still to be taken back included.
        self.metrics.listener_names = {listener.name for listener in listeners} | {
            spec.name for spec in (self.recovery.specs if self.recovery else [])}
        self.metrics_socket = metrics_socket
        self._endpoint: Any = None
        # HAProxy's agent-check (see fdserver.agent): its socket until it runs.
        self._agent_setup = agent
        self.agent: Agent | None = None
        self.agent_linger = agent_linger
        self.stopping = False
        self._drain_waits: list[tuple[Peer, float, set[str], asyncio.TimerHandle,
                                      bool]] = []
        # Listeners whose connections start with a PROXY protocol header.
        self.proxy_listeners = proxy_listeners
        self._mark(listeners)
        self.started_at = time.time()
        self._waits = Waits(self._state_of, lambda asker: self._arm(
            asker, self.ctl_idle_timeout, "idle for too long"))
        self._warn = PeerLog(log)
        self._admission = Admission(
            self._warn, allow=allow or AllowList(), max_peers=max_peers,
            max_pending_per_uid=max_pending_per_uid, max_ctl_per_uid=max_ctl_per_uid,
            max_workers_per_uid=max_workers_per_uid)
        # Who may send what; before its hello a peer has no role.
        self._handlers: dict[tuple[Role | None, str], Handler] = {
            (None, "hello"): self._on_hello,
            ("worker", "handback"): self._on_handback,
            ("worker", "state"): self._on_state,
            ("worker", "load"): self._on_load,
            ("worker", "heartbeat"): self._on_heartbeat,
            ("worker", "recycle"): self._on_recycle,
            ("worker", "tls"): self._on_tls,
            ("worker", "metrics"): self._on_metrics,
            ("ctl", "status"): self._on_status,
            ("ctl", "wait"): self._on_wait,
            ("ctl", "reload"): self._on_reload,
            ("ctl", "drain"): self._on_drain,
            ("ctl", "undrain"): self._on_drain,
        }

    _loop: asyncio.AbstractEventLoop        # the running loop, from _main() on

    # -- life cycle --------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then clean up and return.

        Raises BindError if a recovery (see :mod:`fdserver.recovery`) times out.
        """
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._warn.loop = loop
        self._recycler = Recycler(loop, lambda: sum(
            1 for p in self._unsorted_workers() if p.state == "ready"))
        stop: asyncio.Future[int] = loop.create_future()

        def stop_on(signum: int) -> None:
            # The handler only resolves a future; the loop does the work.
            if not stop.done():
                stop.set_result(signum)
        for stopping in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(stopping, stop_on, stopping)
        if self._tls_material:
            self.renewal = Renewal(loop, self._tls_material)
        # SIGHUP: re-read the certificate (and never its default: exiting).
        loop.add_signal_handler(signal.SIGHUP, loop.call_soon, self._reload_on_signal)
        loop.add_reader(self.socket_file.sock.fileno(), self._accept)
        if self.metrics_socket is not None:
            from .exposition import start_endpoint  # imported before any privilege drop
            self._endpoint = start_endpoint(self.metrics_socket, self.metrics,
                                            self._unsorted_workers, self.listeners, self.mode)
            await self._endpoint.start()
            log.info("metrics on http://%s/metrics, health on /health",
                     self._endpoint.address)
        if self._agent_setup:
            sock, self.capacity, self.drain_state = self._agent_setup
            self.agent = Agent(sock, loop, self._agent_answer)
            self.agent.on_answer = self._check_drain_waits
            log.info("answering HAProxy's agent-check on %s", self.agent.address)
        if self.recovery:
            log.info("cannot bind %s: address in use; waiting up to %gs for a worker to "
                     "hand it back; socket %s", self.recovery.describe(),
                     self.recovery.timeout, self.socket_file.path)
            self._notify(f"MAINPID={os.getpid()}")
            failure = self.recovery.failure()

            def give_up() -> None:
                if not stop.done():
                    stop.set_exception(failure)
            self._give_up = loop.call_later(self.recovery.timeout, give_up)
        else:
            self._serving()
        try:
            signum = await stop
            if self.agent and self.agent_linger:
                # Tell the balancers first; a second signal cuts this short.
                self.stopping = True
                log.info("%s: the agent answers 'drain' for %gs, then fdserver stops",
                         signal.Signals(signum).name, self.agent_linger)
                stop = loop.create_future()
                await asyncio.wait([stop], timeout=self.agent_linger)
            log.info("%s: shutting down; workers keep serving", signal.Signals(signum).name)
        finally:
            self._shut_down()

    def _serving(self) -> None:
        self.metrics.listener_names |= {listener.name for listener in self.listeners}
        self._guard = ListenerGuard(self._loop, self.listeners, self.backlog)
        self._guard.start()
        if self.mode == "dispatch":
            self._placement = Dispatcher(self._loop, self.listeners, self._unsorted_workers,
                                         wait_timeout=self.unavailable_timeout,
                                         metrics=self.metrics)
            self._placement.start()
        else:
            self._placement = SharePublisher(self._loop, self._unsorted_workers, self.listeners,
                                             unavailable_timeout=self.unavailable_timeout)
        dispatch = self.mode == "dispatch"
        self._rebalancer = Rebalancer(self._loop, self._unsorted_workers,
                                      estimate if dispatch else _reported, dispatch,
                                      self.metrics)
        served = ", ".join(f"{listener.name} on {listener.address}" for listener in self.listeners)
        log.info("serving %s; socket %s; %s mode", served, self.socket_file.path, self.mode)
        self._notify("READY=1", f"MAINPID={os.getpid()}")

    def _shut_down(self) -> None:
        self._notify("STOPPING=1", "STATUS=stopping; workers keep serving")
        self._loop.remove_reader(self.socket_file.sock.fileno())
        if self._guard is not None:
            self._guard.close()
        if self._endpoint is not None:
            self._endpoint.close()
        if self.agent:
            self.agent.close()
            self.drain_state.close()
        placement, self._placement = self._placement, None
        if placement:
            placement.close()
        rebalancer, self._rebalancer = self._rebalancer, None
        if rebalancer:
            rebalancer.close()
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
        for conn, _ in accepted(self.socket_file.sock.accept, 64, self._accept_failed):
            self._admit(conn)

    def _accept_failed(self, exc: OSError) -> None:
        # Out of descriptors: back off for a moment instead of spinning
        # on a socket that stays readable.
        log.warning("accept on %s failed: %s; retrying in 0.1s",
                    self.socket_file.path, exc.strerror)
        fileno = self.socket_file.sock.fileno()
        self._loop.remove_reader(fileno)
        self._loop.call_later(0.1, self._loop.add_reader, fileno, self._accept)

    def _admit(self, conn: socket.socket) -> None:
        pid, uid, gid = peer_credentials(conn)
        if not self._admission.make_room(self.peers, conn, pid, uid, gid):
            self.metrics.refused += 1
            return
        # The callbacks run from the loop's next pass on, once *peer* exists.
        channel = LoopChannel(
            Channel(conn, server_side=True), self._loop,
            on_message=lambda msg, fds: self._on_message(peer, msg, fds),
            on_close=lambda reason: self._on_close(peer, reason),
            on_unsent=self._take_back,
        )
        peer = Peer(pid=pid, uid=uid, gid=gid, connected_at=time.time(), channel=channel)
        self.peers.add(peer)
        self._arm(peer, self.handshake_timeout, "no hello within the handshake timeout")

    def _take_back(self, messages: list[Envelope]) -> None:
        """Connections queued for a worker that went away before it got them."""
        if isinstance(self._placement, Dispatcher):
            self._placement.take_back(messages)
        else:
            for _, fds in messages:
                close_fds(fds)

    def _arm(self, peer: Peer, timeout: float, reason: str) -> None:
        if peer.timer:
            peer.timer.cancel()
        peer.timer = self._loop.call_later(
            timeout, lambda: peer.channel.send_and_close({"type": "error", "message": reason}))

    def _on_close(self, peer: Peer, reason: str | None) -> None:
        self.peers.discard(peer)
        if peer.timer:
            peer.timer.cancel()
        self._waits.drop(peer)
        for entry in [e for e in self._drain_waits if e[0] is peer]:
            self._drain_waits.remove(entry)
            entry[3].cancel()
        if peer.role == "worker":
            if self.renewal:
                self.renewal.gone(peer)
            log.info("worker pid %d gone (was %s)%s", peer.pid, peer.state,
                     f": {reason}" if reason else "")
            peer.state = "gone"
            self._recycler.forget(peer)
            self._worker_changed(peer)
        elif reason:
            self._warn.warning(peer.uid, "closed connection from pid %d uid %d: %s", peer.pid,
                               peer.uid, reason)

    # -- messages ----------------------------------------------------------

    def _on_message(self, peer: Peer, message: Message, fds: list[int]) -> None:
        kind = message["type"]
        if fds and (peer.role, kind) != ("worker", "handback"):
            close_fds(fds)
            self._refuse(peer, f"unexpected descriptors with {kind}")
            return
        try:
            handler = self._handlers.get((peer.role, kind))
            if handler is None:
                raise ProtocolError(f"expected hello, got {kind}" if peer.role is None
                                    else f"unexpected {kind} message from a {peer.role}")
            handler(peer, message, fds)
        except ProtocolError as exc:
            self._refuse(peer, str(exc))
        if (peer.role == "ctl" and not peer.waits and not peer.waits_drain
                and not peer.channel.closed):
            self._arm(peer, self.ctl_idle_timeout, "idle for too long")

    def _refuse(self, peer: Peer, reason: str) -> None:
        if peer.role is None:
            self.metrics.refused += 1       # its hello: not allowed, too many, malformed
        peer.channel.send_and_close({"type": "error", "message": reason})

    def _on_hello(self, peer: Peer, message: HelloMessage, fds: list[int]) -> None:
        version = negotiate(message)
        role = one_of(message["role"], ROLES)       # negotiate() refused any other
        self._admission.check_hello(self.peers, peer, role)
        features = message.get("features")
        if isinstance(features, list):
            peer.features = frozenset(f for f in features[:16] if isinstance(f, str))
        if role == "worker" and self.renewal and "tls" not in peer.features:
            # It would serve TLS listeners as plain HTTP.
            raise ProtocolError(
                f"this fdserver serves TLS on {', '.join(sorted(self.renewal.files.listeners))}"
                "; this worker does not read TLS material (fdapp does; with "
                "fdserver.client.register, pass features=('tls',))")
        if role == "worker" and self.proxy_listeners and "proxy" not in peer.features:
            # It would take the PROXY header for the request (a resumed one too).
            raise ProtocolError("this worker does not read the PROXY protocol header "
                                f"listener {sorted(self.proxy_listeners)[0]} needs "
                                "(fdserver --proxy-protocol): upgrade the app's fdserver")
        peer.role = role
        peer.beat_at = time.monotonic()         # the first heartbeat is due from now
        if peer.timer:
            peer.timer.cancel()
            peer.timer = None
        resume = message.get("resume") if peer.role == "worker" else None
        welcome: WelcomeMessage = {
            "type": "welcome", "version": version, "server_pid": os.getpid(),
            "listeners": len(self.listeners), "handback": False, "mode": self.mode,
            "tls": role == "worker" and self.renewal is not None}
        if self._wants_metrics(peer):
            welcome["metrics"] = True
        if role == "worker":
            welcome["beat_load"] = True     # its heartbeats may carry its load
        if isinstance(resume, dict):
            # A handback must echo this: it answers this welcome, not a guess.
            peer.token = secrets.token_hex(16)
            welcome["handback"] = True
            welcome["token"] = peer.token
            peer.channel.channel.accept_fds = True     # its handback may follow
        peer.channel.send(welcome)
        if isinstance(resume, dict):
            # A running worker re-registering after an fdserver restart: it
            # keeps the listeners it holds, and the state it is in once its
            # handback shows it holds ours; "starting" until then.
            peer.resumed = one_of(resume.get("state"), REPORTED_STATES)
            peer.state = "starting"
            if self.renewal:
                self.renewal.send(peer)      # perhaps renewed meanwhile
            log.info("worker pid %d uid %d re-registering", peer.pid, peer.uid)
            # A restart: a worker that was recycling may still drain, unseen.
            self._recycler.hold(RECYCLE_HOLD_AFTER_RESTART)
            self._worker_changed(peer)
        elif peer.role == "worker":
            peer.state = "starting"
            if self.recovery:
                self._deferred.append(peer)      # listeners follow once recovered
            else:
                self._hand_over(peer)
            log.info("worker pid %d uid %d connected", peer.pid, peer.uid)
            self.metrics.worker_changed(peer)
            self._notify()
        else:
            peer.state = "ctl"

    def _hand_over(self, peer: Peer) -> None:
        peer.holds = True
        frames = batches(self.listeners) or [[]]
        for n, batch in enumerate(frames, 1):
            peer.channel.send(
                {"type": "listeners", "listeners": [listener.describe()
                                                    for listener in batch],
                 "fds": len(batch), "more": n < len(frames)},
                [listener.sock.fileno() for listener in batch])
        if self.renewal:
            self.renewal.send(peer)

    def _mark(self, listeners: list[Listener]) -> None:
        """What each listener's connections need from a worker: TLS, a PROXY header."""
        tls = self._tls_material.files.listeners if self._tls_material else frozenset()
        for listener in listeners:
            listener.tls = listener.name in tls
            listener.proxy = listener.name in self.proxy_listeners

    def _on_handback(self, peer: Peer, message: HandbackMessage, fds: list[int]) -> None:
        if peer.token is None or message.get("token") != peer.token:
            close_fds(fds)
            self._warn.warning(peer.uid, "refused handback from pid %d uid %d: it does not "
                               "answer this fdserver's welcome", peer.pid, peer.uid)
            raise ProtocolError("handback refused: it does not carry the token of this "
                                "fdserver's welcome")
        peer.handbacks += 1
        if peer.handbacks > MAX_HANDBACK_FRAMES:
            close_fds(fds)
            raise ProtocolError(f"handback refused: more than {MAX_HANDBACK_FRAMES} frames "
                                f"({MAX_HANDBACK_FRAMES * MAX_FDS_PER_FRAME} listeners)")
        peer.shown |= _identities(fds)
        if self.recovery:
            self._recover(peer, self.recovery, message, fds)
        else:
            close_fds(fds)           # recovered already, or nothing to recover
        last = not message.get("more")          # more than 252 come in several frames
        if last:
            peer.token = None
            peer.channel.channel.accept_fds = False
        ours = _identities(listener.sock.fileno() for listener in self.listeners)
        if peer.resumed and peer.state == "starting" and (last or (ours and ours <= peer.shown)):
            state, peer.resumed = peer.resumed, None
            if ours and ours <= peer.shown:
                peer.holds = True
                peer.report(state)
                log.info("worker pid %d uid %d re-registered (%s)", peer.pid, peer.uid, state)
                self._worker_changed(peer)
            else:
                log.info("worker pid %d uid %d re-registered (starting: it does not hold "
                         "this fdserver's listeners)", peer.pid, peer.uid)

    def _recover(self, peer: Peer, recovery: Recovery, message: HandbackMessage,
                 fds: list[int]) -> None:
        try:
            taken = recovery.take(fds, message["listeners"])
        except ProtocolError as exc:
            self._warn.warning(peer.uid, "refused handback from pid %d uid %d: %s", peer.pid,
                               peer.uid, exc)
            raise
        for listener in taken:
            log.info("took back %s on %s from worker pid %d", listener.name, listener.address,
                     peer.pid)
        self._mark(taken)
        self.listeners.extend(taken)
        if recovery.done:
            self.recovery = None
            if self._give_up:
                self._give_up.cancel()
            self._serving()
            for waiting in self._deferred:
                if not waiting.channel.closed:
                    self._hand_over(waiting)
            self._deferred.clear()

    def _on_state(self, peer: Peer, message: StateMessage, fds: list[int]) -> None:
        state = peer.report(message["state"])
        if state is None:
            return
        log.info("worker pid %d %s", peer.pid, state)
        if state == "draining" and self.mode == "dispatch":
            peer.channel.send({"type": "released"})     # nothing is dispatched to it now
        self._worker_changed(peer)

    def _on_load(self, peer: Peer, message: LoadMessage, fds: list[int]) -> None:
        self._take_load(peer, message["connections"], message["received"])

    def _take_load(self, peer: Peer, connections: int, received: int) -> None:
        # Clamped: one worker's word must not overflow everyone's share.
        peer.connections = min(max(0, connections), self.max_peers * 1024)
        peer.received = min(max(0, received), peer.dispatched)
        if self._placement:
            self._placement.changed()
        if self._rebalancer:
            self._rebalancer.changed()

    def _on_heartbeat(self, peer: Peer, message: HeartbeatMessage, fds: list[int]) -> None:
        peer.beat_at = time.monotonic()
        peer.lag = min(max(0.0, float(message["lag"])), 1e6)
        requests = message.get("requests")
        if _json_int(requests) and requests >= 0:
            peer.served(requests, peer.beat_at)
        if "connections" in message or "received" in message:
            connections, received = message.get("connections"), message.get("received")
            if not (_json_int(connections) and _json_int(received)):
                raise ProtocolError("heartbeat message has a bad 'connections' or 'received'")
            self._take_load(peer, connections, received)

    def _wants_metrics(self, peer: Peer) -> bool:
        return (self._endpoint is not None and peer.role == "worker"
                and "metrics" in peer.features)

    def _on_metrics(self, peer: Peer, message: MetricsMessage, fds: list[int]) -> None:
        if not self._wants_metrics(peer):
            raise ProtocolError("metrics from a worker this fdserver did not ask for them")
        self.metrics.add(message)

    def _on_recycle(self, peer: Peer, message: RecycleMessage, fds: list[int]) -> None:
        if "recycle" not in peer.features:
            raise ProtocolError("recycle from a worker without the recycle feature")
        requests = message.get("requests")
        drain = message.get("drain")
        if isinstance(drain, bool) or not isinstance(drain, (int, float)) or not drain >= 0:
            drain = None        # NaN too
        else:
            drain = float(min(drain, MAX_DRAIN)) + 0.0     # not -0.0
        log.info("worker pid %d is due to recycle (%s requests; its drain takes at most %s)",
                 peer.pid, requests if isinstance(requests, int) else "?",
                 "?" if drain is None else f"{drain:g}s")
        self._recycler.ask(peer, drain)

    def _worker_changed(self, peer: Peer) -> None:
        """A worker's state changed: answer waits, tell systemd, re-place load."""
        self._waits.changed(peer)
        self.metrics.worker_changed(peer)
        self._recycler.changed()
        if self.agent:
            self.capacity.observe(self._ready_count())
        self._notify()
        if self._placement:
            self._placement.worker_changed()
        if self._rebalancer:
            self._rebalancer.changed()

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

    def status(self) -> StatusMessage:
        """The answer to fdctl's status request."""
        return {
            "type": "status",
            "server": {"pid": os.getpid(), "uid": os.getuid(), "version": __version__,
                       "mode": self.mode,
                       "protocol": PROTOCOL_VERSION, "socket": self.socket_file.path,
                       "started_at": iso_time(self.started_at),
                       **({"agent": self.agent.address, "drained": self.drain_state.drained,
                           "capacity": self.capacity.value()} if self.agent else {})},
            "listeners": [self._status_of(listener) for listener in self.listeners],
            "workers": [p.describe() for p in self.workers()],
        }

    def _status_of(self, listener: Listener) -> dict[str, Any]:
        described = listener.describe()
        if listener.tls and self.renewal:
            described["tls"] = self.renewal.describe()
        return described

    # -- HAProxy's agent and the host's drain --------------------------------

    def _ready_count(self) -> int:
        # A stuck worker serves nothing: it counts as missing capacity.
        return sum(1 for p in self._unsorted_workers()
                   if p.state == "ready" and not p.unresponsive)

    def _agent_answer(self) -> str:
        ready = self._ready_count()
        self.capacity.observe(ready)
        return reply(ready, self.capacity.value(), self.stopping or self.drain_state.drained)

    def _on_drain(self, peer: Peer, message: DrainMessage, fds: list[int]) -> None:
        self._operator_only(peer, message["type"])
        if not self.agent:
            raise ProtocolError("fdserver runs without --agent: no balancer to drain from")
        drained = message["type"] == "drain"
        persisted = self.drain_state.set(drained)
        log.info("host %s by fdctl (pid %d uid %d)", "drained" if drained else "undrained",
                 peer.pid, peer.uid)
        wait = message.get("wait")
        since = time.monotonic()
        askers = set(self.agent.recent_askers(0.0))
        if drained and isinstance(wait, (int, float)) and wait > 0 and askers:
            timer = self._loop.call_later(min(float(wait), 3600.0), self._end_drain_wait, peer)
            self._drain_waits.append((peer, since, askers, timer, persisted))
            peer.waits_drain = True
            if peer.timer:
                peer.timer.cancel()
            return
        peer.channel.send(self._drained(persisted, askers if drained else set(), set()))

    def _drained(self, persisted: bool, told: set[str], waiting: set[str]) -> DrainedMessage:
        return {"type": "drained", "drained": self.drain_state.drained, "persisted": persisted,
                "told": sorted(told), "waiting": sorted(waiting)}

    def _check_drain_waits(self) -> None:
        if not self._drain_waits or not self.agent:
            return
        for entry in list(self._drain_waits):
            peer, since, askers, _, _ = entry
            told = {host for host, said in self.agent.recent_askers(since).items()
                    if said == "drain"}
            if askers <= told:
                self._end_drain_wait(peer)

    def _end_drain_wait(self, peer: Peer) -> None:
        for entry in list(self._drain_waits):
            if entry[0] is peer:
                self._drain_waits.remove(entry)
                entry[3].cancel()
                assert self.agent
                told = {host for host, said in self.agent.recent_askers(entry[1]).items()
                        if said == "drain"}
                peer.waits_drain = False
                if not peer.channel.closed:
                    peer.channel.send(self._drained(entry[4], told & entry[2],
                                                    entry[2] - told))
                    self._arm(peer, self.ctl_idle_timeout, "idle for too long")

    def _on_status(self, peer: Peer, message: StatusMessage, fds: list[int]) -> None:
        peer.channel.send(self.status())

    def _on_wait(self, asker: Peer, message: WaitMessage, fds: list[int]) -> None:
        self._waits.add(asker, message)

    # -- TLS renewal -------------------------------------------------------

    def _on_reload(self, asker: Peer, message: ReloadMessage, fds: list[int]) -> None:
        self._operator_only(asker, "reload")
        self._reload(asker.channel.send)

    def _operator_only(self, asker: Peer, what: str) -> None:
        """What changes the host is for root and fdserver's own user; any peer of
        the socket may only look (status, waits)."""
        if asker.uid not in (0, os.getuid()):
            self._warn.warning(asker.uid, "refused %s from pid %d uid %d: not root or "
                               "fdserver's user", what, asker.pid, asker.uid)
            raise ProtocolError(f"{what} is for root and fdserver's own user; uid {asker.uid} "
                                f"may ask for status only")

    def _reload_on_signal(self) -> None:
        log.info("SIGHUP: reloading the certificate")
        self._reload(lambda answer: None)       # the outcome is logged

    def _reload(self, answer: Callable[[ReloadedMessage], None]) -> None:
        if self.renewal is None:
            why = "fdserver serves no TLS: there is no certificate to reload (--certfile)"
            log.warning("reload: %s", why)
            answer({"type": "reloaded", "ok": False, "message": why})
            return
        self.renewal.reload(self._unsorted_workers, answer)

    def _on_tls(self, peer: Peer, message: TLSMessage, fds: list[int]) -> None:
        if self.renewal:
            self.renewal.acknowledged(peer, message)

    def _state_of(self, pid: int) -> PeerState:
        for peer in self.peers:
            if peer.role == "worker" and peer.pid == pid:
                return peer.state
        return "gone"


def _identities(fds: Iterable[int]) -> set[tuple[int, int]]:
    """(device, inode) of each descriptor: equal for the very same socket."""
    found = set()
    for fd in fds:
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        found.add((st.st_dev, st.st_ino))
    return found


def _json_int(value: object) -> TypeGuard[int]:
    """An optional field that is an integer as a load message's must be (see
    protocol.validate): not a bool, at most MAX_INT either way."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_INT


def _reported(peer: Peer) -> int:
    """Shared mode: a worker's open connections, as it last reported them."""
    return peer.connections
