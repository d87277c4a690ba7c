"""A worker's side of TLS: the context it serves a TLS listener with.

fdserver sends the certificate chain and key it read (see
:mod:`fdserver.certificates`) in a ``tls`` message; the worker builds an
``ssl.SSLContext`` from them and Tornado's ``SSLIOStream`` does the rest.
A renewal is a new ``tls`` message: new handshakes get the new context,
open connections keep the one they started with.

Standard library only: :func:`fdserver.client.register` users build their
context with it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import ssl
import time
from collections.abc import Iterator
from typing import Any

from . import _openssl
from .errors import TLSError

PR_SET_DUMPABLE = 4
# The stream attribute fdapp names a connection's listener in.
LISTENER_ATTRIBUTE = "fdserver_listener"


def server_context(material: Any) -> ssl.SSLContext:
    """A server-side SSLContext from a ``tls`` message (its chain, key, ...).

    TLS 1.2 at least, ALPN ``http/1.1``, Python's default ciphers (forward
    secret AEAD suites) unless fdserver was given ``--ciphers``, and client
    certificates required if it was given ``--ca-certs``.  With the
    message's ``tickets``, session tickets any worker issued resume on every
    other (see :mod:`fdserver._openssl`).
    """
    ctx = _context(material)
    tickets = material.get("tickets")
    if isinstance(tickets, str) and _tickets_shareable(material):
        try:
            _openssl.set_ticket_keys(ctx, bytes.fromhex(tickets))
        except ValueError:
            pass                # not hex: this worker's own keys, as without
    return ctx


_shareable: bool | None = None


def _tickets_shareable(material: Any) -> bool:
    """Whether this Python lets workers share ticket keys; checked once, warned once."""
    global _shareable
    if _shareable is None:
        _shareable = _openssl.works(lambda: _context(material))
        if not _shareable:
            logging.getLogger("fdapp").warning(
                "this Python's ssl module cannot share TLS session ticket keys between "
                "workers: a session resumes only on the worker that began it")
    return _shareable


def _context(material: Any) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Client-initiated renegotiation only costs the server CPU.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ciphers = material.get("ciphers")
        if isinstance(ciphers, str):
            ctx.set_ciphers(ciphers)
        # OpenSSL reads a chain and a key from files only: these files are
        # anonymous, in this process's memory, and gone when closed.
        with _memory_file(material["chain"]) as chain, _memory_file(material["key"]) as key:
            ctx.load_cert_chain(chain, key, password=_no_password)
        ca = material.get("ca")
        if isinstance(ca, str):
            ctx.load_verify_locations(cadata=ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, ValueError, TypeError, KeyError, OSError) as exc:
        raise TLSError(f"the certificate and key do not load: {_reason(exc)}") from None
    return ctx


def not_dumpable() -> None:
    """Keep the key in this process's memory from others of its user: no core
    dump, no ptrace, /proc/PID/mem and environ readable by root only."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass                # not Linux: nothing more to do here


class HandshakeErrors(logging.Filter):
    """Tornado logs a warning for every client whose TLS handshake fails (a
    scanner, plain HTTP on port 443): at most BURST a WINDOW here, then a count."""

    BURST = 10
    WINDOW = 60.0

    def __init__(self) -> None:
        super().__init__()
        self._start = 0.0
        self._logged = 0
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith("SSL Error on")):
            return True
        now = time.monotonic()
        if now - self._start >= self.WINDOW:
            if self._dropped:
                record.msg = (f"{self._dropped} more failed TLS handshakes in the last "
                              f"{now - self._start:.0f}s; the next: {record.msg}")
            self._start, self._logged, self._dropped = now, 0, 0
        if self._logged < self.BURST:
            self._logged += 1
            return True
        self._dropped += 1
        return False


_handshake_errors = HandshakeErrors()


def quiet_handshake_errors() -> None:
    """Rate-limit Tornado's warnings about failed TLS handshakes (once per process)."""
    logger = logging.getLogger("tornado.general")
    if _handshake_errors not in logger.filters:
        logger.addFilter(_handshake_errors)


def listener_of(request: Any) -> str | None:
    """The name of the fdserver listener *request* came on (``"http"``,
    ``"https"``, ...), or None if not known (e.g. not served by fdapp, or
    asked after a websocket took the connection over)."""
    stream = getattr(getattr(request, "connection", None), "stream", None)
    name = getattr(stream, LISTENER_ATTRIBUTE, None)
    return name if isinstance(name, str) else None


@contextlib.contextmanager
def _memory_file(text: Any) -> Iterator[str]:
    if not isinstance(text, str):
        raise TypeError("not PEM text")
    fd = os.memfd_create("fdserver-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, text.encode("ascii"))
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for a passphrase.
    raise TLSError("the key is encrypted")


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        return reason.lower().replace("_", " ")
    return str(exc) or type(exc).__name__
