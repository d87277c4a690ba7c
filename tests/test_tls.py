"""HTTPS: fdserver reads the key, workers terminate TLS, renewal needs no restart.

Certificates are made with the openssl command; clients are Python's ssl
and curl.  The app's user is a real user that cannot read the key file.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
from pathlib import Path

import pytest

from loadclient import LoadClient
from support import (
    APP_USER,
    GROUP,
    OTHER_USER,
    PROJECT,
    http_get,
    replace_by_hand,
    run,
    script,
    wait_until,
)

TLS_GROUP = "fdtest-tls"        # may read the key; the app's user is not in it

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="real users need root")


def openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


class Site:
    """A certificate (with SANs for 127.0.0.1 and localhost) and its key."""

    def __init__(self, folder: Path, name: str, ca: Path, ca_key: Path, days: int = 30,
                 key: Path | None = None) -> None:
        self.cert = folder / f"{name}.crt"
        self.key = key or folder / f"{name}.key"
        self.subject = f"CN={name}.test"
        if key is None:
            openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-out", str(self.key))
        csr, ext = folder / f"{name}.csr", folder / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\n")
        openssl("req", "-new", "-key", str(self.key), "-subj", f"/CN={name}.test",
                "-out", str(csr))
        openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                "-CAcreateserial", "-days", str(days), "-extfile", str(ext),
                "-out", str(self.cert))


class Certificates:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca, ca_key = folder / "ca.crt", folder / "ca.key"
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-keyout", str(ca_key), "-out", str(self.ca), "-days", "30",
                "-subj", "/CN=fdtest CA")
        self.first = Site(folder, "first", self.ca, ca_key)
        self.renewed = Site(folder, "renewed", self.ca, ca_key)
        self.expired = Site(folder, "expired", self.ca, ca_key, days=-1)
        # A certificate whose key is not the one it will be served with.
        self.client = Site(folder, "client", self.ca, ca_key)
        for path in folder.iterdir():
            os.chmod(path, 0o600 if path.suffix == ".key" else 0o644)

    def live(self, site: Site, target: Path) -> tuple[Path, Path]:
        """Copy *site* to *target*/live.{crt,key}, as a deploy hook would."""
        cert, key = target / "live.crt", target / "live.key"
        for source, dest in ((site.cert, cert), (site.key, key)):
            shutil.copyfile(source, dest.with_suffix(".new"))
            os.replace(dest.with_suffix(".new"), dest)
        return cert, key


@pytest.fixture(scope="session")
def certs():
    folder = Path(tempfile.mkdtemp(prefix="fdtls-", dir="/tmp"))
    os.chmod(folder, 0o755)
    try:
        yield Certificates(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def live(certs, public_dir):
    """A folder with live.crt and live.key (the first site), as deployed."""
    folder = public_dir / "tls"
    folder.mkdir(mode=0o755)
    certs.live(certs.first, folder)
    return folder


@pytest.fixture(scope="session")
def tls_group():
    try:
        grp.getgrnam(TLS_GROUP)
        created = False
    except KeyError:
        subprocess.run(["groupadd", "--system", TLS_GROUP], check=True)
        created = True
    try:
        yield grp.getgrnam(TLS_GROUP).gr_gid
    finally:
        if created:
            subprocess.run(["groupdel", TLS_GROUP], check=False)


def fetch(address: str, ca: Path, path: str = "/", cert: Site | None = None,
          ) -> tuple[str, str, str | None]:
    """GET over a fresh TLS connection: (certificate subject, body, ALPN)."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF      # a close must send close_notify
    context.set_alpn_protocols(["http/1.1"])
    if cert:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    with socket.create_connection((host.strip("[]"), int(port)), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=host.strip("[]"),
                                suppress_ragged_eofs=False) as tls:
        subject = ",".join("=".join(pair) for rdn in tls.getpeercert()["subject"]
                           for pair in rdn).replace("commonName", "CN")
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                    .encode())
        data = b""
        while chunk := tls.recv(65536):     # a close without close_notify raises here
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        return subject, body.decode(), tls.selected_alpn_protocol()


def tls_address(server, name: str = "https") -> str:
    [listener] = [li for li in server.status()["listeners"] if li["name"] == name]
    return listener["address"]


