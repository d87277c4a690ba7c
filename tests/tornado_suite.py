"""Tornado's own IOStream, HTTP server, web, websocket and TCP server tests,
run with fdapp's stream class in place of ``IOStream``.

Usage: ``python tests/tornado_suite.py`` (``./dev test`` runs it on both
Tornado releases it tests).  Exits non-zero if any of Tornado's tests fails.
"""

import sys

import tornado.iostream
import tornado.tcpclient
import tornado.tcpserver

from fdserver._tornado import FastStream

# Before Tornado's test modules import the name: servers, clients and the
# tests' own streams are all fdapp's.
for module in (tornado.iostream, tornado.tcpserver, tornado.tcpclient):
    module.IOStream = FastStream  # type: ignore[misc]

MODULES = ["tornado.test.iostream_test", "tornado.test.httpserver_test",
           "tornado.test.web_test", "tornado.test.websocket_test",
           "tornado.test.tcpserver_test"]

if __name__ == "__main__":
    from tornado.test.runtests import main

    sys.argv = [sys.argv[0], *MODULES]
    main()
