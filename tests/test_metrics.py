"""fdserver --metrics: exact counts across rolling restarts, /health, hostile workers."""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fdserver.client import register
from fdserver.protocol import DURATION_BUCKETS
from fdserver.transport import Channel

from loadclient import LoadClient
from support import http_get, replace_by_hand, run, script, tuple_of, wait_until


def start_with_metrics(start_fdserver, *extra: str, metrics: str = "127.0.0.1:0"):
    server = start_fdserver("--metrics", metrics, *extra)
    server.metrics = server.wait_for_line(r"metrics on http://(\S+)/metrics").group(1)
    return server


def fetch(address: str, path: str, method: str = "GET") -> tuple[int, str, dict]:
    conn = http.client.HTTPConnection(address, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read().decode(), dict(response.getheaders())
    finally:
        conn.close()


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    status, body, headers = fetch(server.metrics, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain"), (status, body)
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(value for (sample, have), value in samples.items() if sample == name
               and all((k, v) in have for k, v in labels.items()))


def sample(samples: dict, name: str, **labels: str) -> float:
    """Like total(), but the sample must be there: a missing metric is a failure, not 0."""
    found = [value for (have_name, have), value in samples.items() if have_name == name
             and all((k, v) in have for k, v in labels.items())]
    assert found, f"no sample {name}{labels or ''} in {sorted({n for n, _ in samples})}"
    return sum(found)


def test_every_response_counted_once_across_a_rolling_restart(start_fdserver, start_fdapp):
    server = start_with_metrics(start_fdserver)
    workers = [start_fdapp(server) for _ in range(3)]
    first = list(workers)
    before = scrape(server)
    with LoadClient(server.address, clients=4, mode="keepalive") as keepalive, \
            LoadClient(server.address, clients=4, mode="close") as close:
        keepalive.wait_started()
        close.wait_started()
        replace_by_hand(workers, lambda: start_fdapp(server), 3)    # every worker, once
        reports = [keepalive.stop(), close.stop()]
    for report in reports:
        assert report["failed"] == 0, report["failures"]
    sent = sum(report["ok"] for report in reports)
    assert sent > 100, reports
    # The replacements drain too: then every report is in, none is pending.
    for worker in workers:
        worker.signal(15)
    for worker in first + workers:
        assert worker.wait() == 0, worker.output
        server.wait_state(worker.pid, "gone")      # fdserver has read all it sent
    after = scrape(server)
    grown = (total(after, "fdserver_http_requests_total")
             - total(before, "fdserver_http_requests_total"))
    assert grown == sent, (grown, sent)
    assert total(after, "fdserver_http_requests_total", code="200", method="GET",
                 listener="http") == grown
    count = (total(after, "fdserver_http_request_duration_seconds_count")
             - total(before, "fdserver_http_request_duration_seconds_count"))
    assert count == sent
    assert total(after, "fdserver_http_request_duration_seconds_bucket", le="+Inf") == count
    assert total(after, "fdserver_worker_starts_total") == 6
    assert total(after, "fdserver_worker_exits_total", state="draining") == 6
    assert total(after, "fdserver_drain_duration_seconds_count") == 6
    assert total(after, "fdserver_workers") == 0
    assert fetch(server.metrics, "/health")[0] == 503


def test_health_families_and_status(start_fdserver, start_fdapp):
    server = start_with_metrics(start_fdserver)
    status, body, _ = fetch(server.metrics, "/health")
    assert (status, body) == (503, "no ready worker\n")
    worker = start_fdapp(server)
    assert fetch(server.metrics, "/health")[:2] == (200, "ok: 1 ready\n")
    for _ in range(3):
        assert http_get(server.address)[0] == 200
    for path, method, code in (("/nope", "GET", 404), ("/", "POST", 405), ("/", "HEAD", 405)):
        assert fetch(server.address, path, method)[0] == code
    samples = wait_until(lambda: (s := scrape(server)) and total(
        s, "fdserver_http_requests_total") == 6 and s, what="6 responses counted")
    assert total(samples, "fdserver_http_requests_total", code="200", method="GET") == 3
    assert total(samples, "fdserver_http_requests_total", code="404", method="GET") == 1
    assert total(samples, "fdserver_http_requests_total", code="405", method="POST") == 1
    assert total(samples, "fdserver_http_requests_total", code="405", method="HEAD") == 1
    assert total(samples, "fdserver_http_request_duration_seconds_count", listener="http") == 6
    bounds = [float(le) for (name, labels), _ in samples.items()
              if name == "fdserver_http_request_duration_seconds_bucket"
              for key, le in labels if key == "le" and le != "+Inf"]
    assert sorted(bounds) == list(DURATION_BUCKETS)
    assert total(samples, "fdserver_workers", state="ready") == 1
    assert total(samples, "fdserver_workers", state="starting") == 0
    assert sample(samples, "fdserver_open_connections") == 0
    assert sample(samples, "fdserver_listen_queue_length", listener="http",
                  address=server.address) == 0
    assert sample(samples, "fdserver_listen_queue_limit", listener="http") == 1024
    assert total(samples, "fdserver_worker_starts_total") == 1
    assert total(samples, "fdserver_registrations_refused_total") == 0
    # fdctl status: the request rate (once two heartbeats came) and the lag.
    wait_until(lambda: server.status()["workers"][0]["rate"] is not None, what="a rate")
    table = run([script("fdctl"), "--socket", server.socket, "status"]).stdout
    assert re.search(rf"^{worker.pid}\s+\d+\s+ready\s+\d+\s+\d+\.\d\s+\d+ms\s", table, re.M), table
    assert "REQ/S  LAG" in table

    # A hello fdserver refuses counts; so does the endpoint's bounds' worth of junk.
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(server.socket)
        channel = Channel(raw)
        channel.send({"type": "hello", "versions": [99], "role": "worker"})
        assert channel.receive()[0]["type"] == "error"
    assert fetch(server.metrics, "/other")[0] == 404
    assert fetch(server.metrics, "/metrics", "POST")[0] == 405
    with socket.create_connection(tuple_of(server.metrics)) as idle, \
            socket.create_connection(tuple_of(server.metrics)) as huge:
        huge.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
        assert huge.recv(100).startswith(b"HTTP/1.1 431 ")
        # An idle client holds a slot, not the loop.
        assert total(scrape(server), "fdserver_registrations_refused_total") == 1
        idle.sendall(b"GET /hea")
    worker.signal(15)
    assert worker.wait() == 0
    server.wait_state(worker.pid, "gone")
    samples = scrape(server)
    assert total(samples, "fdserver_worker_exits_total", state="draining") == 1
    assert total(samples, "fdserver_drain_duration_seconds_count") == 1
    assert fetch(server.metrics, "/health")[0] == 503


def test_idle_connections_cannot_keep_health_from_answering(start_fdserver, start_fdapp):
    # Anyone who can reach the endpoint could hold every slot with idle
    # connections, and a balancer would mark the host down.
    from fdserver.exposition import MAX_CLIENTS

    server = start_with_metrics(start_fdserver)
    start_fdapp(server)
    idle = [socket.create_connection(tuple_of(server.metrics)) for _ in range(MAX_CLIENTS + 8)]
    try:
        for _ in range(3):
            assert fetch(server.metrics, "/health")[:2] == (200, "ok: 1 ready\n")
    finally:
        for sock in idle:
            sock.close()


def test_a_flood_from_loopback_cannot_close_the_balancers_health_checks(start_fdserver,
                                                                        start_fdapp):
    # When every slot is taken, a newcomer closes a waiting connection of
    # the source holding the most, not the oldest of all: a balancer's
    # checks that connected before the flood still get their answers, though
    # a local user spreads the flood over many loopback addresses.
    from fdserver.exposition import MAX_CLIENTS

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))           # no packet is sent
        except OSError:
            pytest.skip("no IPv4 address but loopback to play the balancer from")
        balancer = probe.getsockname()[0]
    server = start_with_metrics(start_fdserver, metrics="0.0.0.0:0")
    start_fdapp(server)
    port = tuple_of(server.metrics)[1]
    # Blocking sockets: MSG_DONTWAIT then answers at once (with a timeout, a
    # Python socket waits that long for it).
    checks = [socket.create_connection((balancer, port)) for _ in range(2)]
    flood = [socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.1.{n}", 0))
             for n in range(1, MAX_CLIENTS + 41)]
    closed: set[socket.socket] = set()

    def all_made_room() -> bool:
        for sock in [*checks, *flood]:
            if sock in closed:
                continue
            try:
                if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    closed.add(sock)
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed.add(sock)
        return len(closed) == 42            # one closed for each newcomer past the slots

    try:
        wait_until(all_made_room, 15, "the flood to take every slot")
        assert not closed & set(checks), "a health check was closed to make room"
        for check in checks:
            check.settimeout(10)
            check.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert check.makefile("rb").readline() == b"HTTP/1.1 200 OK\r\n"
    finally:
        for sock in [*checks, *flood]:
            sock.close()


