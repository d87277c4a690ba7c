"""The example app: ``GET /`` answers ``Hello from <pid>`` so you see who served you.

Run it behind fdserver with ``fdapp app:make_app --socket PATH``.
"""

import os

import tornado.web


class HelloHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.write(f"Hello from {os.getpid()}\n")


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


def make_app() -> tornado.web.Application:
    return tornado.web.Application([(r"/", HelloHandler), (r"/slow", SlowHandler)])
