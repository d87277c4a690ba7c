"""What an app may learn of, and add to, its process's life under fdapp.

Two public hooks, re-exported by the ``fdserver`` package::

    import fdserver

    class Poll(tornado.web.RequestHandler):
        async def get(self):
            # A long-poll answers "reconnect" as soon as this process drains,
            # instead of being cut at --graceful-timeout.
            waiter = asyncio.ensure_future(fdserver.draining().wait())
            ...

    fdserver.on_shutdown(pool.close)     # after the drain, inside the loop

Standard library only: importing it costs an app nothing, and outside fdapp
the event is simply never set and the hooks never run.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("fdapp")

ShutdownHook = Callable[[], "Awaitable[Any] | Any"]


class Lifecycle:
    """The drain event and the shutdown hooks of one process."""

    def __init__(self) -> None:
        self.draining = asyncio.Event()
        self.hooks: list[ShutdownHook] = []

    async def shut_down(self, timeout: float) -> None:
        """Run the hooks, last registered first (as atexit), within *timeout* in all.

        A hook that raises or overruns is logged; the others still run.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.hooks:
            hook = self.hooks.pop()
            name = getattr(hook, "__qualname__", repr(hook))
            try:
                result = hook()
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, max(0.0, deadline - loop.time()))
            except TimeoutError:
                log.error("shutdown hook %s did not finish within the %gs left; going on",
                          name, timeout)
            except Exception as exc:
                log.error("shutdown hook %s failed: %s: %s", name, type(exc).__name__, exc)


_process = Lifecycle()


def draining() -> asyncio.Event:
    """Set once this process starts draining (SIGTERM, or recycling).

    Await ``draining().wait()`` next to whatever a long request waits for,
    and answer at once when it is set: the other workers are up.
    """
    return _process.draining


def on_shutdown(hook: ShutdownHook) -> ShutdownHook:
    """Run *hook* (a function or a coroutine function) once the drain is over.

    Hooks run inside the event loop, last registered first, within fdapp's
    ``--shutdown-timeout`` in all; one that raises is logged and the process
    still exits.  Returns *hook*, so it can decorate a function.
    """
    _process.hooks.append(hook)
    return hook


def current() -> Lifecycle:
    """This process's lifecycle (for fdapp's runner)."""
    return _process
