"""The PROXY protocol (v1 and v2): the client's address, sent by a balancer
ahead of the connection's own bytes (HAProxy's ``send-proxy``/``send-proxy-v2``).

Only on listeners marked for it (``fdserver --proxy-protocol NAME``): there
the header is required, so a client that reaches the listener directly
cannot pass a forged one through as HTTP, and without one the connection is
closed.  Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt

v1, one text line of at most 107 bytes::

    PROXY TCP4 <src ip> <dst ip> <src port> <dst port>\\r\\n
    PROXY TCP6 <src ip> <dst ip> <src port> <dst port>\\r\\n
    PROXY UNKNOWN[ anything]\\r\\n            (the connection's own address stands)

v2, binary::

    offset  size  field
    0       12    signature  \\r\\n\\r\\n\\0\\r\\nQUIT\\n
    12      1     version 2 (high 4 bits), command: 0 LOCAL, 1 PROXY
    13      1     family: 0x11 TCP over IPv4, 0x21 TCP over IPv6, 0x00 unspecified
                  (others, UDP or Unix: the connection's own address stands)
    14      2     length of what follows, big-endian, at most MAX_V2_BODY here
    16      12    IPv4: source, destination address, source, destination port
            36    IPv6: the same, 16-byte addresses
    ...           TLVs (type 1 byte, length 2 bytes, value): checked to fit, skipped

LOCAL (HAProxy's own health checks) keeps the connection's own address.

:func:`parse` is the parser (bytes in, no sockets).  :func:`read_header`
reads exactly the header off a connected socket and nothing more, so what
follows (HTTP, or a TLS handshake) is left in the socket for whoever takes
the connection next; it gives up after a deadline (a slowloris header).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from dataclasses import dataclass

from .errors import FdserverError

V1_PREFIX = b"PROXY "
V1_MAX = 107                 # the spec's longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = struct.Struct("!12sBBH")
# HAProxy sends 12 or 36 bytes of addresses and a few TLVs (ALPN, authority,
# unique id, SSL details); far more than that is no balancer.
MAX_V2_BODY = 2048
DEFAULT_TIMEOUT = 5.0        # HAProxy sends the header with its first bytes


class ProxyProtocolError(FdserverError):
    """A header that is not a PROXY protocol header, or one that breaks it."""


@dataclass(frozen=True)
class ProxyHeader:
    version: int
    length: int                              # bytes the header takes on the wire
    source: tuple[str, int] | None = None    # None: keep the connection's own address
    destination: tuple[str, int] | None = None


def parse(data: bytes) -> ProxyHeader | int:
    """The header at the start of *data*, or how many bytes it may take in all.

    An int means *data* is a valid beginning: read more, up to that many
    bytes in all (v1: the most a line may take; v2: exactly the header).
    Raises ProxyProtocolError as soon as *data* cannot begin a header.
    """
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    if not data:
        return V1_MAX
    raise ProxyProtocolError(f"no PROXY protocol header: starts with {bytes(data[:8])!r}")


def _parse_v1(data: bytes) -> ProxyHeader | int:
    if data[:len(V1_PREFIX)] != V1_PREFIX[:len(data)]:
        raise ProxyProtocolError(f"no PROXY protocol header: starts with {bytes(data[:8])!r}")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError(f"PROXY v1 line longer than {V1_MAX} bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyProtocolError("PROXY v1 line has a stray CR or LF")
        return V1_MAX
    line = data[len(V1_PREFIX):end]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 line is not ASCII") from None
    words = text.split(" ")
    if words[0] == "UNKNOWN":
        return ProxyHeader(1, end + 2)
    if len(words) != 5 or words[0] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"PROXY v1 line is malformed: {text[:60]!r}")
    family = socket.AF_INET if words[0] == "TCP4" else socket.AF_INET6
    source = _address(family, words[1], words[3])
    destination = _address(family, words[2], words[4])
    return ProxyHeader(1, end + 2, source, destination)


def _address(family: socket.AddressFamily, host: str, port: str) -> tuple[str, int]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ProxyProtocolError(f"PROXY v1 address {host[:50]!r} is not an IP") from None
    if (ip.version == 4) != (family == socket.AF_INET):
        raise ProxyProtocolError(f"PROXY v1 address {host[:50]!r} is not {family.name}")
    if not (port.isdigit() and port.isascii() and len(port) <= 5 and int(port) <= 65535
            and (port == "0" or not port.startswith("0"))):
        raise ProxyProtocolError(f"PROXY v1 port {port[:10]!r} is not a port number")
    return str(ip), int(port)


def _parse_v2(data: bytes) -> ProxyHeader | int:
    if data[:len(V2_SIGNATURE)] != V2_SIGNATURE[:len(data)]:
        raise ProxyProtocolError("no PROXY protocol header: bad v2 signature")
    if len(data) < V2_HEADER.size:
        return V2_HEADER.size
    version_command: int
    family: int
    length: int
    _, version_command, family, length = V2_HEADER.unpack_from(data)
    if version_command >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2 header of version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyProtocolError(f"PROXY v2 header with unknown command {command}")
    if length > MAX_V2_BODY:
        raise ProxyProtocolError(f"PROXY v2 header of {length} bytes (at most {MAX_V2_BODY} "
                                 "here)")
    total = V2_HEADER.size + length
    if len(data) < total:
        return total
    body = data[V2_HEADER.size:total]
    if command == 0:                         # LOCAL: the balancer's own connection
        return ProxyHeader(2, total)
    if family == 0x11:
        size, fam = 12, socket.AF_INET
    elif family == 0x21:
        size, fam = 36, socket.AF_INET6
    elif family >> 4 in (0, 1, 2, 3) and family & 0x0F in (0, 1, 2):
        _tlvs(body, 0 if family >> 4 == 0 else {1: 12, 2: 36, 3: 216}[family >> 4])
        return ProxyHeader(2, total)         # unspecified, UDP, Unix: no TCP address
    else:
        raise ProxyProtocolError(f"PROXY v2 header with unknown family 0x{family:02x}")
    if length < size:
        raise ProxyProtocolError(f"PROXY v2 {fam.name} header of {length} bytes (at least "
                                 f"{size})")
    half = (size - 4) // 2
    src = socket.inet_ntop(fam, body[:half])
    dst = socket.inet_ntop(fam, body[half:2 * half])
    sport, dport = struct.unpack_from("!HH", body, 2 * half)
    _tlvs(body, size)
    return ProxyHeader(2, total, (src, sport), (dst, dport))


def _tlvs(body: bytes, start: int) -> None:
    """Check that the TLVs after the addresses fill the header exactly."""
    if start > len(body):
        raise ProxyProtocolError("PROXY v2 header shorter than its addresses")
    at = start
    while at < len(body):
        if at + 3 > len(body):
            raise ProxyProtocolError("PROXY v2 header ends inside a TLV")
        (size,) = struct.unpack_from("!H", body, at + 1)
        at += 3 + size
        if at > len(body):
            raise ProxyProtocolError("PROXY v2 TLV runs past the header")


async def read_header(sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> ProxyHeader:
    """Read the PROXY header off *sock* (non-blocking), and not a byte more.

    Raises ProxyProtocolError for a bad header, a connection that ends
    before its header does, or a header not complete within *timeout*.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    got = b""
    limit = V1_MAX
    while True:
        try:
            # Peek: bytes after the header must stay in the socket.
            chunk = sock.recv(limit - len(got), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            await _readable(loop, sock, deadline, len(got))
            continue
        except OSError as exc:
            raise ProxyProtocolError(f"connection failed before its PROXY header: "
                                     f"{exc.strerror or exc}") from None
        if not chunk:
            raise ProxyProtocolError(f"connection closed after {len(got)} bytes of a "
                                     "PROXY header")
        result = parse(got + chunk)
        if isinstance(result, ProxyHeader):
            take = result.length - len(got)
            if sock.recv(take) != chunk[:take]:       # in the socket already: all of it
                raise ProxyProtocolError("connection changed under its PROXY header")
            return result
        # All of it belongs to the header: take it, so that the socket is
        # readable again only when more arrives.
        sock.recv(len(chunk))
        got += chunk
        limit = result


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket, deadline: float,
                    got: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)
    loop.add_reader(fd, wake)
    try:
        await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
    except TimeoutError:
        raise ProxyProtocolError(f"no complete PROXY header in time ({got} bytes)") from None
    finally:
        loop.remove_reader(fd)
