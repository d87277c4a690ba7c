"""The event loop an app process runs on: asyncio's own (default) or uvloop.

``fdapp --loop uvloop`` runs the worker (Tornado, fdapp's acceptor and
IOStream, the drain) on uvloop, a drop-in asyncio loop on libuv: Tornado
runs on any asyncio loop unchanged.  uvloop is an optional dependency
(``pip install fdserver[uvloop]``).
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable

from .errors import FdserverError

LOOPS = ("asyncio", "uvloop")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(name: str) -> LoopFactory | None:
    """What makes the loop called *name*; None for asyncio's default.

    Raises FdserverError, one line, if uvloop is asked for and not installed.
    """
    if name == "asyncio":
        return None
    if name != "uvloop":
        raise FdserverError(f"unknown event loop {name!r} (choose from {', '.join(LOOPS)})")
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError as exc:
        raise FdserverError(f"--loop uvloop: uvloop is not installed ({exc}); install it with "
                            "pip install 'fdserver[uvloop]'") from None
    factory: LoopFactory = uvloop.new_event_loop
    return factory