@pytest.mark.parametrize(("host", "source"), [
    ("192.0.2.7", "192.0.2.7"), ("::ffff:192.0.2.7", "192.0.2.7"),
    ("127.0.0.1", "loopback"), ("127.9.8.7", "loopback"), ("::1", "loopback"),
    ("::ffff:127.0.0.5", "loopback"), ("2001:db8:1:2:3::9", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
])
def test_a_source_is_what_one_party_can_spread_a_flood_over(host, source):
    from fdserver.exposition import source_of

    assert source_of(host) == source


def test_queue_connections_and_a_killed_worker(start_fdserver, start_fdapp):
    server = start_with_metrics(start_fdserver, "--unavailable-timeout", "60")
    # No worker: connections wait in the kernel's accept queue.
    clients = [socket.create_connection(tuple_of(server.address), timeout=10)
               for _ in range(5)]
    try:
        wait_until(lambda: sample(scrape(server), "fdserver_listen_queue_length",
                                  listener="http") == 5, what="5 queued")
        assert sample(scrape(server), "fdserver_open_connections") == 0
        worker = start_fdapp(server)
        # It takes them; each serves a request and stays open (keep-alive).
        for client in clients:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.recv(4096).startswith(b"HTTP/1.1 200 ")
        samples = wait_until(lambda: (s := scrape(server)) and sample(
            s, "fdserver_open_connections") == 5 and s, what="5 open connections")
        assert sample(samples, "fdserver_listen_queue_length", listener="http") == 0
        assert sample(samples, "fdserver_worker_lag_seconds_max") >= 0
        assert sample(samples, "fdserver_worker_exits_total", state="ready") == 0
    finally:
        for client in clients:
            client.close()
    worker.signal(9)
    server.wait_state(worker.pid, "gone")
    samples = scrape(server)
    assert sample(samples, "fdserver_worker_exits_total", state="ready") == 1
    assert sample(samples, "fdserver_worker_exits_total", state="draining") == 0
    assert sample(samples, "fdserver_open_connections") == 0


def test_dispatch_waits_counted(start_fdserver, start_fdapp):
    server = start_with_metrics(start_fdserver, "--dispatch")
    start_fdapp(server)
    for _ in range(5):
        assert http_get(server.address)[0] == 200
    samples = wait_until(lambda: (s := scrape(server)) and total(
        s, "fdserver_http_requests_total") == 5 and s, what="5 responses counted")
    assert total(samples, "fdserver_dispatch_wait_seconds_count") == 5
    assert total(samples, "fdserver_dispatch_expired_total") == 0


def hostile_reports():
    bucket = [0] * (len(DURATION_BUCKETS) + 1)
    return {
        "negative count": {"requests": [[200, "GET", "http", -1]], "durations": []},
        "bogus status": {"requests": [[999, "GET", "http", 1]], "durations": []},
        "bool status": {"requests": [[True, "GET", "http", 1]], "durations": []},
        "unknown method": {"requests": [[200, "BREW", "http", 1]], "durations": []},
        "unknown listener": {"requests": [[200, "GET", "x" * 1000, 1]], "durations": []},
        "short row": {"requests": [[200, "GET"]], "durations": []},
        "huge count": {"requests": [[200, "GET", "http", 10 ** 12]], "durations": []},
        "too many rows": {"requests": [[200, "GET", "http", 1]] * 2000, "durations": []},
        "short histogram": {"requests": [], "durations": [["http", [1], 0.1]]},
        "negative sum": {"requests": [], "durations": [["http", bucket, -1.0]]},
        "many histograms": {"requests": [], "durations": [["http", bucket, 0.0]] * 50},
    }


def test_hostile_worker_reports_are_refused_whole(start_fdserver):
    server = start_with_metrics(start_fdserver)
    good = register(server.socket, features=("metrics",))
    assert good.metrics
    counts = [0] * (len(DURATION_BUCKETS) + 1)
    counts[0] = 7
    good.channel.send({"type": "metrics", "requests": [[200, "GET", "http", 5],
                                                       [503, "other", "http", 2]],
                       "durations": [["http", counts, 0.25]]})
    samples = wait_until(lambda: (s := scrape(server)) and total(
        s, "fdserver_http_requests_total") == 7 and s, what="the good report")
    assert total(samples, "fdserver_http_requests_total", code="503", method="other") == 2
    assert total(samples, "fdserver_http_request_duration_seconds_sum") == 0.25
    for why, report in hostile_reports().items():
        hostile = register(server.socket, features=("metrics",))
        # A valid row first: a refused report counts none of its rows.
        report["requests"] = [[200, "GET", "http", 1], *report["requests"]]
        hostile.channel.send({"type": "metrics", **report})
        answer, _ = hostile.channel.receive()
        assert answer["type"] == "error" and "metrics report" in answer["message"], (why, answer)
        hostile.channel.close()
    # Not asked for: a worker without the feature.
    plain = register(server.socket)
    assert not plain.metrics
    plain.channel.send({"type": "metrics", "requests": [[200, "GET", "http", 1]],
                        "durations": []})
    assert plain.channel.receive()[0]["type"] == "error"
    samples = scrape(server)
    assert total(samples, "fdserver_http_requests_total") == 7
    assert total(samples, "fdserver_http_request_duration_seconds_count") == 7
    # A request count no float holds, in heartbeats: ignored, the status still answers.
    for n in (1, 2):
        good.channel.send({"type": "heartbeat", "lag": 0, "requests": n * 10 ** 400})
    wait_until(lambda: [w["rate"] for w in server.status()["workers"]] == [None],
               what="the status")
    good.channel.close()


def test_the_load_in_a_heartbeat_counts_and_a_bad_one_is_refused(start_fdserver):
    server = start_fdserver()
    worker = register(server.socket, features=("share",))
    assert worker.beat_load
    worker.channel.send({"type": "state", "state": "ready"})
    worker.channel.send({"type": "heartbeat", "lag": 0, "requests": 5, "connections": 3,
                         "received": 0})
    wait_until(lambda: [w["connections"] for w in server.status()["workers"]] == [3],
               what="the load from the heartbeat")
    for bad in ({"connections": True, "received": 0}, {"connections": 3},
                {"connections": "3", "received": 0}, {"connections": 10 ** 30, "received": 0}):
        hostile = register(server.socket)
        hostile.channel.send({"type": "heartbeat", "lag": 0, **bad})
        answer, _ = hostile.channel.receive()
        assert answer == {"type": "error", "message": "heartbeat message has a bad "
                          "'connections' or 'received'"}, bad
        hostile.channel.close()
    assert [w["connections"] for w in server.status()["workers"]] == [3]
    worker.channel.close()


def test_no_metrics_means_no_reports(start_fdserver):
    server = start_fdserver()
    registration = register(server.socket, features=("metrics",))
    assert not registration.metrics       # the welcome does not ask: fdapp installs no hook
    registration.channel.send({"type": "metrics", "requests": [], "durations": []})
    assert registration.channel.receive()[0]["type"] == "error"
    registration.channel.close()


# -- access log and logging configuration ----------------------------------------------

def test_access_log_text_and_json(start_fdserver, start_fdapp):
    server = start_fdserver()
    text = start_fdapp(server, "--access-log")
    with socket.create_connection(tuple_of(server.address)) as client:
        # A quote in the path is escaped: one request, one parseable line.
        client.sendall(b'GET /?q="a" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        assert client.recv(100).startswith(b"HTTP/1.1 200 ")
    line = text.wait_for_line(r'"GET /')
    expected = (rf'^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} {text.pid} http 127\.0\.0\.1 '
                r'"GET /\?q=\\"a\\"" 200 \d+ \d+\.\d{3}ms$')
    assert re.search(expected, line.string), line.string
    text.signal(15)
    assert text.wait() == 0
    as_json = start_fdapp(server, "--access-log", "--access-log-format", "json")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://{server.address}/missing", timeout=10)
    line = as_json.wait_for_line(r'^\{.*"path": "/missing"').string
    record = json.loads(line)
    assert record.pop("time").endswith("+00:00")
    assert record.pop("duration") >= 0
    assert record == {"pid": as_json.pid, "listener": "http", "client": "127.0.0.1",
                      "method": "GET", "path": "/missing", "status": 404,
                      "bytes": record["bytes"]}
    assert isinstance(record["bytes"], int) and record["bytes"] > 0
    # Tornado's own access line is replaced, not doubled.
    assert "tornado.access" not in as_json.output and " 404 GET " not in as_json.output


def wait_ready(server_socket: str, pid: int) -> None:
    from fdserver.ctl import Control
    with Control(server_socket) as control:
        assert control.wait(pid, "ready", 15)[0]


def test_log_config_and_level_on_both(procs, sockdir, tmp_path):
    as_json = tmp_path / "log.json"
    as_json.write_text(json.dumps({
        "version": 1, "formatters": {"f": {"format": "JSONCFG %(name)s %(message)s"}},
        "handlers": {"h": {"class": "logging.StreamHandler", "formatter": "f",
                           "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["h"], "level": "INFO"}}))
    as_ini = tmp_path / "log.ini"
    as_ini.write_text("[loggers]\nkeys=root\n[handlers]\nkeys=h\n[formatters]\nkeys=f\n"
                      "[logger_root]\nlevel=INFO\nhandlers=h\n"
                      "[handler_h]\nclass=StreamHandler\nformatter=f\nargs=(sys.stderr,)\n"
                      "[formatter_f]\nformat=INICFG %(name)s %(message)s\n")
    as_yaml = tmp_path / "log.yaml"
    as_yaml.write_text("version: 1\nformatters:\n  f: {format: 'YAMLCFG %(name)s %(message)s'}\n"
                       "handlers:\n  h: {class: logging.StreamHandler, formatter: f, "
                       "stream: 'ext://sys.stderr'}\nroot: {handlers: [h], level: INFO}\n")
    from_yaml = procs.start([script("fdserver"), "--socket", str(sockdir / "yaml.sock"),
                             "--bind", "127.0.0.1:0", "--log-config", str(as_yaml)])
    from_yaml.wait_for_line(r"^YAMLCFG fdserver serving http on ")
    path = str(sockdir / "fd.sock")
    server = procs.start([script("fdserver"), "--socket", path, "--bind", "127.0.0.1:0",
                          "--log-config", str(as_json)])
    server.wait_for_line(r"^JSONCFG fdserver serving http on ")
    app = procs.start([script("fdapp"), "app:make_app", "--socket", path,
                       "--log-config", str(as_ini), "--access-log"])
    app.wait_for_line(r"^INICFG fdapp pid \d+ ready: serving")
    # The access log keeps its own handler: the file did not name it.
    address = app.wait_for_line(r"serving http on (\S+)").group(1)
    http_get(address)
    app.wait_for_line(rf'^\S+ \S+ {app.pid} http 127\.0\.0\.1 "GET /" 200 ')
    # --log-level warning: the info lines are gone, on both programs.
    quiet_path = str(sockdir / "quiet.sock")
    quiet = procs.start([script("fdserver"), "--socket", quiet_path, "--bind", "127.0.0.1:0",
                         "--log-level", "WARNING"])
    wait_until(lambda: run([script("fdctl"), "--socket", quiet_path, "status"]).returncode == 0,
               what="the quiet fdserver")
    worker = procs.start([script("fdapp"), "app:make_app", "--socket", quiet_path,
                          "--log-level", "warning", "--log-config", str(as_json)])
    wait_ready(quiet_path, worker.pid)
    worker.signal(15)
    assert worker.wait() == 0
    quiet.signal(15)
    assert quiet.wait() == 0
    assert " INFO " not in quiet.output and "serving" not in quiet.output, quiet.output
    assert "JSONCFG" not in worker.output and "ready" not in worker.output, worker.output


@pytest.mark.parametrize("program", ["fdserver", "fdapp"])
def test_bad_log_config_is_one_line(program, tmp_path, sockdir):
    cases = {
        "missing.json": None,
        "bad.json": "{nope",
        "list.json": "[1, 2]",
        "unusable.json": json.dumps({"version": 1, "handlers": {"h": {"class": "no.Such"}}}),
        "bad.yaml": "a: [1,",
        "bad.ini": "not an ini file",
        "empty.ini": "[loggers]\nkeys=root\n",
    }
    base = ([script("fdserver"), "--socket", str(sockdir / "x.sock"), "--bind", "127.0.0.1:0"]
            if program == "fdserver"
            else [script("fdapp"), "app:make_app", "--socket", str(sockdir / "x.sock")])
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        result = run([*base, "--log-config", str(path)])
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, (name, result.stderr)
        assert lines[0].startswith(f"{program}: error: --log-config {path}: "), lines
    result = run([*base, "--log-level", "loud"])
    assert result.returncode == 2 and "'loud' is not one of debug" in result.stderr


def test_bad_metrics_address(start_fdserver, sockdir):
    busy = start_with_metrics(start_fdserver)
    for spec, says in (("nope", "expected HOST:PORT"),
                       ("127.0.0.1:99999", "port 99999 is out of range"),
                       ("name=127.0.0.1:1", "expected HOST:PORT"),
                       ("localhost:9100", "is not a numeric IP"),
                       (busy.metrics, "cannot bind: address already in use (another "
                                     "fdserver's --metrics, or another program, on it?)")):
        result = run([script("fdserver"), "--socket", str(sockdir / "bad.sock"),
                      "--bind", "127.0.0.1:0", "--metrics", spec])
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"fdserver: error: --metrics {spec}: {result.stderr.split(': ', 3)[-1].strip()}"]
        assert says in result.stderr and "Traceback" not in result.stderr



def test_a_peer_that_left_is_read_before_a_failed_write_closes_it():
    """A worker's last words (its last report) arrive even if fdserver's next
    write to it fails first because it has exited."""
    import asyncio

    from fdserver.protocol import encode
    from fdserver.transport import LoopChannel

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    events: list = []

    async def main() -> None:
        channel = LoopChannel(Channel(ours, server_side=True), asyncio.get_running_loop(),
                              lambda message, fds: events.append(message["type"]),
                              lambda reason: events.append(f"closed: {reason}"))
        theirs.sendall(encode({"type": "metrics", "requests": [], "durations": []}))
        theirs.close()
        # No loop pass in between: the write fails (EPIPE) before the read runs.
        channel.send({"type": "share", "connections": 0, "workers": 1})

    asyncio.run(main())
    assert events == ["metrics", "closed: write failed: Broken pipe"], events


@pytest.mark.parametrize("counted", [False, True], ids=["alone", "under-metrics"])
def test_tornados_access_lines_are_formatted_only_when_written(caplog, counted):
    """fdapp keeps Tornado's access log at WARNING: a 200 formats no line, a
    404 is still logged; a log_function and a subclass's log_request get
    every response, as in Tornado.  The same with the metrics hook on top
    (which runs the test itself), every response counted."""
    from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine
    from tornado.web import Application, RequestHandler

    from fdserver.requestlog import RequestLog
    from fdserver.requestlog import skip_unlogged_lines as skip_only

    logs: list[RequestLog] = []

    def skip_unlogged_lines(app) -> None:
        skip_only(app)
        if counted:
            logs.append(RequestLog([("http", "AF_INET", "127.0.0.1:80")]))
            logs[-1].counting = True
            assert logs[-1].install(app)

    class Handler(RequestHandler):
        summaries = 0

        def _request_summary(self) -> str:     # what Tornado formats its line with
            Handler.summaries += 1
            return super()._request_summary()

    class Connection:
        def set_close_callback(self, callback) -> None:
            pass

    def finished(app, status: int) -> None:
        request = HTTPServerRequest(connection=Connection(), headers=HTTPHeaders(Host="t"),
                                    start_line=RequestStartLine("GET", "/x", "HTTP/1.1"))
        handler = Handler(app, request)
        handler.set_status(status)
        app.log_request(handler)

    caplog.set_level(logging.WARNING, logger="tornado.access")
    app = Application()
    skip_unlogged_lines(app)
    finished(app, 200)
    assert Handler.summaries == 0 and not caplog.records
    finished(app, 404)
    assert Handler.summaries == 1
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "404 GET /x" in caplog.records[0].getMessage()

    seen = []
    app = Application(log_function=lambda handler: seen.append(handler.get_status()))
    skip_unlogged_lines(app)
    finished(app, 200)
    assert seen == [200]

    class Own(Application):
        def log_request(self, handler) -> None:
            seen.append(-handler.get_status())
    app = Own()
    skip_unlogged_lines(app)
    finished(app, 200)
    assert seen == [200, -200]
    if counted:
        assert [sum(row[3] for m in log.take_reports() for row in m["requests"])
                for log in logs] == [2, 1, 1]


def test_reports_sum_to_what_was_recorded_split_and_merged():
    """A worker's deltas: rows split over messages of at most MAX_ROWS, the
    histogram in the first; and held reports (no fdserver for a while) merged
    without losing a count."""
    from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine
    from tornado.web import Application, RequestHandler

    from fdserver import requestlog
    from fdserver.requestlog import MAX_ROWS, Reporter, RequestLog

    class Connection:
        def set_close_callback(self, callback) -> None:
            pass

    app = Application()
    log = RequestLog([("http", "AF_INET", "127.0.0.1:80")])
    log.counting = True
    recorded = 0
    for status in range(200, 200 + MAX_ROWS + 30):        # more rows than one message holds
        for _ in range(1 + status % 3):
            request = HTTPServerRequest(connection=Connection(), headers=HTTPHeaders(Host="t"),
                                        start_line=RequestStartLine("GET", "/", "HTTP/1.1"))
            handler = RequestHandler(app, request)
            handler.set_status(status, "x")
            log.record(handler)
            recorded += 1
    messages = log.take_reports()
    assert len(messages) == 2 and all(len(m["requests"]) <= MAX_ROWS for m in messages)
    assert sum(row[3] for m in messages for row in m["requests"]) == recorded
    (listener, counts, seconds), = messages[0]["durations"]
    assert listener == "http" and sum(counts) == recorded and seconds >= 0
    assert len(counts) == len(DURATION_BUCKETS) + 1 and messages[1]["durations"] == []
    assert log.take_reports() == []                       # deltas: nothing new since

    reporter = Reporter(log, lambda message: False, lambda delay, callback: None)
    reporter._held = messages * 40                         # 80 held: over the merge bound
    reporter.flush()
    merged = reporter._held
    assert sum(row[3] for m in merged for row in m["requests"]) == 40 * recorded
    assert sum(sum(m_counts) for m in merged for _, m_counts, _ in m["durations"]) \
        == 40 * recorded
    assert requestlog._merged(merged) == merged


def test_metrics_reports_go_on_the_whole_seconds_every_worker_shares():
    """Each report is due on the next whole second of the loop's clock, not a
    second after the last: every worker's arrive together."""
    from fdserver.requestlog import REPORT_INTERVAL, Reporter, RequestLog

    delays: list[float] = []
    now = [100.25]
    reporter = Reporter(RequestLog([]), lambda message: True,
                        lambda delay, callback: delays.append(delay), clock=lambda: now[0])
    reporter.start()
    now[0] = 101.0 + 0.125          # the tick ran late
    reporter._tick()
    now[0] = 102.0 - 0.0005         # and this one a moment early: the next is 103's
    reporter._tick()
    assert [round(d, 6) for d in delays] == [0.75, 0.875, 1.0005] and REPORT_INTERVAL == 1.0


def test_connections_asked_to_be_shed_are_counted(start_fdserver):
    """A worker holding 10 open connections next to an empty one is asked to
    shed 5 (docs/modes.md): the counter says 5."""
    from test_balance import close_registration, next_message, registered

    server = start_with_metrics(start_fdserver)
    full, empty = registered(server, "shed"), registered(server, "shed")
    try:
        for registration, load in ((full, 10), (empty, 0)):
            registration.report("ready")
            registration.channel.send({"type": "load", "connections": load, "received": 0})
        assert next_message(full, "shed")["message"]["connections"] == 5
        assert sample(scrape(server), "fdserver_shed_asked_connections_total") == 5
    finally:
        for registration in (full, empty):
            close_registration(registration)
