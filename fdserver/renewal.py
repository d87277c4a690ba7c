"""The certificate in service, and its renewal without a restart.

``fdctl reload`` (or SIGHUP) re-reads the files and checks them (see
:mod:`fdserver.certificates`).  If they fail, nothing changes: the
certificate in service stays in service.  If they pass, every worker that
reads TLS material is sent it; each builds a new context for new
handshakes (open connections keep theirs) and says so; the answer to fdctl
waits for all of them, at most ACK_TIMEOUT, so that when ``fdctl reload``
returns the new certificate is what new clients get.
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
    """One reload, waiting for the workers to say they took it."""

    serial: int
    answer: Callable[[ReloadedMessage], None]
    waiting: set[Peer]
    took: int = 0
    refused: list[str] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class Renewal:
    """The TLS material fdserver serves, and the reloads under way."""

    def __init__(self, loop: asyncio.AbstractEventLoop, material: Material) -> None:
        self._loop = loop
        self.material = material
        self.serial = 1
        self._rounds: list[_Round] = []

    @property
    def files(self) -> TLSFiles:
        return self.material.files

    def message(self) -> TLSMessage:
        return self.material.message(self.serial)

    def reload(self, workers: Iterable[Peer], answer: Callable[[ReloadedMessage], None]) -> None:
        """Re-read the files; if they pass, push them to *workers*, then *answer*."""
        old = self.material
        try:
            material = read(old.files)
        except TLSError as exc:
            log.warning("reload refused: %s; still serving %s (expires %s)", exc,
                        old.subject, old.not_after.date())
            answer({"type": "reloaded", "ok": False, "certificate": old.describe(),
                    "message": f"{exc}; still serving {old.subject} "
                               f"(expires {old.not_after.date()})"})
            return
        self.material = material
        self.serial += 1
        log.info("reloaded %s: %s, expires %s", material.files.certfile, material.subject,
                 material.not_after.date())
        round_ = _Round(self.serial, answer, set())
        for peer in workers:
            if "tls" in peer.features and not peer.channel.closed:
                peer.channel.send(self.message())
                round_.waiting.add(peer)
        self._rounds.append(round_)
        round_.timer = self._loop.call_later(ACK_TIMEOUT, self._finish, round_)
        self._check(round_)

    def acknowledged(self, peer: Peer, message: TLSMessage) -> None:
        """A worker says whether it took the material of a reload."""
        for round_ in self._rounds:
            if round_.serial == message["serial"] and peer in round_.waiting:
                round_.waiting.discard(peer)
                if message.get("ok") is True:
                    round_.took += 1
                else:
                    error = message.get("error")
                    round_.refused.append(
                        f"worker pid {peer.pid}: {str(error)[:MAX_ERROR] if error else 'failed'}")
                self._check(round_)
                return

    def gone(self, peer: Peer) -> None:
        for round_ in list(self._rounds):
            if peer in round_.waiting:
                round_.waiting.discard(peer)
                self._check(round_)

    def _check(self, round_: _Round) -> None:
        if not round_.waiting:
            self._finish(round_)

    def _finish(self, round_: _Round) -> None:
        if round_ not in self._rounds:
            return
        self._rounds.remove(round_)
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
        answer: ReloadedMessage = {"type": "reloaded", "ok": not problems, "message": said,
                                   "certificate": material.describe(), "workers": round_.took}
        round_.answer(answer)

    def describe(self) -> dict[str, Any]:
        return self.material.describe()
