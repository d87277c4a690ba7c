"""fdserver's side of TLS: read the certificate and key, check them, describe them.

fdserver reads the files (as root at start, as its own user on a reload: see
docs/tls.md for the group that makes that work), and sends their contents
to its workers over the registration channel: the app's user never needs
to read the key file.  Everything is checked here, before a worker sees
it, so that a bad renewal is refused with the certificate in service left
in service.  The worker's half is :mod:`fdserver.tls`.
"""

from __future__ import annotations

import os
import ssl
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ._openssl import new_ticket_keys
from .errors import TLSError
from .protocol import TLSMessage
from .tls import server_context

# Far more than any real chain or key: a file this big is the wrong file.
MAX_PEM = 256 * 1024
DEFAULT_LISTENER = "https"


@dataclass(frozen=True)
class TLSFiles:
    """Where the certificate material lives, and which listeners use it."""

    certfile: str
    keyfile: str
    ca_certs: str | None = None
    ciphers: str | None = None
    listeners: frozenset[str] = frozenset({DEFAULT_LISTENER})


@dataclass(frozen=True)
class Material:
    """The certificate chain and key as read, checked, ready to send."""

    files: TLSFiles
    chain: str
    key: str = field(repr=False)        # never in a repr, so never in a log line
    ca: str | None
    subject: str
    not_after: datetime
    # Session ticket keys every worker shares: a new one with each reload.
    tickets: bytes = field(default_factory=new_ticket_keys, repr=False)

    def days_left(self, now: datetime | None = None) -> int:
        return (self.not_after - (now or datetime.now(UTC))).days

    def describe(self, now: datetime | None = None) -> dict[str, Any]:
        """What fdctl shows: no key, no certificate body."""
        return {"subject": self.subject, "not_after": self.not_after.isoformat(),
                "days_left": self.days_left(now), "certfile": self.files.certfile}

    def message(self, serial: int) -> TLSMessage:
        message: TLSMessage = {"type": "tls", "serial": serial, "chain": self.chain,
                               "key": self.key, "listeners": sorted(self.files.listeners),
                               "tickets": self.tickets.hex()}
        if self.ca:
            message["ca"] = self.ca
        if self.files.ciphers:
            message["ciphers"] = self.files.ciphers
        return message


def read(files: TLSFiles, now: datetime | None = None) -> Material:
    """Read and check *files*; TLSError names the file and the cause."""
    # Imported here: only fdserver with --certfile needs it, never a worker.
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    now = now or datetime.now(UTC)
    chain_pem = _read_pem(files.certfile, "--certfile")
    key_pem = _read_pem(files.keyfile, "--keyfile")
    try:
        chain = x509.load_pem_x509_certificates(chain_pem.encode())
    except ValueError:
        raise TLSError(f"--certfile {files.certfile}: no PEM certificate in it") from None
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except TypeError:
        raise TLSError(f"--keyfile {files.keyfile}: the key is encrypted; fdserver needs it "
                       "unencrypted (keep the file readable by root and fdserver's group "
                       "only)") from None
    except (ValueError, UnsupportedAlgorithm):
        # cryptography's own words vary by version and are long: ours say enough.
        raise TLSError(f"--keyfile {files.keyfile}: not a usable PEM private key (no key in "
                       "it, or of a type OpenSSL cannot load)") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    try:
        same = (key.public_key().public_bytes(der, spki)
                == leaf.public_key().public_bytes(der, spki))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TLSError(f"--certfile {files.certfile}: the certificate's key type is not "
                       f"supported ({_first_line(exc)})") from None
    if not same:
        raise TLSError(f"--keyfile {files.keyfile} does not belong to the certificate in "
                       f"--certfile {files.certfile} (their public keys differ)")
    if leaf.not_valid_after_utc <= now:
        raise TLSError(f"--certfile {files.certfile}: the certificate expired on "
                       f"{_when(leaf.not_valid_after_utc)}")
    if leaf.not_valid_before_utc > now:
        raise TLSError(f"--certfile {files.certfile}: the certificate is not valid before "
                       f"{_when(leaf.not_valid_before_utc)}")
    ca_pem = None
    if files.ca_certs:
        ca_pem = _read_pem(files.ca_certs, "--ca-certs")
        try:
            x509.load_pem_x509_certificates(ca_pem.encode())
        except ValueError:
            raise TLSError(f"--ca-certs {files.ca_certs}: no PEM certificate in it") from None
    # Sent as parsed, not as read: nothing else the files hold (another key,
    # a key in the certificate file) travels to the workers.
    pem = serialization.Encoding.PEM
    material = Material(
        files, "".join(cert.public_bytes(pem).decode("ascii") for cert in chain),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()).decode("ascii"),
        ca_pem, leaf.subject.rfc4514_string(), leaf.not_valid_after_utc)
    # What the workers will do with it, done once here: OpenSSL must take it.
    try:
        server_context(material.message(0))
    except TLSError as exc:
        raise TLSError(f"--certfile {files.certfile}: {exc}") from None
    return material


def _read_pem(path: str, flag: str) -> str:
    try:
        # Non-blocking: a FIFO put in the file's place must not hang fdserver.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise TLSError(f"{flag} {path}: cannot read it: "
                       f"{(exc.strerror or str(exc)).lower()}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TLSError(f"{flag} {path}: not a regular file")
        data = os.read(fd, MAX_PEM + 1)
    except OSError as exc:
        raise TLSError(f"{flag} {path}: cannot read it: "
                       f"{(exc.strerror or str(exc)).lower()}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_PEM:
        raise TLSError(f"{flag} {path}: larger than {MAX_PEM // 1024} KB; not a PEM file")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise TLSError(f"{flag} {path}: not a PEM file (binary content; DER is not "
                       "supported)") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def check_names(files: TLSFiles | None, listener_names: list[str],
                requested: list[str]) -> None:
    """A TLS listener needs a certificate, and a certificate a TLS listener."""
    names = set(listener_names)
    if files is None:
        if requested:
            raise TLSError(f"--tls-listener {requested[0]} needs --certfile and --keyfile")
        if DEFAULT_LISTENER in names:
            raise TLSError(f"the listener named {DEFAULT_LISTENER!r} serves TLS and needs "
                           "--certfile and --keyfile (or give it another name)")
        return
    for name in requested:
        if name not in names:
            raise TLSError(f"--tls-listener {name}: no listener has that name (listeners: "
                           f"{', '.join(sorted(names)) or 'none'})")
    if not files.listeners & names:
        raise TLSError(f"--certfile {files.certfile} given, but no listener serves TLS: "
                       f"name one {DEFAULT_LISTENER} (--bind {DEFAULT_LISTENER}=HOST:PORT) "
                       "or pass --tls-listener NAME")


def ciphers_ok(ciphers: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ciphers)
    except ssl.SSLError:
        raise TLSError(f"--ciphers {ciphers}: OpenSSL knows no cipher by that "
                       "description") from None

