"""The certificate in service, and its renewal without a restart.

``fdctl reload`` (or SIGHUP) re-reads the files and checks them (see
:mod:`fdserver.certificates`), in a thread: the loop goes on serving.  If
they fail, nothing changes: the certificate in service stays in service.
If they pass, every worker that was given TLS material is sent the new one;
each builds a new context for new handshakes (open connections keep theirs)
and says so; the answer waits for all of them, at most ACK_TIMEOUT, so that
when ``fdctl reload`` returns the new certificate is what new clients get.
A reload asked for while one is under way gets that one's answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .certificates import Material, TLSFiles, read
from .errors import TLSError
from .peer import Peer
from .protocol import ReloadedMessage, TLSMessage

log = logging.getLogger("fdserver")

ACK_TIMEOUT = 5.0
MAX_ERROR = 200


@dataclass(eq=False)
class _Round:
    """One reload: reading the files, then waiting for the workers to take them."""

    answers: list[Callable[[ReloadedMessage], None]]
    serial: int = 0
    waiting: set[Peer] = field(default_factory=set)
    took: int = 0
    refused: list[str] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class Renewal:
    """The TLS material fdserver serves, and the reload under way."""

    def __init__(self, loop: asyncio.AbstractEventLoop, material: Material) -> None:
        self._loop = loop
        self.material = material
        self.serial = 1
        self._round: _Round | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def files(self) -> TLSFiles:
        return self.material.files

    def send(self, peer: Peer) -> None:
        """Give *peer* the material in service; it gets every renewal from now on."""
        peer.tls_given = True
        peer.channel.send(self.material.message(self.serial))

    def reload(self, workers: Callable[[], Iterable[Peer]],
               answer: Callable[[ReloadedMessage], None]) -> None:
        """Re-read the files; if they pass, push them to *workers()*; then *answer*."""
        if self._round is not None:
            self._round.answers.append(answer)
            return
        self._round = _Round([answer])
        self._task = asyncio.ensure_future(self._reload(self._round, workers))

    async def _reload(self, round_: _Round, workers: Callable[[], Iterable[Peer]]) -> None:
        old = self.material
        try:
            material = await self._loop.run_in_executor(None, read, old.files)
        except Exception as exc:         # TLSError, or anything a file can make a parser do
            why = str(exc) if isinstance(exc, TLSError) else (
                f"{old.files.certfile}: {type(exc).__name__}: {exc}")
            log.warning("reload refused: %s; still serving %s (expires %s)", why, old.subject,
                        old.not_after.date())
            self._answer(round_, {"type": "reloaded", "ok": False, "certificate": old.describe(),
                                  "message": f"{why}; still serving {old.subject} "
                                             f"(expires {old.not_after.date()})"})
            return
        self.material = material
        self.serial += 1
        round_.serial = self.serial
        log.info("reloaded %s: %s, expires %s", material.files.certfile, material.subject,
                 material.not_after.date())
        for peer in workers():
            # Only those given material: one still waiting for its listeners
            # (a recovery) gets the current material with them.
            if peer.tls_given and not peer.channel.closed:
                peer.channel.send(material.message(self.serial))
                round_.waiting.add(peer)
        round_.timer = self._loop.call_later(ACK_TIMEOUT, self._finish, round_)
        self._check(round_)

    def acknowledged(self, peer: Peer, message: TLSMessage) -> None:
        """A worker says whether it took the material of a reload."""
        round_ = self._round
        if round_ is None or round_.serial != message["serial"] or peer not in round_.waiting:
            return
        round_.waiting.discard(peer)
        if message.get("ok") is True:
            round_.took += 1
        else:
            error = _printable(str(message.get("error") or "failed"))[:MAX_ERROR]
            round_.refused.append(f"worker pid {peer.pid}: {error}")
        self._check(round_)

    def gone(self, peer: Peer) -> None:
        if self._round is not None and peer in self._round.waiting:
            self._round.waiting.discard(peer)
            self._check(self._round)

    def _check(self, round_: _Round) -> None:
        if not round_.waiting and round_.serial:
            self._finish(round_)

    def _finish(self, round_: _Round) -> None:
        if round_ is not self._round:
            return
        if round_.timer:
            round_.timer.cancel()
        material = self.material
        late = [f"worker pid {p.pid}: no answer in {ACK_TIMEOUT:g}s" for p in round_.waiting]
        problems = round_.refused + late
        described = f"{material.subject}, expires {material.not_after.date()}"
        if problems:
            said = (f"loaded {described}, but {len(problems)} worker(s) did not take it: "
                    f"{'; '.join(problems[:3])}")
            log.warning("reload: %s", said)
        else:
            said = f"loaded {described} into {round_.took} worker(s)"
        self._answer(round_, {"type": "reloaded", "ok": not problems, "message": said,
                              "certificate": material.describe(), "workers": round_.took})

    def _answer(self, round_: _Round, answer: ReloadedMessage) -> None:
        self._round = None
        for send in round_.answers:
            send(answer)

    def describe(self) -> dict[str, Any]:
        return self.material.describe()


def _printable(text: str) -> str:
    """A peer's words, fit for a log line and a terminal: no control characters."""
    return "".join(c if c.isprintable() else "?" for c in text)
