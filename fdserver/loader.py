"""Run an app as it is written: an Application, a factory, or its own main().

``MODULE:ATTR`` may name:

* a ``tornado.web.Application`` (any HTTPServerConnectionDelegate);
* a callable or an async callable returning one: called inside the running
  event loop, so ``PeriodicCallback``, ``spawn_callback`` and
  ``asyncio.create_task`` in it work, and awaited, so its warm-up ends
  before this process registers with fdserver and takes a connection;
* an existing ``main()`` (sync or async) that builds its app and calls
  ``app.listen(...)``, ``HTTPServer(app).listen(...)`` or ``bind()``: the
  server it makes is served on fdserver's listeners instead, and the port
  it names is ignored (said once in the log).  A sync main() that then
  starts the loop itself (``IOLoop.current().start()``) is fine: the loop
  runs already, so start() returns at once; run_sync() and asyncio.run()
  are refused, naming the way out (an async main(), or fdapp pointed at the
  async function a sync one runs).

How: for the time fdapp runs, ``HTTPServer(...)`` builds a
:class:`ListeningServer`, Tornado's own ``Configurable.configure``, whose
listen(), bind() and add_sockets() note the request instead of binding.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import inspect
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPServerConnectionDelegate
from tornado.ioloop import IOLoop

from .drain import DrainingHTTPServer
from .errors import AppError

log = logging.getLogger("fdapp")


@dataclass
class Loaded:
    """What an app spec gave: an app to serve, or the server its main() made."""

    app: HTTPServerConnectionDelegate | None = None
    server: DrainingHTTPServer | None = None
    main: asyncio.Future[Any] | None = None       # main() still running, if async


class ListeningServer(DrainingHTTPServer):
    """The HTTPServer an app's own main() gets: it asks to listen, fdapp serves."""

    # Set by load() for the time fdapp runs; the first server to ask wins.
    wanted: asyncio.Future[DrainingHTTPServer] | None = None

    def _wants(self, what: str) -> None:
        wanted = ListeningServer.wanted
        if wanted is None or wanted.done():
            log.warning("the app asked another HTTPServer to %s; fdapp serves only the first",
                        what)
            return
        log.info("the app asked its HTTPServer to %s; serving fdserver's listeners instead",
                 what)
        wanted.set_result(self)

    def listen(self, port: int, address: str | None = None, *args: Any, **kwargs: Any) -> None:
        self._wants(f"listen on port {port}")

    def bind(self, port: int, address: str | None = None, *args: Any, **kwargs: Any) -> None:
        self._wants(f"bind port {port}")

    def add_sockets(self, sockets: Any) -> None:
        self._wants("serve sockets of its own")

    def start(self, num_processes: int | None = 1, max_restarts: int | None = None) -> None:
        if num_processes != 1:
            log.warning("the app asked for %s processes; fdapp is one process (start more "
                        "fdapp processes instead)", num_processes)


