"""A user's mistake gets one clear line, a non-zero exit, and nothing is lost."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys

import pytest

from support import PROJECT, http_get, run, script

AS_USER = str(PROJECT / "tests" / "as_user.py")


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.returncode != 0, result
    err = result.stderr.strip()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def fdserver_cmd(sock: str, *binds: str) -> list[str]:
    argv = [script("fdserver"), "--socket", sock]
    for bind in binds:
        argv += ["--bind", bind]
    return argv


@pytest.fixture
def taken_address():
    """An address some other listening socket holds for the whole test."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield f"127.0.0.1:{taken.getsockname()[1]}"


def test_bind_address_in_use(sockdir, taken_address):
    address, path = taken_address, sockdir / "fd.sock"
    result = run(fdserver_cmd(str(path), address) + ["--recover-timeout", "0"])
    assert_one_line_error(result, f"cannot bind {address}", "address already in use")
    assert not path.exists(), "fdserver must remove the socket file it created"


def test_bind_address_in_use_and_nobody_hands_it_back(sockdir, taken_address):
    address, path = taken_address, sockdir / "fd.sock"
    result = run(fdserver_cmd(str(path), address) + ["--recover-timeout", "0.3"])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"fdserver: error: cannot bind {address}: address already in use, and no worker "
        "handed it back within 0.3s (is another server on it?)")
    assert not path.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to nobody")
def test_bind_low_port_without_privilege(public_dir):
    os.chown(public_dir, pwd.getpwnam("nobody").pw_uid, -1)    # its socket goes there
    result = run([sys.executable, AS_USER, "nobody", "fdserver_main",
                  "--socket", str(public_dir / "fd.sock"), "--bind", "127.0.0.1:80"])
    err = assert_one_line_error(result, "cannot bind 127.0.0.1:80", "permission denied")
    assert "CAP_NET_BIND_SERVICE" in err


@pytest.mark.parametrize("spec, why", [
    ("80", "expected HOST:PORT"), ("localhost:80", "'localhost' is not a numeric IP address"),
    ("0.0.0.0:http", "expected HOST:PORT"), ("[::]80", "expected HOST:PORT"),
    ("0.0.0.0:70000", "port 70000 is out of range (0-65535)"),
    ("bad name=0.0.0.0:80", "listener name 'bad name' must be a word"),
    ("::1:80", "an IPv6 address goes in brackets: [::1]:80")])
def test_malformed_bind_spec(sockdir, spec, why):
    result = run(fdserver_cmd(str(sockdir / "fd.sock"), spec))
    assert_one_line_error(result, f"--bind {spec}: {why}")


@pytest.mark.parametrize("flag, value, why", [("--backlog", "-5", "at least 1"),
                                              ("--backlog", "0", "at least 1"),
                                              ("--max-connections", "8", "at least 16")])
def test_a_number_out_of_range_is_refused(sockdir, flag, value, why):
    result = run([*fdserver_cmd(str(sockdir / "fd.sock"), "127.0.0.1:0"), flag, value])
    assert_one_line_error(result, f"fdserver: error: {flag} {value}: {why}")


def test_socket_folder_missing(sockdir):
    missing = sockdir / "nope"
    result = run(fdserver_cmd(str(missing / "fd.sock"), "127.0.0.1:0"))
    assert_one_line_error(result, f"socket folder {missing} does not exist")


def test_socket_path_is_a_regular_file(sockdir):
    path = sockdir / "fd.sock"
    path.write_text("precious\n")
    result = run(fdserver_cmd(str(path), "127.0.0.1:0"))
    assert_one_line_error(result, str(path), "not a socket", "refusing")
    assert path.read_text() == "precious\n"


def test_socket_path_is_a_live_fdserver(start_fdserver, start_fdapp):
    server = start_fdserver()
    result = run(fdserver_cmd(server.socket, "127.0.0.1:0"))
    assert_one_line_error(result, server.socket, f"live server (pid {server.pid})")
    # The first fdserver still owns its socket: a new worker joins and serves.
    worker = start_fdapp(server)
    assert http_get(server.address) == (200, f"Hello from {worker.pid}\n")
    assert server.popen.poll() is None


