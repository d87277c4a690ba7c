"""The pieces behind a balancer: PROXY protocol, trusted X-Forwarded-For, the
agent-check and the host's drain, each against real processes and sockets."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess

import pytest

from fdserver.agent import Capacity, reply
from fdserver.forwarded import TrustedProxies
from fdserver.proxyproto import (
    MAX_V2_BODY,
    V1_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    parse,
)

from support import free_port, run, script, wait_until


def v2(command: int = 1, family: int = 0x11, body: bytes | None = None,
       length: int | None = None) -> bytes:
    if body is None:
        body = (socket.inet_aton("10.1.2.3") + socket.inet_aton("10.0.0.1")
                + struct.pack("!HH", 4321, 80))
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", size) + body


V6_BODY = (socket.inet_pton(socket.AF_INET6, "2001:db8::7") + socket.inet_pton(
    socket.AF_INET6, "::1") + struct.pack("!HH", 5555, 443))


@pytest.mark.parametrize("data, expected", [
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 80\r\nGET", ProxyHeader(1, 36, ("1.2.3.4", 1111),
                                                              ("5.6.7.8", 80))),
    (b"PROXY TCP6 2001:db8::1 ::1 65535 8080\r\n", ProxyHeader(1, 39, ("2001:db8::1", 65535),
                                                             ("::1", 8080))),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, 15)),
    (b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n", ProxyHeader(1, 31)),
    (v2(), ProxyHeader(2, 28, ("10.1.2.3", 4321), ("10.0.0.1", 80))),
    (v2(family=0x21, body=V6_BODY), ProxyHeader(2, 52, ("2001:db8::7", 5555), ("::1", 443))),
    (v2(command=0, family=0, body=b""), ProxyHeader(2, 16)),          # LOCAL: health check
    (v2(body=v2()[16:] + b"\x04\x00\x02ab"), ProxyHeader(2, 33, ("10.1.2.3", 4321),
                                                         ("10.0.0.1", 80))),   # a TLV
    (v2(family=0x31, body=bytes(216)), ProxyHeader(2, 232)),          # Unix: no address
    # Beginnings: read more, up to this many bytes in all.
    (b"", V1_MAX), (b"PRO", V1_MAX), (b"PROXY TCP4 1.2.3.4", V1_MAX),
    (V2_SIGNATURE[:5], 16), (v2()[:20], 28),
])
def test_proxy_headers_parse(data, expected):
    assert parse(data) == expected


@pytest.mark.parametrize("data, why", [
    (b"GET / HTTP/1.1\r\n", "no PROXY protocol header"),
    (b"\x16\x03\x01\x02\x00", "no PROXY protocol header"),               # TLS hello
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 80\n", "stray CR or LF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1111\r\n", "malformed"),
    (b"PROXY TCP4  1.2.3.4 5.6.7.8 1111 80\r\n", "malformed"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1111 80\r\n", "malformed"),
    (b"PROXY TCP4 1.2.3.400 5.6.7.8 1111 80\r\n", "not an IP"),
    (b"PROXY TCP4 ::1 5.6.7.8 1111 80\r\n", "not AF_INET"),
    (b"PROXY TCP6 1.2.3.4 ::1 1111 80\r\n", "not AF_INET6"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 80\r\n", "not a port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 0080 80\r\n", "not a port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 80\r\n", "not a port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 80\r\n", "not ASCII"),
    (b"PROXY " + b"x" * 120, "longer than 107"),
    (V2_SIGNATURE[:11] + b"X", "bad v2 signature"),
    (V2_SIGNATURE + b"\x11\x11\x00\x0c", "version 1"),
    (V2_SIGNATURE + b"\x22\x11\x00\x0c", "unknown command 2"),
    (v2(length=MAX_V2_BODY + 1, body=b""), "at most 2048"),
    (v2(length=0xFFFF, body=b""), "at most 2048"),
    (v2(family=0x11, body=bytes(8)), "at least 12"),
    (v2(family=0x51), "unknown family"),
    (v2(body=v2()[16:] + b"\x04\x00"), "ends inside a TLV"),
    (v2(body=v2()[16:] + b"\x04\x00\x09ab"), "runs past the header"),
])
def test_hostile_proxy_headers_are_refused(data, why):
    with pytest.raises(ProxyProtocolError, match=why):
        parse(data)


def exchange(address: str, data: bytes, source: str | None = None,
             timeout: float = 10.0) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(timeout)
        if source:
            sock.bind((source, 0))
        sock.connect((host, int(port)))
        try:
            sock.sendall(data)
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        except ConnectionResetError:
            return answer + b"<reset>"
    return answer


def body(answer: bytes) -> bytes:
    assert answer.startswith(b"HTTP/1.1 200"), answer
    return answer.split(b"\r\n\r\n", 1)[1]


GET_IP = b"GET /ip HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("mode", ["shared", "dispatch"])
def test_proxy_listener_takes_the_headers_address_and_refuses_the_rest(
        start_fdserver, start_fdapp, mode):
    server = start_fdserver("--proxy-protocol", "pp",
                            *(["--dispatch"] if mode == "dispatch" else []),
                            binds=("pp=127.0.0.1:0", "plain=127.0.0.1:0"))
    worker = start_fdapp(server)
    pp, plain = (listener["address"] for listener in server.status()["listeners"])
    assert [listener.get("proxy") for listener in server.status()["listeners"]] == [True, None]
    v1 = b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 80\r\n"
    assert body(exchange(pp, v1 + GET_IP)) == b"198.51.100.7 http\n"
    assert body(exchange(pp, v2() + GET_IP)) == b"10.1.2.3 http\n"
    assert body(exchange(pp, v2(family=0x21, body=V6_BODY) + GET_IP)) == b"2001:db8::7 http\n"
    # HAProxy's health check (LOCAL): the connection's own address.
    assert body(exchange(pp, v2(command=0, family=0, body=b"") + GET_IP)) == b"127.0.0.1 http\n"
    # The header split over several packets, the request in the same one as its end.
    with socket.socket() as sock:
        sock.settimeout(10)
        host, port = pp.rsplit(":", 1)
        sock.connect((host, int(port)))
        for piece in (v1[:3], v1[3:20], v1[20:-1], v1[-1:] + GET_IP):
            sock.sendall(piece)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert body(answer) == b"198.51.100.7 http\n"
    # A plain listener takes no header: a client cannot spoof through it.
    assert exchange(plain, v1 + GET_IP).startswith(b"HTTP/1.1 400")
    # Hostile peers on the PROXY listener: closed, no answer, no traceback.
    for hostile in (GET_IP, b"PROXY garbage\r\n" + GET_IP, b"\x16\x03\x01\x00\x05hello",
                    v2(length=0xFFFF, body=b"") + bytes(100), b"PROXY " + b"9" * 200):
        answer = exchange(pp, hostile)
        assert answer in (b"", b"<reset>"), (hostile, answer)
    assert "Traceback" not in worker.output
    if mode == "dispatch":
        return              # the same path from here on; the deadline costs 5 s
    # Half a header, then nothing: closed at the deadline, serving goes on meanwhile.
    with socket.socket() as stalled:
        host, port = pp.rsplit(":", 1)
        stalled.connect((host, int(port)))
        stalled.sendall(b"PROXY TCP4 1.2.")
        assert body(exchange(pp, v1 + GET_IP)) == b"198.51.100.7 http\n"
        stalled.settimeout(15)
        assert stalled.recv(100) == b""
    worker.wait_for_line(r"closed a connection from 127\.0\.0\.1: no complete PROXY header "
                         r"in time \(15 bytes\)")
    assert "Traceback" not in worker.output


def test_bad_proxy_headers_are_logged_at_a_bounded_rate(start_fdserver, start_fdapp):
    server = start_fdserver("--proxy-protocol", "http")
    worker = start_fdapp(server)
    for _ in range(40):
        exchange(server.address, b"GET / HTTP/1.0\r\n\r\n")
    assert body(exchange(server.address, v2() + GET_IP)) == b"10.1.2.3 http\n"
    assert worker.output.count("closed a connection from") == 10


def test_an_old_worker_is_refused_a_proxy_listener(start_fdserver):
    from fdserver.client import register
    from fdserver.errors import FdserverError

    server = start_fdserver("--proxy-protocol", "http")
    with pytest.raises(FdserverError, match="does not read the PROXY protocol header "
                                            "listener http needs"):
        register(server.socket, features=("share",))
    # Nor resumed after an fdserver restart: it would then count ready.
    from fdserver.client import connect
    with pytest.raises(FdserverError, match="does not read the PROXY protocol header "
                                            "listener http needs"):
        connect(server.socket, "worker", resume={"state": "ready"}, features=["share"])


def test_forwarded_for_is_believed_from_listed_proxies_only(start_fdserver, start_fdapp):
    server = start_fdserver(binds=("0.0.0.0:0",))
    port = server.address.rsplit(":", 1)[1]
    start_fdapp(server, "--forwarded-allow-ips", "127.0.0.2, 10.0.0.0/8")
    forged = (b"GET /ip HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9, 10.3.3.3\r\n"
              b"X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n")
    # From a listed proxy: the last address that is not a listed proxy.
    assert body(exchange(f"127.0.0.1:{port}", forged, source="127.0.0.2")) == \
        b"203.0.113.9 https\n"
    # From anyone else: ignored.
    assert body(exchange(f"127.0.0.1:{port}", forged, source="127.0.0.5")) == \
        b"127.0.0.5 http\n"


def test_xheaders_alone_trusts_loopback_only(start_fdserver, start_fdapp):
    server = start_fdserver(binds=("0.0.0.0:0",))
    port = server.address.rsplit(":", 1)[1]
    start_fdapp(server, "--xheaders")
    forged = b"GET /ip HTTP/1.1\r\nHost: x\r\nX-Real-Ip: 203.0.113.9\r\nConnection: close\r\n\r\n"
    assert body(exchange(f"127.0.0.1:{port}", forged, source="127.0.0.1")) == \
        b"203.0.113.9 http\n"
    assert body(exchange(f"127.0.0.1:{port}", forged, source="127.0.0.3")) == \
        b"127.0.0.3 http\n"


def test_trusted_proxies_parse():
    proxies = TrustedProxies.parse("10.0.0.0/8,::1, 192.168.1.5")
    assert "10.200.1.1" in proxies and "::1" in proxies and "192.168.1.5" in proxies
    assert "::ffff:10.0.0.1" in proxies
    assert "192.168.1.6" not in proxies and "garbage" not in proxies and None not in proxies
    assert "8.8.8.8" in TrustedProxies.parse("*")


@pytest.mark.parametrize("argv, message", [
    (["--forwarded-allow-ips", "10.0.0.300"],
     "fdapp: error: --forwarded-allow-ips: '10.0.0.300' is not an IP address or network"),
    (["--forwarded-allow-ips", ","], "fdapp: error: --forwarded-allow-ips: give IPs"),
])
def test_bad_forwarded_allow_ips(argv, message):
    result = run([script("fdapp"), "app:make_app", "--socket", "/nonexistent", *argv])
    assert result.returncode == 1 and result.stderr.startswith(message), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["--bind", "127.0.0.1:0", "--proxy-protocol", "nope"],
     "fdserver: error: --proxy-protocol nope: no listener is called nope (--bind nope="),
    (["--bind", "127.0.0.1:0", "--agent", "localhost:1"],
     "fdserver: error: --agent localhost:1: 'localhost' is not a numeric IP address"),
    (["--bind", "127.0.0.1:0", "--agent", "x=127.0.0.1:1"],
     "fdserver: error: --agent x=127.0.0.1:1: expected HOST:PORT"),
    (["--bind", "127.0.0.1:0", "--agent", "127.0.0.1:0", "--agent-capacity", "0"],
     "fdserver: error: --agent-capacity 0: at least 1"),
    (["--bind", "127.0.0.1:0", "--drain-file", "/tmp/d"],
     "fdserver: error: --drain-file /tmp/d needs --agent"),
])
def test_bad_fleet_flags(sockdir, argv, message):
    result = run([script("fdserver"), "--socket", str(sockdir / "s"), *argv])
    assert result.returncode == 1 and result.stderr.startswith(message), result.stderr


# -- the agent -------------------------------------------------------------------

def test_agent_replies():
    assert reply(4, 4, False) == "up ready 100%"
    assert reply(3, 4, False) == "up ready 75%"
    assert reply(2, 4, False) == "up ready 50%"
    assert reply(5, 4, False) == "up ready 100%"
    assert reply(1, 300, False) == "up ready 1%"      # never 0%: that is a drain
    assert reply(0, 4, False) == "down"
    assert reply(4, 4, True) == "drain"
    assert reply(0, 4, True) == "drain"


def test_capacity_is_the_recent_peak_and_a_rolling_restart_keeps_it():
    now = [0.0]
    capacity = Capacity(window=60.0, clock=lambda: now[0])
    for ready in (1, 2, 3, 4):
        capacity.observe(ready)
    assert capacity.value() == 4
    # A rolling restart: 3 ready while each replacement starts, 4 between.
    for _ in range(20):
        now[0] += 20.0
        capacity.observe(3)
        now[0] += 20.0
        capacity.observe(4)
        assert capacity.value() == 4
    # Scaled down to 2 for good: 50% for a window, then 100%.
    capacity.observe(2)
    now[0] += 59.0
    assert capacity.value() == 4
    now[0] += 2.0
    assert capacity.value() == 2
    assert Capacity(fixed=8).value() == 8


def agent_says(address: str) -> str:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        answer = b""
        while chunk := sock.recv(100):
            answer += chunk
    assert answer.endswith(b"\n") and answer.count(b"\n") == 1, answer
    return answer.decode().strip()


def free_agent_address() -> str:
    return f"127.0.0.1:{free_port()}"


def test_agent_follows_workers_drain_and_shutdown(start_fdserver, start_fdapp, sockdir):
    agent = free_agent_address()
    server = start_fdserver("--agent", agent, "--agent-linger", "30")
    assert agent_says(agent) == "down"
    workers = [start_fdapp(server) for _ in range(4)]
    assert agent_says(agent) == "up ready 100%"
    for worker in workers[:2]:
        worker.signal(15)
        server.wait_state(worker.pid, "gone")
    assert agent_says(agent) == "up ready 50%"
    workers.append(start_fdapp(server))
    assert agent_says(agent) == "up ready 75%"

    ctl = [script("fdctl"), "--socket", server.socket]
    result = run([*ctl, "drain"])
    assert result.returncode == 0 and result.stdout == \
        "drained: the agent answers 'drain' until fdctl undrain\n", result
    assert agent_says(agent) == "drain"
    status = run([*ctl, "status"]).stdout
    assert f"agent    {agent}, capacity 4, DRAINED (fdctl undrain puts it back)" in status
    assert server.status()["server"]["drained"] is True
    # The drain survives an fdserver restart.
    server.signal(9)
    server.wait()
    server = start_fdserver("--agent", agent, "--agent-linger", "30", binds=(server.address,))
    assert agent_says(agent) == "drain"
    assert run([*ctl, "undrain"]).stdout == \
        "undrained: the agent answers with the host's ready capacity again\n"
    # The workers re-registered with the new fdserver; its capacity is theirs.
    wait_until(lambda: agent_says(agent) == "up ready 100%", what="agent at 100%")
    # Shutting down: "drain" during the linger, then no answer at all.
    server.signal(15)
    server.wait_for_line(r"SIGTERM: the agent answers 'drain' for 30s")
    assert agent_says(agent) == "drain"
    server.signal(15)                # a second one cuts the linger short
    assert server.wait() == 0
    with pytest.raises(ConnectionRefusedError):
        agent_says(agent)


def test_drain_wait_returns_once_the_balancer_was_told(start_fdserver, start_fdapp):
    agent = free_agent_address()
    server = start_fdserver("--agent", agent)
    start_fdapp(server)
    ctl = [script("fdctl"), "--socket", server.socket]
    # Nobody asked yet: nothing to wait for.
    result = run([*ctl, "drain", "--wait", "5"])
    assert result.stdout == "drained; no balancer asked the agent in the last minute\n"
    run([*ctl, "undrain"])
    assert agent_says(agent) == "up ready 100%"
    # A balancer asked: the wait ends when it asks again and hears "drain".
    waiting = subprocess.Popen([*ctl, "drain", "--wait", "20"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: server.status()["server"]["drained"], what="drained")
        assert waiting.poll() is None
        assert agent_says(agent) == "drain"
        out, err = waiting.communicate(timeout=10)
    finally:
        waiting.kill()
    assert (waiting.returncode, out) == (0, "drained; told 127.0.0.1\n"), err
    # Nobody asks again within the wait: it says so and fails.
    run([*ctl, "undrain"])
    result = run([*ctl, "drain", "--wait", "0.5"])
    assert result.returncode == 1 and result.stderr == \
        "fdctl: error: after 0.5s, not told yet: 127.0.0.1 (told: none); the host stays " \
        "drained until fdctl undrain\n", result.stderr
    assert server.status()["server"]["drained"]


def test_drain_needs_an_agent(start_fdserver):
    server = start_fdserver()
    result = run([script("fdctl"), "--socket", server.socket, "drain"])
    assert result.returncode == 1 and "fdserver runs without --agent" in result.stderr
    assert "drained" not in server.status()["server"]


def test_hostile_agent_clients_cost_nothing(start_fdserver, start_fdapp):
    agent = free_agent_address()
    server = start_fdserver("--agent", agent)
    start_fdapp(server)
    host, port = agent.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port))) for _ in range(200)]
    try:
        # Flooders that send and never read, then one that resets at once.
        for sock in idle[:50]:
            sock.sendall(b"x" * 4096)
        reset = socket.create_connection((host, int(port)))
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.close()
        assert agent_says(agent) == "up ready 100%"
        assert server.status()["workers"][0]["state"] == "ready"
        # Every idle one got its answer and is closed within the linger.
        for sock in idle[50:]:
            sock.settimeout(10)
            assert sock.recv(100) == b"up ready 100%\n"
            assert sock.recv(100) == b""
    finally:
        for sock in idle:
            sock.close()
    assert "Traceback" not in server.output


def test_a_stuck_worker_is_missing_capacity(start_fdserver, start_fdapp):
    agent = free_agent_address()
    server = start_fdserver("--agent", agent)
    workers = [start_fdapp(server, wait=False) for _ in range(4)]
    for worker in workers:
        server.wait_state(worker.pid, "ready")
    assert agent_says(agent) == "up ready 100%"
    workers[0].signal(signal.SIGSTOP)
    try:
        # Once its heartbeats are late (3 s), the agent counts it out.
        wait_until(lambda: agent_says(agent) == "up ready 75%", what="75% with one stuck")
        assert [w["state"] for w in server.status()["workers"]].count("unresponsive") == 1
        assert server.status()["server"]["capacity"] == 4
    finally:
        workers[0].signal(signal.SIGCONT)
    wait_until(lambda: agent_says(agent) == "up ready 100%", what="100% once it runs again")


def test_the_drain_lasts_in_the_drain_file(start_fdserver, tmp_path_factory):
    agent = free_agent_address()
    state = tmp_path_factory.mktemp("state")
    flags = ("--agent", agent, "--agent-linger", "0", "--drain-file", str(state / "drained"))
    server = start_fdserver(*flags)
    assert run([script("fdctl"), "--socket", server.socket, "drain"]).returncode == 0
    assert (state / "drained").read_text() == "drained\n"
    assert not os.path.exists(server.socket + ".drained")
    # systemctl stop, or a reboot: the socket's folder is gone, the state is not.
    server.signal(15)
    assert server.wait() == 0
    server = start_fdserver(*flags, dir=tmp_path_factory.mktemp("run"))
    assert agent_says(agent) == "drain"
    assert run([script("fdctl"), "--socket", server.socket, "undrain"]).returncode == 0
    assert (state / "drained").read_text() == ""
    assert agent_says(agent) == "down"          # no worker here


def test_an_unsafe_drain_file_is_refused(sockdir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("d")
    precious = folder / "precious"
    precious.write_text("keep\n")
    mode = os.stat(precious).st_mode
    os.symlink(precious, folder / "link")
    os.link(precious, folder / "hardlink")
    os.mkfifo(folder / "fifo")
    (folder / "theirs").write_text("")
    os.chown(folder / "theirs", 65534, 65534)
    (folder / "open").mkdir()
    os.chmod(folder / "open", 0o777)
    # A root-owned folder inside one that another user owns: they could
    # swap it for a link to any folder (and have root write there).
    (folder / "users").mkdir()
    (folder / "users" / "state").mkdir()
    os.chown(folder / "users", 65534, 65534)
    cases = {
        "link": "is a symbolic link; refusing to follow it",
        "hardlink": "has other names (hard links); refusing to use it",
        "fifo": "is not a regular file; refusing to use it",
        "theirs": "belongs to uid 65534, neither root nor fdserver's user; refusing",
        "missing/drained": f"folder {folder}/missing: no such file or directory",
        "open/drained": (f"folder {folder}/open is writable by users other than its owner "
                         "(mode 0777)"),
        "users/state/drained": (f"{folder}/users belongs to user nobody (uid 65534), who "
                                f"could replace {folder}/users/state"),
    }
    for name, why in cases.items():
        path = folder / name
        result = run([script("fdserver"), "--socket", str(sockdir / "s"), "--bind",
                      "127.0.0.1:0", "--agent", "127.0.0.1:0", "--drain-file", str(path)])
        assert result.returncode == 1 and result.stderr.strip().splitlines() == [
            f"fdserver: error: --drain-file {path}: {result.stderr.split(': ', 3)[-1].strip()}"
        ], (name, result.stderr)
        assert why in result.stderr, (name, result.stderr)
        assert not (sockdir / "s").exists()
    assert precious.read_text() == "keep\n" and os.stat(precious).st_mode == mode
    assert os.stat(folder / "theirs").st_uid == 65534 and not os.listdir(folder / "open")


def test_agent_address_in_use_is_one_line(sockdir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        agent = f"127.0.0.1:{taken.getsockname()[1]}"
        result = run([script("fdserver"), "--socket", str(sockdir / "s"), "--bind",
                      "127.0.0.1:0", "--agent", agent])
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"fdserver: error: --agent {agent}: cannot bind: address already in use (another "
        "fdserver's --agent, or another program, on it?)"], result.stderr
