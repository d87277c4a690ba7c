"""One thing Python's ssl module does not offer: setting the session ticket keys.

A TLS client resumes a session with a ticket the server encrypted with its
ticket key.  Processes forked from one that made the SSLContext share that
key; independently started workers each make their own, so a ticket from
one worker fails on the next (a full handshake: wrk and browsers resume).
fdserver makes one key and sends it with the certificate; each worker sets
it with OpenSSL's ``SSL_CTX_set_tlsext_ticket_keys``, reached through
ctypes: the ``SSL_CTX *`` is the first field of CPython's SSLContext object.

That is CPython's private layout, so :func:`share_ticket_keys` checks it
first (the pointer's options must be the context's), then a real resumption
between two contexts (:func:`works`); if either fails, workers keep their own
keys, as before: correct, with fewer resumptions.  Standard library only.
"""

from __future__ import annotations

import ctypes
import functools
import os
import ssl
from typing import Any

TICKET_KEYS_LENGTH = 80          # name 16 + HMAC secret 32 + AES key 32 (OpenSSL 1.1, 3)
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59


def new_ticket_keys() -> bytes:
    return os.urandom(TICKET_KEYS_LENGTH)


@functools.cache
def _libssl() -> Any:
    import _ssl

    # dlsym through the _ssl module finds the very libssl it uses.
    lib = ctypes.CDLL(_ssl.__file__)
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    return lib


def _ssl_ctx(context: ssl.SSLContext) -> int | None:
    """The SSL_CTX pointer of *context*, if it is where CPython keeps it."""
    try:
        lib = _libssl()
        pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
        if not pointer or lib.SSL_CTX_get_options(pointer) != int(context.options):
            return None
        return int(pointer)
    except (OSError, AttributeError, ValueError):
        return None


def set_ticket_keys(context: ssl.SSLContext, keys: bytes) -> bool:
    """Make *context* encrypt and accept tickets with *keys*; False if it cannot."""
    if len(keys) != TICKET_KEYS_LENGTH:
        return False
    pointer = _ssl_ctx(context)
    if pointer is None:
        return False
    buffer = ctypes.create_string_buffer(keys, TICKET_KEYS_LENGTH)
    return bool(_libssl().SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS,
                                       TICKET_KEYS_LENGTH, buffer))


def works(make: Any) -> bool:
    """Whether a session from one context made by *make()* resumes on another, both
    given the same keys (in memory: no socket)."""
    keys = new_ticket_keys()
    first, second = make(), make()
    if not (set_ticket_keys(first, keys) and set_ticket_keys(second, keys)):
        return False
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    try:
        session = _handshake(client, first, None).session
        return session is not None and _handshake(client, second, session).session_reused
    except (ssl.SSLError, OSError):
        return False


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext,
               session: ssl.SSLSession | None) -> ssl.SSLObject:
    """A whole handshake between two in-memory ends; returns the client's end."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    near = client.wrap_bio(c_in, c_out, server_side=False, session=session)
    far = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for end in (near, far):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    # TLS 1.3 sends the ticket after the handshake: let the client read it.
    try:
        near.read(1)
    except ssl.SSLWantReadError:
        pass
    return near