def test_stale_socket_is_replaced(start_fdserver, start_fdapp, sockdir):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sockdir / "fd.sock"))
    stale.close()            # the file stays, nobody listens: stale
    server = start_fdserver()
    worker = start_fdapp(server)
    assert http_get(server.address) == (200, f"Hello from {worker.pid}\n")


def test_fdapp_without_fdserver_gives_up_naming_the_path(sockdir):
    path = str(sockdir / "absent.sock")
    result = run([script("fdapp"), "app:make_app", "--socket", path, "--connect-timeout", "0.3"])
    # What it waited for (a log line), then the error, one line.
    waited, error = result.stderr.strip().splitlines()
    assert waited.endswith(f" INFO waiting up to 0.3s for fdserver at {path} (no such file)")
    assert_one_line_error(subprocess.CompletedProcess(result.args, result.returncode,
                                                      result.stdout, error),
                          f"no fdserver answered at {path} within 0.3s")


@pytest.mark.parametrize("spec, fragment", [
    ("app", "not MODULE:ATTR"),
    ("no_such_module:make_app", "cannot import 'no_such_module'"),
    ("app:no_such_attr", "has no attribute 'no_such_attr'"),
    ("app:HelloHandler", "calling app:HelloHandler failed"),
    ("os:sep", "is a str, not a tornado.web.Application"),
    ("broken_app:make_app", "importing 'broken_app' for broken_app:make_app failed"),
])
def test_fdapp_bad_app(tmp_path, spec, fragment):
    (tmp_path / "broken_app.py").write_text("raise RuntimeError('boom at import')\n")
    cwd = tmp_path if spec.startswith("broken") else PROJECT
    # No fdserver at all: the app is checked before connecting.
    result = run([script("fdapp"), spec, "--socket", str(tmp_path / "x.sock"),
                  "--connect-timeout", "0"], cwd=cwd)
    assert_one_line_error(result, fragment)


def test_fdctl_without_fdserver(sockdir):
    path = str(sockdir / "absent.sock")
    result = run([script("fdctl"), "--socket", path, "status"])
    assert_one_line_error(result, path)


@pytest.mark.parametrize("value, fragment", [
    ("soon", "'soon' is not a number of seconds"),
    ("nan", "nan is not a finite number of seconds"),
    ("inf", "inf is not a finite number of seconds"),
    ("-1", "-1 is negative"),
])
@pytest.mark.parametrize("program, flag", [
    ("fdserver", "--unavailable-timeout"), ("fdserver", "--dispatch-timeout"),
    ("fdapp", "--graceful-timeout"),
])
def test_a_bad_number_of_seconds_names_the_flag(sockdir, program, flag, value, fragment):
    argv = [script(program), *(["app:make_app"] if program == "fdapp" else []),
            "--socket", str(sockdir / "x.sock"), f"{flag}={value}"]
    result = run(argv)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    # argparse prints the usage, then the one line that says what is wrong.
    assert result.stderr.strip().splitlines()[-1] == \
        f"{program}: error: argument {flag}: {fragment}", result.stderr


@pytest.mark.parametrize("argv, line", [
    (["fdctl", "--socket", "/nonexistent", "drain", "--wait", "1e12"],
     "fdctl drain: error: argument --wait: 1e12 is more than 3600 (an hour)"),
    (["fdctl", "--socket", "/nonexistent", "drain", "--wait", "0"],
     "fdctl drain: error: argument --wait: 0 is not above 0"),
    (["fdserver", "--socket", "/nonexistent", "--agent", "127.0.0.1:0", "--agent-window", "0"],
     "fdserver: error: argument --agent-window: 0 is not above 0"),
])
def test_out_of_range_seconds(argv, line):
    result = run([script(argv[0]), *argv[1:]])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == line, result.stderr


def test_fdctl_takes_the_socket_before_or_after_the_command(start_fdserver):
    server = start_fdserver()
    for argv in (["--socket", server.socket, "status"], ["status", "--socket", server.socket]):
        result = run([script("fdctl"), *argv])
        assert result.returncode == 0, result
        assert result.stdout.startswith(f"fdserver pid {server.pid} "), result
    result = run([script("fdctl"), "status"])
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == (
        "fdctl: error: the following arguments are required: --socket"), result
