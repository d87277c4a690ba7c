"""The baseline: tornado's own multi-process mode serving the example app.

    .venv/bin/python bench/forked_app.py [--processes 2]

What tornado's docs show for several processes on one port: bind the socket
first (``bind_sockets``, here 127.0.0.1 port 0), ``fork_processes(N)``, then
each child serves ``app.make_app()`` with ``HTTPServer(app).add_sockets``.
Prints ``listening on HOST:PORT``, then ``pid N ready`` from each child.
The parent only waits for its children (and exits if one dies): stop the whole
thing by killing its process group.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from tornado.httpserver import HTTPServer  # noqa: E402
from tornado.netutil import bind_sockets  # noqa: E402
from tornado.process import fork_processes  # noqa: E402

from app import make_app  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--certfile", help="serve HTTPS with this certificate (and --keyfile)")
    p.add_argument("--keyfile")
    args = p.parse_args(argv)
    ssl_options = None
    if args.certfile:
        # The very context fdapp builds from fdserver's material: same protocol
        # versions, ciphers and ALPN, so the comparison is of the servers only.
        from fdserver.tls import server_context

        with open(args.certfile) as chain, open(args.keyfile) as key:
            ssl_options = server_context({"chain": chain.read(), "key": key.read()})
    # As fdapp does without --access-log.
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    sockets = bind_sockets(0, "127.0.0.1")
    host, port = sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    fork_processes(args.processes, max_restarts=0)    # returns only in the children

    async def serve() -> None:
        server = HTTPServer(make_app(), ssl_options=ssl_options)
        server.add_sockets(sockets)
        # One write(2), so that the children's lines never interleave.
        os.write(sys.stdout.fileno(), f"pid {os.getpid()} ready\n".encode())
        await asyncio.Event().wait()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
