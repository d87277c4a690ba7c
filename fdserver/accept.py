"""The one accept loop: fdserver's Unix socket, its TCP listeners in dispatch
mode (and in shared mode while no worker is ready), and a worker's shared
listeners all take connections through it.

A listening socket that stays readable must never make the loop spin: a
wakeup takes at most *limit* connections, and when accept fails for want of
descriptors the caller is told, to stop watching for a moment (fdserver's
callers also set aside a listener some holder shut down: EINVAL).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

# accept(2) failing for want of a resource: retrying at once would spin.
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# struct tcp_info (linux/tcp.h): on a listening socket tcpi_unacked is the
# accept queue's length and tcpi_sacked its limit (the backlog).
TCPI_UNACKED = 24
TCPI_SACKED = 28

_T = TypeVar("_T")


def accepted(accept: Callable[[], _T], limit: int, on_error: Callable[[OSError], None],
             may_take: Callable[[], bool] | None = None) -> Iterator[_T]:
    """Up to *limit* results of *accept*, while *may_take* (the balancing) agrees.

    Stops when nothing is queued; skips a connection reset before it was
    taken.  Any other OSError (OUT_OF_DESCRIPTORS, mostly) goes to
    *on_error*, which backs off or raises, and ends this wakeup.
    *may_take* runs before each accept, after the previous connection was
    handled: it sees the load that connection added.
    """
    for _ in range(limit):
        if may_take is not None and not may_take():
            return
        try:
            conn = accept()
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionAbortedError:
            continue
        except OSError as exc:
            on_error(exc)
            return
        yield conn


def raw_accept(sock: socket.socket) -> Callable[[], tuple[int, Any]]:
    """*sock*'s accept returning (descriptor, address).

    socket.accept() builds a socket object for each connection and converts
    its family to an enum; a caller that passes the descriptor on, or wraps
    it with the family known, saves both.  This is CPython's private
    ``socket._accept`` (what ``socket.accept`` calls), checked with the
    others in :mod:`fdserver._tornado`; the public accept if it is gone.
    """
    private = getattr(sock, "_accept", None)
    if callable(private):
        return cast(Callable[[], tuple[int, Any]], private)
    return public_accept(sock)


def public_accept(sock: socket.socket) -> Callable[[], tuple[int, Any]]:
    """The same through socket.accept(): slower, and no private name."""
    def accept() -> tuple[int, Any]:
        conn, address = sock.accept()
        return conn.detach(), address
    return accept


def accept_queue(sock: socket.socket) -> tuple[int, int] | None:
    """(length, limit) of a TCP listener's accept queue, or None (not TCP, not Linux)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCPI_SACKED + 4)
    except (OSError, AttributeError):
        return None
    if len(info) < TCPI_SACKED + 4:
        return None
    unacked, sacked = struct.unpack_from("II", info, TCPI_UNACKED)
    return int(unacked), int(sacked)