def reload(server) -> subprocess.CompletedProcess:
    return run([script("fdctl"), "--socket", server.socket, "reload"])


def start_worker_as(procs, user: str, server):
    # setpriv execs fdapp, in the same process: one that exec'd is dumpable
    # again, as under supervisord or systemd (as_user.py's in-process setuid
    # would hide whether fdapp makes itself non-dumpable).
    proc = procs.start(["setpriv", f"--reuid={user}", f"--regid={GROUP}", "--clear-groups",
                        "--", script("fdapp"), "app:make_app",
                        "--socket", server.socket, "--connect-timeout", "5"])
    proc.wait_for_line(r"ready: serving")
    server.wait_state(proc.pid, "ready")
    return proc


@needs_root
def test_workers_serve_https_with_a_key_their_user_cannot_read(
        certs, live, users, deploy_user, tls_group, procs, start_fdserver, public_dir):
    # As deployed: the key root:ssl-cert 0640, fdserver in that group, the app not.
    os.chown(live / "live.key", 0, tls_group)
    os.chmod(live / "live.key", 0o640)
    assert run(["runuser", "-u", APP_USER, "--", "cat", str(live / "live.key")]).returncode != 0
    server = start_fdserver(
        "--user", "fdserver", "--group", TLS_GROUP, "--socket-group", GROUP,
        "--allow-group", GROUP, "--certfile", str(live / "live.crt"),
        "--keyfile", str(live / "live.key"),
        binds=("https=127.0.0.1:0", "http=127.0.0.1:0"), dir=public_dir)
    worker = start_worker_as(procs, APP_USER, server)
    https, http = tls_address(server), tls_address(server, "http")

    subject, body, alpn = fetch(https, certs.ca)
    assert (subject, body, alpn) == (certs.first.subject, f"Hello from {worker.pid}\n",
                                     "http/1.1")
    curl = run(["curl", "-sS", "--cacert", str(certs.ca), f"https://{https}/listener"])
    assert (curl.returncode, curl.stdout) == (0, "https https\n"), curl.stderr
    assert http_get(http, "/listener") == (200, "http http\n")
    # The key is in the worker's memory: no core dump, no ptrace by its user,
    # its /proc files root's.
    for pid in (worker.pid, server.pid):
        assert {os.stat(f"/proc/{pid}/{name}").st_uid for name in ("mem", "environ")} == {0}

    # Plain HTTP on the TLS port gets no HTTP answer.
    host, port = https.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        try:
            while chunk := plain.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass                # the handshake failed, and the worker closed with data unread
    assert not answer.startswith(b"HTTP"), answer

    status = run([script("fdctl"), "--socket", server.socket, "status"])
    assert re.search(r"https +AF_INET +127\.0\.0\.1:\d+ +CN=first\.test \((29|30) days left, "
                     r"until \d{4}-\d\d-\d\d\)", status.stdout), status.stdout
    assert re.search(r"http +AF_INET +127\.0\.0\.1:\d+ +-", status.stdout), status.stdout

    # A peer of the socket who is not root or fdserver's user may look, not reload.
    other = run(["setpriv", f"--reuid={OTHER_USER}", f"--regid={GROUP}", "--clear-groups",
                 script("fdctl"), "--socket", server.socket, "reload"])
    assert (other.returncode, other.stderr) == (1, (
        f"fdctl: error: fdserver at {server.socket} refused: reload is for root and "
        f"fdserver's own user; uid {users[OTHER_USER]} may ask for status only\n"))

    # Renewal, read by fdserver as its own user after the drop.
    certs.live(certs.renewed, live)
    result = reload(server)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"loaded CN=renewed\.test, expires \d{4}-\d\d-\d\d into 1 worker\(s\)\n",
                        result.stdout), result.stdout
    assert fetch(https, certs.ca)[0] == certs.renewed.subject

    # A renewal fdserver cannot read is refused; the certificate in service stays.
    os.chmod(live / "live.key", 0o600)
    result = reload(server)
    assert result.returncode == 1
    assert result.stderr == (f"fdctl: error: reload failed: --keyfile {live}/live.key: cannot "
                             f"read it: permission denied; still serving CN=renewed.test "
                             f"(expires {_expiry(result.stderr)})\n")
    assert fetch(https, certs.ca)[0] == certs.renewed.subject


