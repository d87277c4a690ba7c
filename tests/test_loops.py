"""fdapp --loop: the worker's event loop, asyncio's own or uvloop."""

from __future__ import annotations

import os

import pytest

from support import http_get, run, script


def mapped_libraries(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_loop_uvloop_serves_on_uvloop(start_fdserver, start_fdapp):
    server = start_fdserver()
    worker = start_fdapp(server, "--loop", "uvloop")
    assert http_get(server.address)[1].strip() == f"Hello from {worker.pid}"
    # uvloop's extension is loaded: the worker runs on it.
    assert "uvloop/loop." in mapped_libraries(worker.pid)


@pytest.mark.skipif(bool(os.environ.get("FDAPP_LOOP")),
                    reason="FDAPP_LOOP starts every worker with --loop")
def test_default_loop_is_asyncio(start_fdserver, start_fdapp):
    server = start_fdserver()
    worker = start_fdapp(server)
    assert http_get(server.address)[1].strip() == f"Hello from {worker.pid}"
    assert "uvloop" not in mapped_libraries(worker.pid)


def test_loop_uvloop_without_uvloop_says_so_in_one_line(tmp_path, sockdir):
    # uvloop is installed here (the test extra): a module of that name that
    # fails to import stands for an environment without it.
    (tmp_path / "uvloop").mkdir()
    (tmp_path / "uvloop" / "__init__.py").write_text(
        "raise ImportError(\"No module named 'uvloop'\")\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = run([script("fdapp"), "app:make_app", "--socket", str(sockdir / "none.sock"),
                "--loop", "uvloop"], env=env)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "uvloop is not installed" in lines[0], done.stderr
    assert "pip install 'fdserver[uvloop]'" in lines[0]
