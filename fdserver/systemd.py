"""systemd integration: socket activation in, readiness notifications out.

Both take the environment as a parameter (the entry point passes
``os.environ``) and remove the variables they consumed, so that nothing fdserver
might start inherits them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

from .errors import ActivationError
from .listeners import DEFAULT_NAME, Listener

SD_LISTEN_FDS_START = 3


def activated_listeners(environ: MutableMapping[str, str]) -> list[Listener] | None:
    """Listeners passed by systemd (LISTEN_FDS), or None if there are none.

    ``LISTEN_PID`` must be this process: otherwise the variables were
    inherited from a parent and the descriptors are not ours to take.
    """
    if "LISTEN_FDS" not in environ:
        return None
    fds_text = environ.pop("LISTEN_FDS")
    pid_text = environ.pop("LISTEN_PID", "")
    names_text = environ.pop("LISTEN_FDNAMES", None)
    if not pid_text.isdigit() or int(pid_text) != os.getpid():
        raise ActivationError(f"LISTEN_PID={pid_text or '(unset)'} is not this process "
                              f"({os.getpid()}); refusing descriptors meant for another")
    if not fds_text.isdigit() or int(fds_text) < 1:
        raise ActivationError(f"LISTEN_FDS={fds_text!r} is not a positive count")
    count = int(fds_text)
    names = names_text.split(":") if names_text else [DEFAULT_NAME] * count
    if len(names) != count:
        raise ActivationError(f"LISTEN_FDNAMES has {len(names)} names for {count} descriptors")
    listeners = []
    for offset, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + offset
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"LISTEN_FDS descriptor {fd} ({name}): {exc.strerror}") from None
        if (sock.type != socket.SOCK_STREAM
                or sock.family not in (socket.AF_INET, socket.AF_INET6)
                or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
            sock.detach()
            raise ActivationError(f"LISTEN_FDS descriptor {fd} ({name}) is not a listening "
                                  "TCP socket (use ListenStream=ADDRESS:PORT in the .socket "
                                  "unit)")
        sock.set_inheritable(False)
        sock.setblocking(False)
        listeners.append(Listener(name if name.isidentifier() else DEFAULT_NAME, sock))
    return listeners


class Notifier:
    """sd_notify(3): READY=1, STOPPING=1 and STATUS= lines, if NOTIFY_SOCKET is set."""

    def __init__(self, environ: MutableMapping[str, str]) -> None:
        address = environ.pop("NOTIFY_SOCKET", None)
        self._sock: socket.socket | None = None
        self._address = ""
        if address and address[0] in "/@":
            # A leading @ means Linux's abstract namespace.
            self._address = "\0" + address[1:] if address[0] == "@" else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError:
            pass        # systemd gone or not listening: nothing to tell

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