def _expiry(text: str) -> str:
    return re.search(r"expires (\d{4}-\d\d-\d\d)", text).group(1)


def test_renewal_under_load_and_bad_renewals_keep_the_certificate(
        certs, live, start_fdserver, start_fdapp):
    server = start_fdserver("--certfile", str(live / "live.crt"),
                            "--keyfile", str(live / "live.key"), binds=("https=127.0.0.1:0",))
    workers = [start_fdapp(server) for _ in range(2)]
    https = tls_address(server)
    loads = [LoadClient(https, clients=4, mode=mode, tls_ca=certs.ca)
             for mode in ("keepalive", "close")]
    try:
        for load in loads:
            load.start().wait_started()
        certs.live(certs.renewed, live)
        result = reload(server)
        assert result.returncode == 0, result.stderr
        assert result.stdout.endswith("into 2 worker(s)\n"), result.stdout
        # Every worker said it took it before fdctl returned: every new handshake
        # from now on gets the new certificate.
        seen = [fetch(https, certs.ca) for _ in range(12)]
        assert {subject for subject, _, _ in seen} == {certs.renewed.subject}
        served = {int(body.split()[-1]) for _, body, _ in seen}
        assert served <= {w.pid for w in workers}

        for bad, why in (
                ((certs.client.cert, certs.renewed.key), "does not belong to the certificate"),
                ((certs.expired.cert, certs.expired.key), "the certificate expired on")):
            for source, dest in zip(bad, ("live.crt", "live.key"), strict=True):
                shutil.copyfile(source, live / dest)
            result = reload(server)
            assert result.returncode == 1 and why in result.stderr, result.stderr
            assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
            assert result.stderr.rstrip().endswith(
                f"still serving CN=renewed.test (expires {_expiry(result.stderr)})")
            assert fetch(https, certs.ca)[0] == certs.renewed.subject
        # SIGHUP does the same as fdctl reload.
        certs.live(certs.first, live)
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        server.wait_for_line(r"reload: loaded CN=first\.test.* into 2 worker\(s\)|"
                             r"reloaded .*CN=first\.test", start=mark)
        reports = [load.stop() for load in loads]
    finally:
        for load in loads:
            load.close()
    for report in reports:
        assert report["failed"] == 0, report["failures"]
        assert report["ok"] > 50, report


@pytest.mark.parametrize("mode,dispatch", [("keepalive", False), ("close", False),
                                           ("keepalive", True)])
def test_rolling_restart_under_tls_load_loses_nothing(certs, live, start_fdserver, start_fdapp,
                                                      mode, dispatch):
    server = start_fdserver("--certfile", str(live / "live.crt"),
                            "--keyfile", str(live / "live.key"),
                            *(["--dispatch"] if dispatch else []), binds=("https=127.0.0.1:0",))
    workers = [start_fdapp(server) for _ in range(2)]
    with LoadClient(tls_address(server), clients=8, mode=mode, tls_ca=certs.ca) as load:
        load.wait_started()
        replace_by_hand(workers, lambda: start_fdapp(server), times=4)
        report = load.stop()
    assert report["failed"] == 0, report["failures"]
    assert report["ok"] > 50, report


def test_a_drained_tls_connection_ends_with_close_notify(certs, live, start_fdserver,
                                                         start_fdapp):
    server = start_fdserver("--certfile", str(live / "live.crt"),
                            "--keyfile", str(live / "live.key"), binds=("https=127.0.0.1:0",))
    worker = start_fdapp(server, "--keepalive-grace", "0.2")
    host, port = tls_address(server).rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(certs.ca))
    # Python's default forgives a close without close_notify; this client does not.
    context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=host, suppress_ragged_eofs=False) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert tls.recv(65536).endswith(f"Hello from {worker.pid}\n".encode())
        worker.signal(signal.SIGTERM)          # the connection is idle: the drain closes it
        # With close_notify this is a clean end (b""); without, SSLEOFError.
        assert tls.recv(65536) == b""
    assert worker.wait() == 0


