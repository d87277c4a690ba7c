"""Whether the host is drained (``fdctl drain``), kept across fdserver restarts.

The state lives in a small file next to fdserver's socket,
``<socket>.drained`` (only with ``--agent``: a drain is what the agent
tells the balancer).  fdserver opens (or creates) it at start-up, before it
drops privileges, and keeps the descriptor, so that it can still rewrite it
afterwards in a folder it may no longer write to.  Empty means in rotation;
anything else means drained (a damaged file must never undo a drain).  It
lives as long as the socket's folder: under /run, until a reboot.
"""

from __future__ import annotations

import logging
import os

from .errors import FdserverError

log = logging.getLogger("fdserver")

MARK = b"drained\n"


class DrainState:
    def __init__(self, socket_path: str) -> None:
        self.path = socket_path + ".drained"
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                               | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise FdserverError(f"cannot open drain state file {self.path}: "
                                f"{(exc.strerror or str(exc)).lower()}") from None
        try:
            content = os.pread(self._fd, 64, 0)
        except OSError:
            content = MARK
        self.drained = bool(content.strip())
        if self.drained:
            log.info("host drained (%s says so): the agent answers 'drain' until "
                     "fdctl undrain", self.path)

    def set(self, drained: bool) -> bool:
        """Record the state; False if it could not be written (it holds until restart)."""
        self.drained = drained
        try:
            os.ftruncate(self._fd, 0)
            if drained:
                os.pwrite(self._fd, MARK, 0)
            os.fsync(self._fd)
        except OSError as exc:
            log.warning("cannot record the drain state in %s: %s", self.path, exc.strerror)
            return False
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
