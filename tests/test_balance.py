"""Shared-mode balance and dispatch mode: correctness, with counts not timings."""

from __future__ import annotations

import fcntl
import http.client
import os
import signal
import socket
import struct
import termios

import pytest

from fdserver.rebalancing import shed_plan

from loadclient import LoadClient
from support import http_get, replace_by_hand, wait_until
from test_recovery import answered_by, free_port


def jain(values: list[int]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def start_fdapps(start_fdapp, server, count: int) -> list:
    """*count* fdapps started at once (each imports the app in parallel), once all are ready."""
    workers = [start_fdapp(server, wait=False) for _ in range(count)]
    for worker in workers:
        server.wait_state(worker.pid, "ready", 90)      # 64 on 2 busy cores: ~10-20 s
    return workers


def close_registration(registration) -> None:
    """Close a raw fdserver.register() result: its listeners and its channel."""
    for sock in registration.sockets():
        sock.close()
    registration.channel.close()


def served(report: dict, workers) -> list[int]:
    return [report["pids"].get(str(w.pid), 0) for w in workers]


@pytest.mark.parametrize("mode", ["keepalive", "close"])
def test_shared_mode_spreads_a_burst_over_every_worker(start_fdserver, start_fdapp, mode):
    server = start_fdserver()
    workers = [start_fdapp(server) for _ in range(4)]
    with LoadClient(server.address, clients=32, mode=mode) as load:
        load.wait_started()
        wait_until(lambda: sum(w["connections"] for w in server.status()["workers"]) > 0,
                   what="load reports reaching fdserver")
        report = load.stop()
    counts = served(report, workers)
    assert report["failed"] == 0, report["failures"]
    # Generous bounds (the benchmark measures the real spread): every worker
    # took part, and nobody took the lion's share.
    assert min(counts) > 0 and jain(counts) > 0.8, counts


def test_status_shows_mode_and_connections(start_fdserver, start_fdapp):
    server = start_fdserver("--dispatch")
    worker = start_fdapp(server)
    conn = http.client.HTTPConnection(*server.address.rsplit(":", 1), timeout=10)
    conn.request("GET", "/")
    assert conn.getresponse().read() == f"Hello from {worker.pid}\n".encode()
    wait_until(lambda: server.status()["workers"][0]["connections"] == 1,
               what="the open keep-alive connection counted")
    assert server.status()["server"]["mode"] == "dispatch"
    conn.close()
    wait_until(lambda: server.status()["workers"][0]["connections"] == 0,
               what="the closed connection uncounted")


@pytest.mark.parametrize("flags", [(), ("--dispatch",)])
def test_fdserver_schedules_itself_as_batch_and_leaves_the_workers_alone(
        start_fdserver, start_fdapp, flags):
    server = start_fdserver(*flags)
    worker = start_fdapp(server)
    assert os.sched_getscheduler(server.pid) == os.SCHED_BATCH
    assert os.sched_getscheduler(worker.pid) == os.SCHED_OTHER   # the app's own choice
    assert http_get(server.address) == (200, f"Hello from {worker.pid}\n")


@pytest.mark.parametrize("mode", ["keepalive", "close"])
def test_dispatch_mode_balances_and_restarts_lose_nothing(start_fdserver, start_fdapp, mode):
    server = start_fdserver("--dispatch")
    workers = [start_fdapp(server) for _ in range(3)]
    with LoadClient(server.address, clients=12, mode=mode) as load:
        load.wait_started()
        # A draining worker is released: nothing more is sent to it.
        replace_by_hand(workers, lambda: start_fdapp(server), 6)
        report = load.stop()
    assert report["failed"] == 0, report["failures"]
    assert len(report["pids"]) >= 6


def test_dispatch_without_ready_worker_waits_then_503(start_fdserver, start_fdapp):
    server = start_fdserver("--dispatch", "--dispatch-timeout", "0.5")
    status, body = get_status(server.address)
    assert (status, body) == (503, "no app process is ready\n")
    server.wait_for_line(r"no ready worker: answered 1 waiting connections with 503")


def test_dispatch_connection_waits_for_a_worker(start_fdserver, start_fdapp):
    server = start_fdserver("--dispatch", "--dispatch-timeout", "60")
    host, port = server.address.rsplit(":", 1)
    early = socket.create_connection((host, int(port)), timeout=30)
    early.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    worker = start_fdapp(server)
    response = http.client.HTTPResponse(early)
    response.begin()
    assert (response.status, response.read()) == (200, f"Hello from {worker.pid}\n".encode())
    early.close()


def test_dispatch_mode_survives_fdserver_sigkill(start_fdserver, start_fdapp):
    port = free_port()
    first = start_fdserver("--dispatch", binds=(f"127.0.0.1:{port}",))
    old = start_fdapp(first)
    first.signal(signal.SIGKILL)
    first.wait()
    second = start_fdserver("--dispatch", binds=(f"127.0.0.1:{port}",))
    second.wait_for_line(rf"took back http on 127.0.0.1:{port} from worker pid {old.pid}")
    second.wait_state(old.pid, "ready")
    new = start_fdapp(second)
    answered_by(second.address, new.pid)
    answered_by(second.address, old.pid)


def get_status(address: str) -> tuple[int, str]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_plain_add_sockets_worker_gets_no_dispatched_connections(start_fdserver, start_fdapp):
    """A worker that did not opt in to dispatch is never sent connections."""
    import fdserver

    server = start_fdserver("--dispatch")
    plain = fdserver.register(server.socket)          # features: none
    try:
        plain.report("ready")
        server.wait_state(os.getpid(), "ready")
        worker = start_fdapp(server)
        for _ in range(20):
            assert http_get(server.address) == (200, f"Hello from {worker.pid}\n")
        plain.channel.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            plain.channel.receive_some()              # nothing was sent to it
    finally:
        close_registration(plain)


def test_workers_follow_a_restarted_fdserver_into_the_other_mode(start_fdserver, start_fdapp):
    port = free_port()
    first = start_fdserver("--dispatch", binds=(f"127.0.0.1:{port}",))
    worker = start_fdapp(first)
    for _ in range(50):                  # a history of dispatched connections
        assert http_get(first.address) == (200, f"Hello from {worker.pid}\n")
    first.signal(signal.SIGKILL)
    first.wait()
    second = start_fdserver(binds=(f"127.0.0.1:{port}",))          # shared mode now
    second.wait_state(worker.pid, "ready")
    worker.wait_for_line(r"fdserver now runs in shared mode; switching")
    assert http_get(second.address) == (200, f"Hello from {worker.pid}\n")
    second.signal(signal.SIGKILL)
    second.wait()
    third = start_fdserver("--dispatch", binds=(f"127.0.0.1:{port}",))
    third.wait_state(worker.pid, "ready")
    newcomer = start_fdapp(third)
    # The old worker's lifetime count must not skew the new fdserver's choice.
    answered_by(third.address, newcomer.pid)
    answered_by(third.address, worker.pid)
    assert all(w["connections"] >= 0 for w in third.status()["workers"])


def next_share(registration) -> tuple[int, int]:
    """The next share message on a raw registration's channel (blocking, with a deadline)."""
    registration.channel.sock.settimeout(10)
    while True:
        message, fds = registration.channel.receive()
        for fd in fds:
            os.close(fd)
        if message["type"] == "share":
            return message["connections"], message["workers"]


def test_a_worker_gets_its_share_as_soon_as_it_is_ready(start_fdserver):
    """Even when one worker leaving and one arriving leave the totals as they were.

    A ready worker without a share accepts without holding back, so a burst
    arriving then would all go to it.
    """
    import fdserver

    server = start_fdserver()
    first = fdserver.register(server.socket, features=("share",))
    second = fdserver.register(server.socket, features=("share",))
    try:
        first.report("ready")
        assert next_share(first) == (0, 1)
        # Back to back: within one coalescing delay, and 0 open on 1 ready worker again.
        first.report("draining")
        second.report("ready")
        assert next_share(second) == (0, 1)
    finally:
        close_registration(first)
        close_registration(second)


@pytest.mark.parametrize("reader_holds_one", [False, True])
def test_dispatch_places_by_open_connections_then_passes_over_a_busy_worker(
        start_fdserver, reader_holds_one):
    """Of two workers, one reads what it is sent and one never does (busy).
    Neither reports: each counts what it was sent, and they take turns, so
    that the counts stay even (idle-first would send all but one to the
    reader).  With the reader reporting one open connection throughout, the
    two are even after the stuck one's first, and then the busy one is
    passed over ("join the idle queue", the tie-breaker)."""
    import fdserver

    server = start_fdserver("--dispatch")
    reader = fdserver.register(server.socket, features=("dispatch",))
    stuck = fdserver.register(server.socket, features=("dispatch",))
    clients: list[socket.socket] = []
    taken = 0                                   # connections the reader received
    try:
        reader.report("ready")
        stuck.report("ready")
        wait_until(lambda: [w["state"] for w in server.status()["workers"]] == ["ready"] * 2,
                   10, "two ready workers")
        host, port = server.address.rsplit(":", 1)
        reader.channel.sock.settimeout(0.01)

        def reader_reports_one_open() -> None:
            # Whatever it received, the reader holds one connection: as many
            # as the stuck one once that has its first.
            if not reader_holds_one:
                return
            reader.channel.send({"type": "load", "connections": 1, "received": taken})
            wait_until(lambda: server.status()["workers"][0]["connections"] == 1, 10,
                       "the reader's report counted")

        def passed_on(waiting: int) -> bool:
            nonlocal taken
            got = take_connections(reader)
            taken += got
            return bool(got) or unread_bytes(stuck) > waiting

        reader_reports_one_open()
        for _ in range(8):
            waiting = unread_bytes(stuck)
            clients.append(socket.create_connection((host, int(port)), timeout=10))
            wait_until(lambda waiting=waiting: passed_on(waiting), 10, "the connection passed on")
            reader_reports_one_open()
        stuck.channel.sock.settimeout(0.01)
        parked = sum(iter(lambda: take_connections(stuck), 0))
        # Holding one, the reader has more until the stuck one has its
        # first; then the two are even and the stuck one is busy.
        assert (parked, taken) == ((1, 7) if reader_holds_one else (4, 4)), (parked, taken)
    finally:
        for client in clients:
            client.close()
        close_registration(reader)
        close_registration(stuck)


def open_per_worker(server, workers, total: int, timeout: float) -> list[int]:
    """Each worker's open connections, as fdserver counts them, once they add up to *total*."""
    def counts() -> list[int] | None:
        found = {w["pid"]: w["connections"] for w in server.status()["workers"]}
        got = [found.get(w.pid, 0) for w in workers]
        return got if sum(got) == total else None

    return wait_until(counts, timeout, f"{total} open connections counted")


def test_dispatch_keeps_open_connections_even_after_a_burst(start_fdserver, start_fdapp):
    """8 workers, 64 keep-alive connections opened at once, each doing
    requests: the open connections per worker differ by at most one."""
    server = start_fdserver("--dispatch")
    workers = start_fdapps(start_fdapp, server, 8)
    with LoadClient(server.address, clients=64, mode="keepalive") as load:
        load.wait_started()
        held = open_per_worker(server, workers, 64, 20)
        report = load.stop()
    assert report["failed"] == 0, report["failures"]
    assert max(held) - min(held) <= 1, held


def test_64_workers_each_take_part_of_a_keepalive_burst(start_fdserver, start_fdapp):
    """Shared mode, more workers than CPUs by far: 256 keep-alive connections
    opened at once leave no worker without one (the burst counts in the share,
    and a worker at its share steps aside until the others had the CPU)."""
    server = start_fdserver()
    workers = start_fdapps(start_fdapp, server, 64)
    with LoadClient(server.address, clients=256, mode="keepalive") as load:
        load.wait_started()
        held = open_per_worker(server, workers, 256, 30)
        report = load.stop()
    counts_served = served(report, workers)
    assert report["failed"] == 0, report["failures"]
    assert min(held) > 0, sorted(held)
    assert min(counts_served) > 0, sorted(counts_served)


def test_dispatch_tells_each_connection_its_own_family(start_fdserver):
    """IPv4 and IPv6 listeners under one name: each connection passed on says
    the family its descriptor really has."""
    import fdserver

    server = start_fdserver("--dispatch", binds=("127.0.0.1:0", "[::1]:0"))
    worker = fdserver.register(server.socket, features=("dispatch",))
    try:
        worker.report("ready")
        wait_until(lambda: [w["state"] for w in server.status()["workers"]] == ["ready"],
                   10, "a ready worker")
        worker.channel.sock.settimeout(10)
        listeners = server.status()["listeners"]
        assert [(one["name"], one["family"]) for one in listeners] == [("http", "AF_INET"),
                                                                  ("http", "AF_INET6")]
        for listener in listeners:
            host, port = listener["address"].rsplit(":", 1)
            with socket.create_connection((host.strip("[]"), int(port)), timeout=10):
                message, fds = worker.channel.receive()
                conns = [socket.socket(fileno=fd) for fd in fds]
                families = [conn.family.name for conn in conns]
                for conn in conns:
                    conn.close()
                assert (message["type"], message["family"], families) == \
                    ("connections", listener["family"], [listener["family"]])
    finally:
        close_registration(worker)


def test_dispatch_places_again_what_a_vanished_worker_never_got(start_fdserver):
    """Connections fdserver still holds for a worker (its socket is full) go to
    another worker when that one disappears, instead of being closed."""
    import fdserver

    server = start_fdserver("--dispatch")
    stuck = fdserver.register(server.socket, features=("dispatch",))
    reader = fdserver.register(server.socket, features=("dispatch",))
    clients: list[socket.socket] = []
    try:
        stuck.report("ready")
        host, port = server.address.rsplit(":", 1)
        with server.control() as ctl:
            def dispatched() -> int:
                return sum(w["connections"] for w in ctl.status()["workers"])

            wait_until(lambda: [w["state"] for w in ctl.status()["workers"]]
                       == ["ready", "starting"], 10, "the stuck worker ready")
            # The only ready worker never reads: once its socket is full,
            # fdserver queues what follows.  Three in a row that add nothing
            # to its socket are in fdserver's queue.
            queued, before = 0, unread_bytes(stuck)
            while queued < 3:
                assert len(clients) < 5000, "the stuck worker's socket never filled"
                clients.append(socket.create_connection((host, int(port)), timeout=10))
                wait_until(lambda: dispatched() == len(clients), 10, "the connection dispatched")
                after = unread_bytes(stuck)
                queued = queued + 1 if after == before else 0
                before = after
            reader.report("ready")
            wait_until(lambda: [w["state"] for w in ctl.status()["workers"]]
                       == ["ready", "ready"], 10, "the reader ready")
        close_registration(stuck)
        reader.channel.sock.settimeout(0.05)
        taken = 0

        def all_taken() -> bool:
            nonlocal taken
            taken += take_connections(reader)
            return taken >= queued

        wait_until(all_taken, 10, f"the {queued} queued connections sent to the other worker")
        assert taken == queued
    finally:
        for client in clients:
            client.close()
        close_registration(stuck)
        close_registration(reader)


def take_connections(registration) -> int:
    """Read one message, if one comes; close the connections in it and count them."""
    try:
        _, fds = registration.channel.receive()
    except TimeoutError:
        return 0
    for fd in fds:
        os.close(fd)
    return len(fds)


def unread_bytes(registration) -> int:
    """Bytes waiting in a registration's socket (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(registration.channel.sock.fileno(),
                                          termios.FIONREAD, bytes(4)))[0]


# -- keep-alive connections shed by the most loaded workers ---------------------

@pytest.mark.parametrize("counts, plan", [
    ([2, 2, 2, 2], []),                         # even
    ([1, 2, 2, 1], []),                         # one apart: as even as it gets
    ([0, 2, 3, 3], [(2, 1), (3, 1)]),           # after a rolling restart: both 3s give one
    ([8, 0], [(0, 4)]),                         # all on one of two: half of it moves
    ([0, 2, 2, 2, 2], [(1, 1)]),                # the mean is 1.6: one 2 gives one
    ([0, 0, 2], [(2, 1)]),
    ([9, 0, 0, 0, 5], [(0, 6)]),                # no more in all than the others lack
    ([5], []),
    ([], []),
])
def test_shed_plan_asks_the_most_loaded_for_no_more_than_the_others_lack(counts, plan):
    assert shed_plan(counts) == plan


def test_shedding_as_planned_evens_out_any_counts():
    """Whatever the counts, shedding as planned (each shed connection going to
    the least loaded) never asks a worker for more than it has, and evens the
    counts out to one apart in a few rounds."""
    import random
    rng = random.Random(17)
    for _ in range(2000):
        counts = [rng.randrange(0, 12) for _ in range(rng.randrange(2, 9))]
        for _round in range(20):
            plan = shed_plan(counts)
            if not plan:
                break
            for i, n in plan:
                assert 0 < n <= counts[i]
                counts[i] -= n
                for _ in range(n):
                    counts[counts.index(min(counts))] += 1
        assert max(counts) - min(counts) <= 1, counts


@pytest.mark.parametrize("flags", [(), ("--dispatch",)])
def test_keepalive_load_is_even_again_after_a_rolling_restart(start_fdserver, start_fdapp,
                                                              flags):
    """Keep-alive clients stay with their worker: the drained worker's clients
    reconnect to the others while its replacement starts, so after a rolling
    restart the last replacement held none (two workers: one served all).
    fdserver asks the most loaded to shed; no request fails."""
    server = start_fdserver(*flags)
    workers = [start_fdapp(server) for _ in range(4)]
    with LoadClient(server.address, clients=8, mode="keepalive") as load:
        load.wait_started()
        replace_by_hand(workers, lambda: start_fdapp(server), 4)

        seen: list[list[int]] = []

        def even() -> list[int] | None:
            found = {w["pid"]: w["connections"] for w in server.status()["workers"]}
            seen.append([found.get(w.pid, 0) for w in workers])
            held = seen[-1]
            # Dispatch places each reconnection on the fewest; in shared mode
            # any worker under its share plus one may take it.
            slack = 1 if flags else 2
            return held if sum(held) == 8 and max(held) - min(held) <= slack else None

        try:
            held = wait_until(even, 20, "8 keep-alive connections spread over every worker")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the last counts: {seen[-3:]}") from None
        report = load.stop()
    assert report["failed"] == 0, report["failures"]
    assert min(held) >= 1 and (max(held) == 2 or not flags), held
    assert report["reconnects"].get("connection_close", 0) >= 4   # each drain, then sheds


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_a_shed_connection_ends_cleanly_after_a_response(start_fdserver, start_fdapp,
                                                         version):
    """Four keep-alive connections on one worker, then a second worker: the
    first answers some of them "close" (HTTP/1.0: no Keep-Alive) and closes
    after that response; every other response keeps its connection (the
    next request on it is answered), and it never ends them all."""
    server = start_fdserver("--dispatch")      # places the four on the only worker
    first = start_fdapp(server)
    host, port = server.address.rsplit(":", 1)
    conns = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]
    files = [conn.makefile("rb") for conn in conns]
    request = (f"GET / {version}\r\nHost: x\r\nConnection: keep-alive\r\n\r\n").encode()

    def exchange(i: int) -> bool:
        """One request on connection i; whether the server ended it after the answer."""
        conns[i].sendall(request)
        status = files[i].readline()
        assert status.startswith(b"HTTP/1.1 200 "), status     # Tornado's answer to either
        headers = {}
        while (line := files[i].readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        assert files[i].read(int(headers["content-length"])) == f"Hello from {first.pid}\n".encode()
        closing = (headers.get("connection") == "close" if version == "HTTP/1.1"
                   else headers.get("connection") != "keep-alive")
        if closing:
            assert files[i].read(1) == b"", "the server promised to close"
        return closing

    try:
        for i in range(4):
            assert not exchange(i)
        start_fdapp(server)
        open_ones = set(range(4))

        def some_closed() -> bool:
            for i in sorted(open_ones):
                if exchange(i):
                    open_ones.discard(i)
            return len(open_ones) < 4

        wait_until(some_closed, 20, "the first worker shedding a connection")
        # Nobody reconnects, so the load stays uneven and later sheds may end
        # more (down to one); each still announces it, as exchange() checks.
        for i in sorted(open_ones):
            if exchange(i):
                open_ones.discard(i)
        assert open_ones, "the worker ended every connection"
    finally:
        for conn in conns:
            conn.close()


def next_message(registration, kind: str) -> dict:
    """The next message of *kind* on a raw registration's channel, and what came before it."""
    registration.channel.sock.settimeout(10)
    seen = []
    while True:
        message, fds = registration.channel.receive()
        for fd in fds:
            os.close(fd)
        if message["type"] == kind:
            return {"message": message, "before": seen}
        seen.append(message["type"])


def unread_messages(server, registration) -> list[str]:
    """The types of the messages fdserver sent a raw registration so far,
    unread: after a status round trip, what it sent before is all there."""
    server.status()
    kinds = []
    registration.channel.sock.settimeout(0)
    try:
        while True:
            try:
                message, fds = registration.channel.receive()
            except BlockingIOError:
                break
            for fd in fds:
                os.close(fd)
            kinds.append(message["type"])
    finally:
        registration.channel.sock.settimeout(10)
    return kinds


@pytest.mark.parametrize("flags", [(), ("--dispatch",)])
def test_only_a_worker_that_reads_shed_is_asked_to(start_fdserver, flags):
    """Two workers report 10 open connections, one 0: the one with the "shed"
    feature is asked for its part; the other, which would not understand
    (an older fdapp, or --no-balance), is left alone."""
    import fdserver

    server = start_fdserver(*flags)
    sheds = fdserver.register(server.socket, features=("share", "dispatch", "shed"))
    older = fdserver.register(server.socket, features=("share", "dispatch"))
    empty = fdserver.register(server.socket, features=("share", "dispatch", "shed"))
    try:
        for registration, load in ((sheds, 10), (older, 10), (empty, 0)):
            registration.report("ready")
            registration.channel.send({"type": "load", "connections": load, "received": 0})
        got = next_message(sheds, "shed")["message"]
        # 20 over 3 workers: the mean rounds up to 7, and the empty one lacks 6.
        assert got == {"type": "shed", "connections": 3}
        # The other one over the mean was in the same checks: nothing for it.
        assert "shed" not in unread_messages(server, older)
        assert "shed" not in unread_messages(server, empty)
    finally:
        for registration in (sheds, older, empty):
            close_registration(registration)


def test_a_worker_with_no_balance_does_not_offer_to_shed():
    from fdserver.runner import features

    assert "shed" in features()
    assert "shed" not in features(balance=False)
    assert set(features()) - set(features(balance=False)) == {"shed"}


def registered(server, *features: str):
    import fdserver

    return fdserver.register(server.socket, features=("share", "dispatch", *features))


def beat(registration, requests: int) -> None:
    registration.channel.send({"type": "heartbeat", "lag": 0.0, "requests": requests})


def test_a_stuck_worker_counts_for_nothing_in_the_plan(start_fdserver):
    """Workers with 10, 0 and 8 open connections, the empty one stuck (its
    heartbeats stopped): only 10 and 8 count, so the first sheds 1 (were the
    stuck one counted, 4 for it to never take)."""
    server = start_fdserver("--dispatch")
    full = registered(server, "shed")
    stuck = registered(server, "heartbeat")
    other = registered(server, "shed")
    try:
        for registration in (full, stuck, other):
            registration.report("ready")
        beat(stuck, 0)
        wait_until(lambda: any(w["state"] == "unresponsive" for w in server.status()["workers"]),
                   10, "the worker that stopped beating counted unresponsive")
        for registration, load in ((full, 10), (stuck, 0), (other, 8)):
            registration.channel.send({"type": "load", "connections": load, "received": 0})
        assert next_message(full, "shed")["message"]["connections"] == 1
    finally:
        for registration in (full, stuck, other):
            close_registration(registration)


def test_a_worker_holding_more_but_serving_less_is_not_asked(start_fdserver):
    """10 open connections each on two workers, one serving requests, the
    other not (idle keep-alive connections, websockets): only the busy one is
    asked; moving the other's few active clients would unbalance what counts."""
    server = start_fdserver()
    busy = registered(server, "shed", "heartbeat")
    holder = registered(server, "shed", "heartbeat")
    empty = registered(server, "shed", "heartbeat")
    try:
        for registration, load, requests in ((busy, 10, 1000), (holder, 10, 0), (empty, 0, 0)):
            registration.report("ready")
            beat(registration, 0)
            beat(registration, requests)        # its rate: over the two beats
            registration.channel.send({"type": "load", "connections": load, "received": 0})
        assert next_message(busy, "shed")["message"]["connections"] == 3
        assert "shed" not in unread_messages(server, holder)
    finally:
        for registration in (busy, holder, empty):
            close_registration(registration)