def test_client_certificates_with_ca_certs(certs, live, start_fdserver, start_fdapp):
    server = start_fdserver("--certfile", str(live / "live.crt"),
                            "--keyfile", str(live / "live.key"), "--ca-certs", str(certs.ca),
                            binds=("https=127.0.0.1:0",))
    worker = start_fdapp(server)
    https = tls_address(server)
    assert fetch(https, certs.ca, cert=certs.client)[1] == f"Hello from {worker.pid}\n"
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        fetch(https, certs.ca)       # no client certificate: the handshake fails


def test_a_worker_that_cannot_do_tls_is_refused(certs, live, start_fdserver):
    from fdserver.client import register
    from fdserver.errors import RefusedError

    server = start_fdserver("--certfile", str(live / "live.crt"),
                            "--keyfile", str(live / "live.key"),
                            binds=("https=127.0.0.1:0", "http=127.0.0.1:0"))
    with pytest.raises(RefusedError, match=r"serves TLS on https; this worker does not read "
                                           r"TLS material"):
        register(server.socket, connect_timeout=5)
    registration = register(server.socket, connect_timeout=5, features=("tls",))
    try:
        assert [(li.name, li.tls) for li in registration.listeners] == [
            ("https", True), ("http", False)]
        assert "PRIVATE KEY" not in repr(registration)
        context = registration.ssl_context()
        assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2
    finally:
        for listener in registration.listeners:
            listener.sock.close()
        registration.channel.close()


