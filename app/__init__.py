"""The example app: ``GET /`` answers ``Hello from <pid>`` so you see who served you.

Run it behind fdserver with ``fdapp app:make_app --socket PATH``.
"""

import os

import tornado.web


class HelloHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.write(f"Hello from {os.getpid()}\n")


class ListenerHandler(tornado.web.RequestHandler):
    """``GET /listener``: the fdserver listener this request came on, and its scheme.

    An app that serves both ``http`` and ``https`` redirects with the same
    test: ``if fdserver.listener_of(self.request) == "http": self.redirect(...)``.
    """

    def get(self) -> None:
        import fdserver

        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.write(f"{fdserver.listener_of(self.request)} {self.request.protocol}\n")
class AddressHandler(tornado.web.RequestHandler):
    """``GET /ip`` answers the client's address and scheme as the app sees them
    (behind a balancer: from PROXY protocol or trusted X-Forwarded-For)."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.write(f"{self.request.remote_ip} {self.request.protocol}\n")


class SlowHandler(tornado.web.RequestHandler):
    """``GET /slow?seconds=N`` answers after N seconds (for drain demos and tests).

    With ``&stream=1`` the response starts at once (a first line, flushed)
    and ends after N seconds.
    """

    async def get(self) -> None:
        import asyncio

        seconds = min(float(self.get_argument("seconds", "1")), 60.0)
        if self.get_argument("stream", ""):
            self.write(f"Hello from {os.getpid()}, streaming\n")
            await self.flush()
        await asyncio.sleep(seconds)
        self.write(f"Hello from {os.getpid()} after {seconds:g}s\n")


class PollHandler(tornado.web.RequestHandler):
    """``GET /poll?seconds=N``: a long-poll that waits N seconds for news (there is none).

    It also waits for this process to start draining (``fdserver.draining()``),
    and then answers at once, ``reconnect``, instead of being held until the
    graceful timeout: the client asks again and reaches a worker that stays.
    """

    async def get(self) -> None:
        import asyncio

        import fdserver

        seconds = min(float(self.get_argument("seconds", "30")), 300.0)
        drain = asyncio.ensure_future(fdserver.draining().wait())
        try:
            await asyncio.wait_for(asyncio.shield(drain), seconds)
        except TimeoutError:
            self.write(f"no news from {os.getpid()}\n")
        else:
            self.write(f"reconnect: {os.getpid()} is going away\n")
        finally:
            drain.cancel()


def make_app() -> tornado.web.Application:
    return tornado.web.Application([(r"/", HelloHandler), (r"/slow", SlowHandler),
                                    (r"/poll", PollHandler), (r"/listener", ListenerHandler),
                                    (r"/ip", AddressHandler)])
