"""The Tornado side of an app process: load the app, serve fdserver's sockets.

Life of a worker: register with fdserver (receive the listeners), start
taking connections (see :mod:`fdserver.acceptor`), report ``ready``; on
SIGTERM or SIGINT report ``draining``, drain (see :mod:`fdserver.drain`) and
exit 0.  A second SIGINT, or SIGQUIT,
exits at once.

If fdserver goes away the worker keeps serving (it holds its own copy of
every listener) and reconnects in the background; to a restarted fdserver
that could not bind the port, it hands its listeners back (see
:mod:`fdserver.recovery`).
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import random
import signal
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from tornado.netutil import ssl_options_to_context

from . import lifecycle
from .acceptor import Acceptor
from .client import Registration, mode_of, resume, retry_delays
from .drain import DrainingHTTPServer
from .errors import AppError, FdserverError
from .loader import load
from .protocol import (
    HEARTBEAT_INTERVAL,
    MAX_DRAIN,
    HeartbeatMessage,
    Message,
    MetricsMessage,
    Mode,
    Reported,
    TLSMessage,
    on_the_tick,
)
from .requestlog import Reporter, RequestLog, skip_unlogged_lines
from .tls import quiet_handshake_errors, server_context
from .transport import LoopChannel

log = logging.getLogger("fdapp")

DEFAULT_GRACEFUL_TIMEOUT = 30.0
DEFAULT_KEEPALIVE_GRACE = 1.0
DEFAULT_SHUTDOWN_TIMEOUT = 5.0
RECONNECT_MAX_DELAY = 1.0
# What fdapp reads from its channel (see fdserver.client.register).
FEATURES = ("share", "dispatch", "heartbeat", "recycle", "tls", "metrics", "proxy", "shed")


def features(balance: bool = True) -> tuple[str, ...]:
    """What this worker reads; with --no-balance it does not shed connections."""
    return FEATURES if balance else tuple(f for f in FEATURES if f != "shed")


class Worker:
    """Makes the app *spec* names, registers, serves until drained.

    *target* is what :func:`fdserver.loader.load_app` imported; *register*
    registers with fdserver (blocking: it runs in a thread, once the app is
    warm).
    """

    # Made once the loop runs (_main).
    server: DrainingHTTPServer
    channel: LoopChannel
    acceptor: Acceptor
    _exit: asyncio.Future[int]
    _released: asyncio.Future[None]
    # TLS: the app's own context, fdserver's, and the listeners fdserver's is for.
    _app_context: ssl.SSLContext | None
    _fdserver_context: ssl.SSLContext | None
    _tls_names: frozenset[str]

    registration: Registration

    def __init__(
        self,
        spec: str,
        target: Any,
        register: Callable[[], Registration],
        *,
        graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT,
        keepalive_grace: float = DEFAULT_KEEPALIVE_GRACE,
        on_state: Callable[[Reported], None] = lambda state: None,
        server_options: dict[str, Any] | None = None,
        balance: bool = True,
        timeout: float | None = None,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        max_requests: int | None = None,
        max_requests_jitter: int = 0,
        access_log_format: str | None = None,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    ) -> None:
        self.loop_factory = loop_factory     # None: asyncio's own loop
        # gunicorn's rule: recycle after N + random(0..J) requests, so that
        # workers started together do not all recycle together.
        self.max_requests = (max_requests + random.randint(0, max_requests_jitter)
                             if max_requests else None)
        self._recycle_asked = False
        self._status = 0                 # exit status after a drain
        self.spec = spec
        self.target = target
        self.register = register
        self.timeout = timeout
        self.shutdown_timeout = shutdown_timeout
        self._main_task: asyncio.Future[Any] | None = None
        self.graceful_timeout = graceful_timeout
        self.keepalive_grace = keepalive_grace
        self.on_state = on_state
        self.server_options = server_options or {}
        self.balance = balance
        self._drain_task: asyncio.Task[None] | None = None
        self._resuming = False            # a re-registration's handshake is under way
        self._reconnect_task: asyncio.Task[None] | None = None
        # Counts for fdserver and the access log (fdserver.requestlog): only
        # installed when fdserver asks for metrics or --access-log is on.
        self.access_log_format = access_log_format
        self._request_log: RequestLog | None = None
        self._reporter: Reporter | None = None

    def run(self) -> int:
        """Serve until drained; return the process exit status."""
        with asyncio.Runner(loop_factory=self.loop_factory) as runner:
            return runner.run(self._main())

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self._exit = loop.create_future()
        self._released = loop.create_future()
        loaded = await load(self.spec, self.target)
        # After the warm-up: a slow sync factory is no stuck loop.
        if self.timeout:
            self._watch_loop(self.timeout)
        self._main_task = loaded.main
        self.server = loaded.server or DrainingHTTPServer(loaded.app, **self.server_options)
        skip_unlogged_lines(self.server.request_callback)
        # The app's own ssl_options (its main()'s HTTPServer), checked before registering.
        self._app_context = _app_context(self.spec, self.server.ssl_options)
        # Warm: now register (it may wait for fdserver) and take connections.
        # In a daemon thread: a SIGTERM meanwhile must not wait for it.
        self.registration = await _in_daemon_thread(self.register)
        self.channel = LoopChannel(self.registration.channel, loop,
                                   self._on_message, self._on_server_gone)
        proxied = frozenset(listener.name for listener in self.registration.listeners
                            if listener.proxy)
        self.acceptor = Acceptor(self.server, self._send, balance=self.balance,
                                 proxied=proxied)
        self.acceptor.load_in_beats = self.registration.beat_load
        # fdserver's TLS material, and which listeners it is for, as fdserver sends them.
        self._fdserver_context = self.registration.ssl_context()
        self._tls_names = frozenset(one.name for one in self.registration.listeners if one.tls)
        self._set_contexts()
        if self.acceptor.contexts:
            quiet_handshake_errors()
        if self.access_log_format:
            self._log_requests()
        self._follow_metrics(self.registration.metrics)
        if self.registration.mode == "shared":
            self._start_accepting()
        # In dispatch mode the listeners are only held, for a handback to a
        # restarted fdserver (see fdserver.recovery); fdserver accepts.

        # Signal handlers only hand the signal to the loop.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        self._report("ready")
        if self._main_task is not None:       # from now on its end is watched
            self._main_task.add_done_callback(self._main_ended)
        self._beat_on_tick(loop.time())
        names = ", ".join(f"{listener.name} on {listener.address}"
                          for listener in self.registration.listeners)
        log.info("pid %d ready: serving %s", os.getpid(), names)
        try:
            return await self._exit
        finally:
            faulthandler.cancel_dump_traceback_later()
            for task in (self._drain_task, self._reconnect_task, self._main_task):
                if task and not task.done():
                    task.cancel()
            if self._reporter:
                # The last report: every connection has ended (or was cut).
                self._reporter.stop()
                self._reporter.flush()
            self.channel.flush_now()
            self.channel.close(None)

    def _start_accepting(self) -> None:
        self.acceptor.start(self.registration.sockets(),
                            [listener.name for listener in self.registration.listeners])

    def _set_contexts(self) -> None:
        """TLS for fdserver's TLS listeners; the app's own ssl_options for the rest."""
        contexts = {}
        for listener in self.registration.listeners:
            context = (self._fdserver_context if listener.name in self._tls_names
                       else self._app_context)
            if context is not None:
                contexts[listener.name] = context
        if self._app_context is not None and not self.acceptor.contexts:
            log.info("the app's HTTPServer has ssl_options: serving TLS with them on %s",
                     ", ".join(name for name, context in contexts.items()
                               if context is self._app_context))
        self.acceptor.contexts = contexts

    def _renew(self, message: TLSMessage) -> None:
        """TLS material from fdserver (a renewal, or a new fdserver's): new
        handshakes use it; it also says which listeners serve TLS now."""
        if message.get("chain") is None:
            return
        try:
            context = server_context(message)
        except FdserverError as exc:
            log.warning("renewed certificate refused, keeping the one in service: %s", exc)
            self._send({"type": "tls", "serial": message["serial"], "ok": False,
                        "error": str(exc)})
            return
        names = message.get("listeners")
        if isinstance(names, list):
            self._tls_names = frozenset(name for name in names if isinstance(name, str))
        self.registration.tls = message
        self._fdserver_context = context
        self._set_contexts()
        quiet_handshake_errors()
        log.info("certificate in service for new connections on %s",
                 ", ".join(sorted(self._tls_names)) or "no listener")
        self._send({"type": "tls", "serial": message["serial"], "ok": True})

    def _log_requests(self) -> RequestLog | None:
        """The request hook on the app, installed once, when first wanted."""
        if self._request_log is None:
            request_log = RequestLog(
                [(one.name, one.family, one.address) for one in self.registration.listeners],
                access_log_format=self.access_log_format)
            if not request_log.install(self.server.request_callback):
                return None
            self._request_log = request_log
        return self._request_log

    def _follow_metrics(self, wanted: bool) -> None:
        """Report counts to fdserver if it asks (its welcome); stop if a new one does not."""
        if wanted and self._reporter is None:
            request_log = self._log_requests()
            if request_log is not None:
                loop = asyncio.get_running_loop()
                self._reporter = Reporter(request_log, self._send_metrics, loop.call_later,
                                          loop.time)
                self._reporter.start()
        elif not wanted and self._reporter is not None:
            self._reporter.stop()
            self._reporter.requests.counting = False
            self._reporter = None

    def _send_metrics(self, message: MetricsMessage) -> bool:
        if not self.channel.usable:
            return False
        self.channel.send(message)
        return True

    def _main_ended(self, main: asyncio.Future[Any]) -> None:
        """The app's own main() ended after it listened: fine, unless it failed."""
        if main.cancelled() or main.exception() is None:
            return
        exc = main.exception()
        log.error("%s failed after it listened: %s: %s; draining", self.spec,
                  type(exc).__name__, exc)
        self._status = 1
        self._start_drain(None)

    def _beat(self, due: float) -> None:
        """Tell fdserver the loop runs, and how late; ask to recycle when due."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._exit.done():
            return
        beat: HeartbeatMessage = {"type": "heartbeat", "lag": round(max(0.0, now - due), 4),
                                  "requests": self.server.requests}
        load = self.acceptor.load_for_beat()
        if load is not None:
            beat["connections"], beat["received"] = load
        self._send(beat)
        if (self.max_requests and not self._recycle_asked and not self._drain_task
                and self.server.requests >= self.max_requests):
            self._recycle_asked = True
            log.info("served %d requests (--max-requests %d); waiting for a turn to recycle",
                     self.server.requests, self.max_requests)
            self._ask_to_recycle()
        self._beat_on_tick(now, last=due)

    def _beat_on_tick(self, now: float, last: float = 0.0) -> None:
        """The next heartbeat, on the first whole second after *now* and the
        last beat's: every worker's at once."""
        due = on_the_tick(now, HEARTBEAT_INTERVAL, last)
        asyncio.get_running_loop().call_at(due, self._beat, due)

    def _ask_to_recycle(self) -> None:
        if self.channel.closed:
            self._recycle()          # no fdserver to take turns with
        else:
            self._send({"type": "recycle", "requests": self.server.requests,
                        "drain": min(self.graceful_timeout + self.shutdown_timeout, MAX_DRAIN)})

    def _recycle(self) -> None:
        self._start_drain(f"recycling after {self.server.requests} requests")

    def _start_drain(self, why: str | None) -> None:
        """Drain once, whichever asked first: a signal, recycling, main() failing."""
        if self._drain_task is not None:
            return
        if why:
            log.info("%s: draining %d connections (at most %gs)", why,
                     self.server.connection_count, self.graceful_timeout)
        self._drain_task = asyncio.ensure_future(self._drain())

    def _watch_loop(self, timeout: float) -> None:
        """Exit non-zero, every thread's stack in the log, if the loop stalls *timeout*.

        faulthandler's own thread does the dumping and the exit; the loop
        only pushes the deadline back while it runs.
        """
        faulthandler.dump_traceback_later(timeout, exit=True)
        asyncio.get_running_loop().call_later(timeout / 4, self._watch_loop, timeout)

    def _report(self, state: Reported) -> None:
        self.on_state(state)
        self._send({"type": "state", "state": state})

    def _send(self, message: Message) -> None:
        self.channel.send(message)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGQUIT or (self._drain_task and signum == signal.SIGINT):
            left = self.server.connection_count
            log.warning("%s: exiting at once, cutting %d connections", name, left)
            self._finish(1)
        else:
            self._start_drain(name)

    def _adopt_mode(self, mode: Mode) -> None:
        """Follow a restarted fdserver that runs in the other mode."""
        if mode == self.registration.mode:
            return
        log.warning("fdserver now runs in %s mode; switching", mode)
        self.registration.mode = mode
        if mode == "shared":
            self._start_accepting()
        else:
            self.acceptor.stop_accepting()    # keep the sockets, for a handback

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.graceful_timeout
        self._report("draining")
        lifecycle.current().draining.set()
        self.acceptor.close()
        if self._resuming and self._reconnect_task:
            # The new fdserver counts this worker ready as the handshake ends
            # and may send it connections: let it end; _reconnect then says
            # "draining" on the new channel, and what was sent is served.
            await asyncio.wait([self._reconnect_task], timeout=max(0.0, deadline - loop.time()))
        if self.registration.mode == "dispatch" and not self.channel.closed:
            # Connections fdserver sent before it saw "draining" are still on
            # their way: serve them too, then fdserver says "released".
            try:
                await asyncio.wait_for(asyncio.shield(self._released), self.graceful_timeout)
            except TimeoutError:
                log.warning("fdserver did not release this worker; draining anyway")
        for sock in self.registration.sockets():
            sock.close()
        # One deadline for all of it: supervisord's stopwaitsecs counts on it.
        cut = await self.server.drain(max(0.0, deadline - loop.time()), self.keepalive_grace)
        if cut:
            log.warning("graceful timeout: closed %d connections still open", cut)
        hooks = lifecycle.current().hooks
        if hooks:
            log.info("running %d shutdown hooks (at most %gs)", len(hooks), self.shutdown_timeout)
            await lifecycle.current().shut_down(self.shutdown_timeout)
        if not cut:
            log.info("drained; exiting")
        self._finish(self._status)

    def _finish(self, status: int) -> None:
        if not self._exit.done():
            self._exit.set_result(status)

    def _on_message(self, message: Message, fds: list[int]) -> None:
        if message["type"] == "connections" and len(fds) == len(message["peers"]):
            family = socket.AF_INET6 if message.get("family") == "AF_INET6" else socket.AF_INET
            for i, (fd, peer) in enumerate(zip(fds, message["peers"], strict=True)):
                try:
                    self.acceptor.on_connection(fd, peer, family, message["listener"])
                except Exception:
                    for rest in fds[i + 1:]:
                        os.close(rest)
                    raise
            return
        for fd in fds:
            os.close(fd)
        if message["type"] == "share":
            self.acceptor.on_share(message["connections"], message["workers"])
        elif message["type"] == "shed" and self.balance:
            self.server.shed(message["connections"])
        elif message["type"] == "recycle" and self._recycle_asked:
            self._recycle()
        elif message["type"] == "tls":
            self._renew(message)
        elif message["type"] == "released" and not self._released.done():
            self._released.set_result(None)
        elif message["type"] == "error":
            log.warning("fdserver says: %s", message["message"])

    def _on_server_gone(self, reason: str | None) -> None:
        if not self._released.done():
            self._released.set_result(None)     # nothing more can be dispatched
        if self._exit.done() or self._drain_task:
            return               # leaving anyway: nothing to re-register
        log.warning("lost fdserver (%s); still serving on the listeners this process holds; "
                    "reconnecting", reason or "connection closed")
        self._reconnect_task = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        loop = asyncio.get_running_loop()
        path = self.registration.path
        delays = retry_delays(RECONNECT_MAX_DELAY)
        said = None
        while not self._drain_task:
            self._resuming = True
            try:
                # The handshake blocks briefly; keep it off the event loop.
                channel, welcome = await loop.run_in_executor(
                    None, resume, path, "ready", self.registration.listeners,
                    features(self.balance), self.registration.server_uids)
            except (FdserverError, OSError) as exc:
                # Each new reason once (a restart fails a few times by design);
                # the loop goes on whatever it is.
                (log.warning if str(exc) != said else log.debug)("reconnecting: %s", exc)
                said = str(exc)
            else:
                if self._released.done():
                    self._released = loop.create_future()
                mode = mode_of(welcome)
                if self._drain_task:
                    self.registration.mode = mode      # accept nothing more ourselves
                else:
                    self._adopt_mode(mode)
                    self.acceptor.restart_counts()     # the new fdserver counts from zero
                self.channel = LoopChannel(channel, loop, self._on_message, self._on_server_gone)
                if not welcome.get("tls") and self._tls_names:
                    # The new fdserver serves no TLS: neither do we, then.
                    log.warning("fdserver now serves no TLS; serving %s as plain HTTP",
                                ", ".join(sorted(self._tls_names)))
                    self._tls_names = frozenset()
                    self._fdserver_context = None
                    self._set_contexts()
                self._follow_metrics(welcome.get("metrics") is True)
                self.acceptor.load_in_beats = welcome.get("beat_load") is True
                log.info("re-registered with fdserver at %s (%s mode)", path,
                         self.registration.mode)
                if self._drain_task:
                    # Draining since the handshake began: the new fdserver has
                    # us as ready until it hears otherwise.
                    self._send({"type": "state", "state": "draining"})
                elif self._recycle_asked:
                    self._ask_to_recycle()     # the new fdserver keeps a new queue
                return
            finally:
                self._resuming = False
            await asyncio.sleep(next(delays))


def _app_context(spec: str, ssl_options: Any) -> ssl.SSLContext | None:
    """The context of the app's own ssl_options (its main()'s HTTPServer), if any."""
    if ssl_options is None:
        return None
    try:
        return ssl_options_to_context(ssl_options, server_side=True)
    except (OSError, ssl.SSLError, ValueError, TypeError) as exc:
        raise AppError(f"{spec}: the app's ssl_options do not load: "
                       f"{getattr(exc, 'strerror', None) or exc}") from None


async def _in_daemon_thread(work: Callable[[], Registration]) -> Registration:
    """Run blocking *work* off the loop, in a thread the process need not wait for."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Registration] = loop.create_future()

    def settle(result: Registration | None, exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)      # type: ignore[arg-type]

    def run() -> None:
        try:
            outcome: tuple[Registration | None, BaseException | None] = (work(), None)
        except Exception as exc:
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:
            pass                          # the loop is gone: the process is exiting

    threading.Thread(target=run, name="fdapp-register", daemon=True).start()
    return await done