def test_bad_tls_settings_are_one_line_errors(certs, sockdir, tmp_path):
    first, key = str(certs.first.cert), str(certs.first.key)
    sm2 = tmp_path / "sm2.key"            # a key type cryptography does not load
    openssl("genpkey", "-algorithm", "SM2", "-out", str(sm2))
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)
    encrypted = tmp_path / "encrypted.key"
    openssl("pkey", "-in", key, "-aes256", "-passout", "pass:secret", "-out", str(encrypted))
    cases = [
        (["--bind", "https=127.0.0.1:0"],
         "the listener named 'https' serves TLS and needs --certfile and --keyfile"),
        (["--bind", "127.0.0.1:0", "--certfile", first, "--keyfile", key],
         f"--certfile {first} given, but no listener serves TLS"),
        (["--bind", "web=127.0.0.1:0", "--certfile", first, "--keyfile", key,
          "--tls-listener", "www"], "--tls-listener www: no listener has that name"),
        (["--bind", "https=127.0.0.1:0", "--certfile", first],
         "--certfile and --keyfile go together"),
        (["--bind", "https=127.0.0.1:0", "--certfile", first, "--keyfile",
          str(certs.renewed.key)], "does not belong to the certificate"),
        (["--bind", "https=127.0.0.1:0", "--certfile", str(certs.expired.cert), "--keyfile",
          str(certs.expired.key)], "the certificate expired on"),
        (["--bind", "https=127.0.0.1:0", "--certfile", first, "--keyfile",
          str(tmp_path / "absent.key")], "cannot read it: no such file or directory"),
        (["--bind", "https=127.0.0.1:0", "--certfile", key, "--keyfile", key],
         "no PEM certificate in it"),
        (["--bind", "https=127.0.0.1:0", "--certfile", first, "--keyfile", first],
         "not a usable PEM private key"),
        (["--bind", "https=127.0.0.1:0", "--certfile", first, "--keyfile", str(encrypted)],
         "the key is encrypted"),
        (["--bind", "https=127.0.0.1:0", "--certfile", first, "--keyfile", str(sm2)],
         "not a usable PEM private key"),
        (["--bind", "https=127.0.0.1:0", "--certfile", str(fifo), "--keyfile", key],
         f"--certfile {fifo}: not a regular file"),
        (["--bind", "https=127.0.0.1:0", "--certfile", first, "--keyfile", key,
          "--ciphers", "NO-SUCH-CIPHER"], "--ciphers NO-SUCH-CIPHER: OpenSSL knows no cipher"),
    ]
    for args, why in cases:
        result = run([script("fdserver"), "--socket", str(sockdir / "bad.sock"), *args])
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.startswith("fdserver: error: ") and why in result.stderr, (
            args, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert not (sockdir / "bad.sock").exists()


def test_reload_without_tls_says_so(start_fdserver):
    server = start_fdserver()
    result = reload(server)
    assert (result.returncode, result.stderr) == (
        1, "fdctl: error: reload failed: fdserver serves no TLS: there is no certificate to "
           "reload (--certfile)\n")


MAIN_WITH_SSL_OPTIONS = """
import os
import tornado.httpserver, tornado.web

class Hello(tornado.web.RequestHandler):
    def get(self):
        self.write(f"Hello from {{os.getpid()}}\\n")

async def main():
    app = tornado.web.Application([(r"/", Hello)])
    server = tornado.httpserver.HTTPServer(
        app, ssl_options={{"certfile": {cert!r}, "keyfile": {key!r}}})
    server.listen(8443)
"""


def test_an_apps_own_ssl_options_are_honoured(certs, tmp_path, start_fdserver, start_fdapp):
    # Before fdserver knew TLS, fdapp served such an app as plain HTTP.
    (tmp_path / "own.py").write_text(MAIN_WITH_SSL_OPTIONS.format(
        cert=str(certs.first.cert), key=str(certs.first.key)))
    server = start_fdserver()
    worker = start_fdapp(server, app="own:main", cwd=tmp_path)
    assert fetch(server.address, certs.ca) == (certs.first.subject,
                                               f"Hello from {worker.pid}\n", None)


def https_config(path: Path) -> Path:
    """deploy/supervisord.conf with its commented HTTPS command in place of the plain one."""
    lines = (PROJECT / "deploy" / "supervisord.conf").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("command=fdserver"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith(" "))
    https = next(i for i, line in enumerate(lines) if line.startswith(";command=fdserver"))
    stop = next(i for i in range(https + 1, len(lines)) if not lines[i].startswith(";    "))
    command = [line[1:] for line in lines[https:stop]]
    lines = lines[:start] + command + lines[end:https] + lines[stop:]
    # Written elsewhere: the app's directory= is relative to the file's folder.
    path.write_text("\n".join(lines).replace("%(here)s/..", str(PROJECT)) + "\n")
    return path


@needs_root
def test_the_shipped_https_deployment_and_certbot_hook(certs, procs, public_dir, deploy_user,
                                                       tmp_path):
    from test_rolling import Supervised

    # As docs/deployment.md sets it up: the key root:ssl-cert 0640, in a 0750 folder.
    try:
        ssl_cert = grp.getgrnam("ssl-cert").gr_gid
        made_group = False
    except KeyError:
        subprocess.run(["groupadd", "--system", "ssl-cert"], check=True)
        ssl_cert, made_group = grp.getgrnam("ssl-cert").gr_gid, True
    tls_dir = public_dir / "tls"
    tls_dir.mkdir()
    os.chown(tls_dir, 0, ssl_cert)
    os.chmod(tls_dir, 0o750)
    for source, name in ((certs.first.cert, "fullchain.pem"), (certs.first.key, "privkey.pem")):
        shutil.copyfile(source, tls_dir / name)
        os.chown(tls_dir / name, 0, ssl_cert)
        os.chmod(tls_dir / name, 0o640)
    config = https_config(tmp_path / "supervisord.conf")
    deployment = Supervised(procs, public_dir, config=config, env={
        "FDSERVER_TLS_BIND": "127.0.0.1:0", "FDSERVER_TLS_DIR": str(tls_dir)})
    try:
        https = tls_address(deployment)
        subject, body, _ = fetch(https, certs.ca)
        assert subject == certs.first.subject
        assert int(body.split()[-1]) in deployment.workers
        with LoadClient(https, clients=4, mode="keepalive", tls_ca=certs.ca) as load:
            load.wait_started()
            result = deployment.rolling_restart()
            assert result.returncode == 0, result.stdout + result.stderr
            # certbot renewed: its deploy hook installs the files and reloads.
            renewed = tmp_path / "live"
            renewed.mkdir()
            shutil.copyfile(certs.renewed.cert, renewed / "fullchain.pem")
            shutil.copyfile(certs.renewed.key, renewed / "privkey.pem")
            hook = run([str(PROJECT / "deploy" / "certbot" / "fdserver-reload")], env=dict(
                os.environ, RENEWED_LINEAGE=str(renewed), FDSERVER_TLS_DIR=str(tls_dir),
                FDSERVER_SOCKET=deployment.socket, FDCTL=script("fdctl")))
            assert hook.returncode == 0, hook.stderr
            assert re.fullmatch(r"loaded CN=renewed\.test, expires \S+ into 4 worker\(s\)\n",
                                hook.stdout), hook.stdout
            report = load.stop()
        assert report["failed"] == 0, report["failures"]
        assert fetch(https, certs.ca)[0] == certs.renewed.subject
        key = os.stat(tls_dir / "privkey.pem")
        assert (key.st_uid, key.st_gid, key.st_mode & 0o777) == (0, ssl_cert, 0o640)
    finally:
        deployment.shutdown()
        if made_group:
            subprocess.run(["groupdel", "ssl-cert"], check=False)


def test_tls_under_systemd_socket_activation(certs, live, procs, sockdir):
    import threading

    from test_systemd import ACTIVATE, free_port

    path, port = str(sockdir / "fd.sock"), free_port()
    activator = procs.start([ACTIVATE, "-l", f"127.0.0.1:{port}", "--fdname=https",
                             script("fdserver"), "--socket", path,
                             "--certfile", str(live / "live.crt"),
                             "--keyfile", str(live / "live.key")])
    activator.wait_for_line(rf"Listening on 127.0.0.1:{port}")
    answers = []
    # Like systemd, it starts fdserver on the first connection, which waits meanwhile.
    first = threading.Thread(target=lambda: answers.append(fetch(f"127.0.0.1:{port}", certs.ca)))
    first.start()
    activator.wait_for_line(rf"serving https on 127.0.0.1:{port};")
    worker = procs.start([script("fdapp"), "app:make_app", "--socket", path])
    worker.wait_for_line(r"ready: serving https on")
    first.join(timeout=20)
    assert answers == [(certs.first.subject, f"Hello from {worker.pid}\n", "http/1.1")]


def test_proxy_protocol_is_read_before_tls(certs, live, start_fdserver, start_fdapp):
    server = start_fdserver("--certfile", str(live / "live.crt"),
                            "--keyfile", str(live / "live.key"), "--proxy-protocol", "https",
                            binds=("https=127.0.0.1:0",))
    start_fdapp(server)
    host, port = tls_address(server).rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(certs.ca))
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(f"PROXY TCP4 203.0.113.7 {host} 40000 {port}\r\n".encode())
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(b"GET /ip HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    assert data.endswith(b"\r\n\r\n203.0.113.7 https\n"), data


def test_ipv6_tls_1_2_at_least_and_alpn(certs, live, start_fdserver, start_fdapp):
    server = start_fdserver("--certfile", str(live / "live.crt"),
                            "--keyfile", str(live / "live.key"), binds=("https=[::1]:0",))
    worker = start_fdapp(server)
    https = tls_address(server)
    assert https.startswith("[::1]:")
    assert fetch(https, certs.ca) == (certs.first.subject, f"Hello from {worker.pid}\n",
                                      "http/1.1")
    port = https.rsplit(":", 1)[1]

    def s_client(*flags: str) -> str:
        return subprocess.run(["openssl", "s_client", "-connect", f"[::1]:{port}", *flags],
                              input="", capture_output=True, text=True, timeout=30).stdout

    # A client that offers TLS 1.1 (allowed on its side) is refused by the server.
    old = subprocess.run(["openssl", "s_client", "-connect", f"[::1]:{port}", "-tls1_1",
                          "-cipher", "DEFAULT@SECLEVEL=0"], input="", capture_output=True,
                         text=True, timeout=30)
    assert "alert protocol version" in old.stderr, old.stdout + old.stderr
    assert "Protocol  : TLSv1.2" in s_client("-tls1_2")


@needs_root
def test_fdapp_is_not_dumpable_before_it_can_receive_a_key(users, procs, sockdir):
    # Waiting for an fdserver that is not there yet: no key, but already closed to
    # others of its user, who would otherwise keep a /proc/PID/mem opened now.
    worker = procs.start(["setpriv", f"--reuid={APP_USER}", f"--regid={GROUP}", "--clear-groups",
                          "--", script("fdapp"), "app:make_app", "--socket",
                          str(sockdir / "later.sock"), "--connect-timeout", "60"])
    wait_until(lambda: os.path.exists(f"/proc/{worker.pid}/mem")
               and os.stat(f"/proc/{worker.pid}/mem").st_uid == 0,
               what="fdapp non-dumpable")
    assert os.stat(f"/proc/{worker.pid}/status").st_uid == 0


def test_a_resumed_worker_follows_the_new_fdservers_tls_listeners(certs, live, start_fdserver,
                                                                  start_fdapp):
    from test_recovery import free_port

    port = free_port()
    plain = start_fdserver(binds=(f"web=127.0.0.1:{port}",))
    worker = start_fdapp(plain)
    assert http_get(f"127.0.0.1:{port}") == (200, f"Hello from {worker.pid}\n")
    plain.signal(signal.SIGTERM)
    assert plain.wait() == 0
    # The same listener, now TLS: the worker hands it back and serves it with TLS.
    tls = start_fdserver("--tls-listener", "web", "--certfile", str(live / "live.crt"),
                         "--keyfile", str(live / "live.key"), binds=(f"web=127.0.0.1:{port}",))
    tls.wait_state(worker.pid, "ready")
    worker.wait_for_line(r"certificate in service for new connections on web")
    assert fetch(f"127.0.0.1:{port}", certs.ca) == (certs.first.subject,
                                                     f"Hello from {worker.pid}\n", "http/1.1")
    # And back: an fdserver without TLS.
    tls.signal(signal.SIGTERM)
    assert tls.wait() == 0
    again = start_fdserver(binds=(f"web=127.0.0.1:{port}",))
    again.wait_state(worker.pid, "ready")
    worker.wait_for_line(r"fdserver now serves no TLS; serving web as plain HTTP")
    assert http_get(f"127.0.0.1:{port}") == (200, f"Hello from {worker.pid}\n")


def test_an_app_whose_own_ssl_options_do_not_load_is_told_so(certs, tmp_path, start_fdserver):
    # Files Tornado finds (it checks that much itself), but a key of another certificate.
    (tmp_path / "own.py").write_text(MAIN_WITH_SSL_OPTIONS.format(
        cert=str(certs.first.cert), key=str(certs.renewed.key)))
    server = start_fdserver()
    result = run([script("fdapp"), "own:main", "--socket", server.socket], cwd=tmp_path)
    assert result.returncode == 1
    assert re.fullmatch(r"fdapp: error: own:main: the app's ssl_options do not load: .*"
                        r"key values mismatch.*", result.stderr.splitlines()[-1]), result.stderr
    assert "Traceback" not in result.stderr


def test_a_session_resumes_on_another_worker(certs, live, start_fdserver, start_fdapp):
    # Browsers and wrk resume sessions with tickets: fdserver gives every worker the
    # same ticket keys, as a forked server's processes share theirs.
    server = start_fdserver("--certfile", str(live / "live.crt"),
                            "--keyfile", str(live / "live.key"), binds=("https=127.0.0.1:0",))
    workers = {start_fdapp(server).pid for _ in range(2)}
    host, port = tls_address(server).rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(certs.ca))

    def get(session):
        with socket.create_connection((host, int(port)), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=host, session=session) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return int(data.split()[-1]), tls.session, tls.session_reused

    first, session, _ = get(None)
    served = {}
    for _ in range(40):                 # until the other worker has answered one
        pid, _, reused = get(session)
        served.setdefault(pid, []).append(reused)
        if len(served) == 2:
            break
    assert set(served) == workers, served
    assert all(all(reused) for reused in served.values()), served


def test_shared_ticket_keys_need_the_same_keys():
    from fdserver import _openssl
    from fdserver.tls import server_context

    # fdapp's own check: two contexts with the same keys resume each other's sessions...
    cert, key = _pair()
    material = {"chain": cert, "key": key}
    assert _openssl.works(lambda: server_context(material))
    # ...and without them they do not: the check can fail.
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    session = _openssl._handshake(client, server_context(material), None).session
    assert not _openssl._handshake(client, server_context(material), session).session_reused


def _pair() -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as folder:
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{folder}/k", "-out", f"{folder}/c", "-days", "1", "-subj", "/CN=x")
        return Path(f"{folder}/c").read_text(), Path(f"{folder}/k").read_text()