def import_target(spec: str, path: str | None = None) -> Any:
    """Import ``MODULE:ATTR`` with *path* (default: the current directory) first on sys.path."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AppError(f"{spec!r} is not MODULE:ATTR (for example app:make_app)")
    folder = os.path.abspath(path or os.getcwd())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise AppError(f"cannot import {module_name!r} for {spec}: {exc}") from None
    except Exception as exc:
        raise AppError(f"importing {module_name!r} for {spec} failed: "
                       f"{type(exc).__name__}: {exc}") from None
    try:
        return functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        raise AppError(f"module {module_name!r} has no attribute {attr!r}") from None


def load_app(spec: str, path: str | None = None) -> Any:
    """Import what ``MODULE:ATTR`` names, checked to be something fdapp can run.

    Before fdapp connects: a bad spec fails fast.  The app itself is made
    later, inside the running loop (:func:`load`).
    """
    return _runnable(spec, import_target(spec, path))


def _runnable(spec: str, target: Any) -> Any:
    if not isinstance(target, HTTPServerConnectionDelegate) and not callable(target):
        raise AppError(f"{spec} is a {type(target).__name__}, not a tornado.web.Application "
                       "or a callable returning one")
    return target


async def load(spec: str, target: Any) -> Loaded:
    """Turn *target* (what *spec* names) into something to serve, inside the loop."""
    if isinstance(_runnable(spec, target), HTTPServerConnectionDelegate):
        return _checked(spec, Loaded(app=target))
    loop = asyncio.get_running_loop()
    wanted: asyncio.Future[DrainingHTTPServer] = loop.create_future()
    ListeningServer.wanted = wanted
    HTTPServer.configure(ListeningServer)
    try:
        with _loop_running_already(spec):
            result = target()
    except AppError:
        raise
    except RuntimeError as exc:
        if "asyncio.run() cannot be called from a running event loop" not in str(exc):
            raise AppError(f"calling {spec} failed: {type(exc).__name__}: {exc}") from None
        # Not something fdapp can stand in for: a coroutine run to the end
        # before main() goes on, inside a loop that runs already.  The one it
        # made will never run: no "never awaited" warning about it.
        _close_unstarted(exc)
        raise AppError(f"{spec} calls asyncio.run(), which cannot run inside fdapp's running "
                       "event loop: make main() async and await that coroutine, or point "
                       "fdapp at the async function it runs") from None
    except Exception as exc:
        raise AppError(f"calling {spec} failed: {type(exc).__name__}: {exc}") from None
    if inspect.isawaitable(result):
        running = asyncio.ensure_future(result)
        await asyncio.wait([running, wanted], return_when=asyncio.FIRST_COMPLETED)
        if wanted.done():
            return _checked(spec, Loaded(server=wanted.result(), main=running))
        try:
            result = running.result()
        except Exception as exc:
            raise AppError(f"calling {spec} failed: {type(exc).__name__}: {exc}") from None
    if isinstance(result, HTTPServerConnectionDelegate):
        return _checked(spec, Loaded(app=result))
    if result is None and wanted.done():
        return _checked(spec, Loaded(server=wanted.result()))
    if result is None:
        raise AppError(f"{spec} returned without an app and without asking to listen "
                       "(a main() must call app.listen() or HTTPServer(app).listen())")
    raise AppError(f"{spec} returned a {type(result).__name__}, not a "
                   "tornado.web.Application")


def _close_unstarted(exc: BaseException) -> None:
    """Close the coroutines never started in *exc*'s frames (asyncio.run's
    argument): dropped with the error, each would warn "never awaited"."""
    tb = exc.__traceback__
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if inspect.iscoroutine(value) and (inspect.getcoroutinestate(value)
                                               == inspect.CORO_CREATED):
                value.close()
        tb = tb.tb_next


@contextlib.contextmanager
def _loop_running_already(spec: str) -> Iterator[None]:
    """While a sync main() runs: starting the loop returns at once (it runs
    already), and run_sync(), which would stop fdapp's loop, is refused."""
    io_loop = IOLoop.current()

    def run_sync(*args: Any, **kwargs: Any) -> Any:
        raise AppError(f"{spec} calls IOLoop.run_sync(), which would stop fdapp's running "
                       "loop: make main() async and await that coroutine instead")

    io_loop.start = lambda: None            # type: ignore[method-assign]
    io_loop.run_sync = run_sync             # type: ignore[method-assign]
    try:
        yield
    finally:
        del io_loop.start, io_loop.run_sync  # the class's own again


def _checked(spec: str, loaded: Loaded) -> Loaded:
    app = loaded.app if loaded.server is None else loaded.server.request_callback
    settings = getattr(app, "settings", {})
    if settings.get("autoreload"):
        raise AppError(
            f"{spec}: the app has autoreload on (debug=True): under fdapp a new version is "
            "rolled out by replacing processes through a drain (fdctl rolling-restart); "
            "turn it off with debug=False or autoreload=False (tornado.options: -- "
            "--debug=false)")
    return loaded
