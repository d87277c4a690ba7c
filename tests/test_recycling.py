"""fdserver's turns for recycling workers, on real channels in this process.

The end-to-end test (tests/test_rolling.py) recycles real workers under
supervisord; this one plays workers that misbehave, with a short patience
(the Recycler's own parameter).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time

from fdserver.peer import Peer
from fdserver.protocol import MAX_DRAIN
from fdserver.recycling import Recycler
from fdserver.transport import Channel, LoopChannel

from support import http_get


async def turns_given(count: int, patience: float, ready: list[int]):
    """*count* ready workers on real socketpairs; returns (peers, recycler, their ends)."""
    loop = asyncio.get_running_loop()
    peers, ends = [], []
    for pid in range(1, count + 1):
        ours, theirs = socket.socketpair()
        channel = LoopChannel(Channel(ours, server_side=True), loop,
                              lambda message, fds: None, lambda reason: None)
        peer = Peer(pid=pid, uid=0, gid=0, connected_at=time.time(), channel=channel,
                    role="worker", state="ready")
        peers.append(peer)
        theirs.setblocking(False)
        ends.append(Channel(theirs))
    return peers, Recycler(loop, lambda: ready[0], patience=patience), ends


async def next_message(end: Channel, timeout: float = 5.0) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (message := end.next_message()) is None:
        assert loop.time() < deadline, "no message"
        try:
            end.receive_some()
        except BlockingIOError:
            await asyncio.sleep(0.005)
    return message[0]


def test_a_turn_not_taken_passes_on_and_turns_wait_for_the_replacement():
    async def main() -> None:
        ready = [2]
        (first, second), recycler, (first_end, second_end) = await turns_given(2, 0.1, ready)
        recycler.ask(first)
        recycler.ask(second)
        assert (await next_message(first_end))["type"] == "recycle"
        # first never drains: after the patience, second gets the turn.
        assert (await next_message(second_end))["type"] == "recycle"
        # second drains and goes; with no replacement ready, a third worker
        # asking waits until one is (or until the patience runs out).
        (third,), _, (third_end,) = await turns_given(1, 0.1, ready)
        third.pid = 3
        second.state = "gone"
        ready[0] = 1
        recycler.ask(third)
        recycler.changed()
        assert third_end.next_message() is None
        assert (await next_message(third_end))["type"] == "recycle"     # patience ran out
    asyncio.run(main())


def test_a_worker_that_asks_twice_is_queued_once():
    async def main() -> None:
        ready = [2]
        (first, second), recycler, (first_end, second_end) = await turns_given(2, 5.0, ready)
        recycler.ask(first)
        recycler.ask(second)
        recycler.ask(second)
        assert (await next_message(first_end))["type"] == "recycle"
        first.state = "gone"
        recycler.changed()                  # replacement ready: ready[0] is still 2
        assert (await next_message(second_end))["type"] == "recycle"
        second.state = "gone"
        recycler.changed()
        second_end.sock.setblocking(False)
        try:
            assert not second_end.sock.recv(1), "a second turn was given"
        except BlockingIOError:
            pass
    asyncio.run(main())


def test_a_worker_that_drains_for_ever_does_not_hold_the_turn():
    async def main() -> None:
        ready = [2]
        (first, second), recycler, (first_end, second_end) = await turns_given(2, 0.2, ready)
        recycler.ask(first)
        recycler.ask(second)
        assert (await next_message(first_end))["type"] == "recycle"
        first.state = "draining"          # it says so, and never goes
        recycler.changed()
        # Not at the first patience (it is draining), but at the next one.
        assert (await next_message(second_end, timeout=5.0))["type"] == "recycle"
    asyncio.run(main())


def test_a_worker_is_given_the_drain_it_said_it_may_take():
    """fdapp's ask says how long its drain may take (--graceful-timeout plus
    --shutdown-timeout): a worker draining that long, websockets say, keeps
    the turn for it and another patience; a claim over MAX_DRAIN counts as
    MAX_DRAIN, and one that is not a number as none."""
    async def main() -> float:
        loop = asyncio.get_running_loop()
        ready = [2]
        (first, second), recycler, (first_end, second_end) = await turns_given(2, 0.2, ready)
        recycler.ask(first, drain=0.6)
        recycler.ask(second)
        assert (await next_message(first_end))["type"] == "recycle"
        turn = loop.time()
        first.state = "draining"
        recycler.changed()
        assert (await next_message(second_end, timeout=5.0))["type"] == "recycle"
        return loop.time() - turn

    # First look at the patience (0.2 s), then the drain and another patience.
    assert asyncio.run(main()) >= 0.2 + 0.6 + 0.2 - 0.01


def test_the_drain_a_worker_may_take_reaches_fdserver(start_fdserver, start_fdapp):
    """fdapp says its --graceful-timeout plus --shutdown-timeout; fdserver
    counts a claim up to MAX_DRAIN, and one that is not a number as none."""
    import fdserver

    server = start_fdserver()
    worker = start_fdapp(server, "--max-requests", "1", "--graceful-timeout", "7",
                         "--shutdown-timeout", "2")
    assert http_get(server.address)[0] == 200
    server.wait_for_line(rf"worker pid {worker.pid} is due to recycle \(1 requests; its "
                         r"drain takes at most 9s\)")
    assert worker.wait(timeout=30) == 0
    registration = fdserver.register(server.socket, features=("share", "recycle"))
    try:
        for drain, said in ((1e300, f"{MAX_DRAIN:g}s"), ("long", "?"), (-1, "?"), (True, "?")):
            seen = len(server.lines)
            registration.channel.send({"type": "recycle", "requests": 5, "drain": drain})
            server.wait_for_line(rf"worker pid {os.getpid()} is due to recycle \(5 requests; "
                                 rf"its drain takes at most {re.escape(said)}\)", start=seen)
    finally:
        registration.channel.close()


def test_a_worker_that_disconnects_leaves_the_queue():
    """Otherwise a worker holding the turn while others connect, ask and
    leave, again and again, grows fdserver's memory for as long (a review
    saw 28 MB to 140 MB in 20 s)."""
    async def main() -> None:
        ready = [3]
        (first, second, third), recycler, (first_end, _, _) = await turns_given(3, 5.0, ready)
        recycler.ask(first, drain=600.0)
        assert (await next_message(first_end))["type"] == "recycle"
        first.state = "draining"
        recycler.changed()
        for _ in range(3):
            recycler.ask(second, drain=1.0)
            recycler.ask(third)
        assert recycler.queued == [second, third]
        second.state = "gone"
        recycler.forget(second)              # fdserver does, when its connection closes
        assert recycler.queued == [third]
        assert recycler._current_drain == 600.0     # the holder's, kept; nothing of second
    asyncio.run(main())
