"""Tornado's own IOStream, HTTP server, web, websocket and TCP server tests,
run with fdapp's stream classes in place of ``IOStream`` and ``SSLIOStream``.

Usage: ``python tests/tornado_suite.py`` (``./dev test`` runs it on both
Tornado releases it tests).  Exits non-zero if any of Tornado's tests fails.
"""

import sys

import tornado.iostream
import tornado.tcpclient
import tornado.tcpserver

from fdserver._tornado import FastStream, FastTLSStream

# Before Tornado's test modules import the names: servers, clients and the
# tests' own streams are all fdapp's (IOStream.start_tls reads the module's
# SSLIOStream, TCPServer its own).
for module in (tornado.iostream, tornado.tcpserver, tornado.tcpclient):
    module.IOStream = FastStream  # type: ignore[misc]
    if hasattr(module, "SSLIOStream"):
        module.SSLIOStream = FastTLSStream  # type: ignore[misc]

MODULES = ["tornado.test.iostream_test", "tornado.test.httpserver_test",
           "tornado.test.web_test", "tornado.test.websocket_test",
           "tornado.test.tcpserver_test"]

if __name__ == "__main__":
    from tornado.test.runtests import main

    sys.argv = [sys.argv[0], *MODULES]
    main()
