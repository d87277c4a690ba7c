"""Who gets in through fdserver's socket, and how many at once.

Anyone who can open the socket can connect: its mode and group are the gate
(see :mod:`fdserver.socketfile`).  A flood of connections that never say
hello must not lock real workers out: past the limits the oldest silent one
makes room, and room is kept for root and fdserver's own user (half of it
for the allowed users too).  A hello is
then checked against the allow-list and the per-uid limits on workers and
fdctl connections.
"""

from __future__ import annotations

import collections
import os
import socket
from collections.abc import Collection

from .errors import ProtocolError
from .peer import Peer
from .peerlog import PeerLog
from .privileges import AllowList
from .protocol import MAX_ANSWER, Role, encode

# Connections kept at the end: however many others open, the operator's
# fdctl and root's workers still get in (all of them), and the allowed users'
# workers (half of them).  See Admission.tier.
RESERVED_PEERS = 64
OTHERS, WORKERS, OPERATOR = 0, 1, 2


class Admission:
    """The limits, applied to the peers connected now; refusals go to *warn*."""

    def __init__(self, warn: PeerLog, *, allow: AllowList, max_peers: int,
                 max_pending_per_uid: int, max_ctl_per_uid: int,
                 max_workers_per_uid: int) -> None:
        self._warn = warn
        self.allow = allow
        self.max_peers = max_peers
        self.max_pending_per_uid = max_pending_per_uid
        self.max_ctl_per_uid = max_ctl_per_uid
        self.max_workers_per_uid = max_workers_per_uid

    def tier(self, uid: int, gid: int) -> int:
        """How much of the room kept at the end a peer may use: OPERATOR (root
        and fdserver's own user) all of it, WORKERS (with an allow-list, the
        users it allows: their workers serve the site, and another user's
        connections, from however many uids, must not keep them out) half of
        it, anyone else none."""
        if uid in (0, os.getuid()):
            return OPERATOR
        if self.allow.restricted and self.allow.allows(uid, gid):
            return WORKERS
        return OTHERS

    def make_room(self, peers: Collection[Peer], conn: socket.socket, pid: int,
                  uid: int, gid: int) -> bool:
        """Whether *conn* (from *pid*, *uid*, *gid*) may join *peers*.

        Closes the oldest silent peer if that makes room; if none may go,
        closes *conn*, saying why.
        """
        pending = [p for p in peers if p.role is None]
        same_uid = [p for p in pending if p.uid == uid]
        tier = self.tier(uid, gid)
        kept = min(RESERVED_PEERS, self.max_peers // 4)
        limit = self.max_peers - {OPERATOR: 0, WORKERS: kept // 2, OTHERS: kept}[tier]
        if len(same_uid) >= self.max_pending_per_uid:
            self._evict(min(same_uid, key=lambda p: p.connected_at))
        elif len(peers) >= limit:
            # Room kept for a tier must not be taken by evicting its own.
            evictable = [p for p in pending if self.tier(p.uid, p.gid) <= tier]
            if not evictable:
                self._refuse_full(peers, conn, pid, uid, limit)
                return False
            self._evict(min(evictable, key=lambda p: p.connected_at))
        return True

    def check_hello(self, peers: Collection[Peer], peer: Peer, role: Role | None) -> None:
        """Raise ProtocolError if *peer* may not join as *role*."""
        if role == "worker" and not self.allow.allows(peer.uid, peer.gid):
            self._warn.warning(peer.uid, "refused worker pid %d uid %d gid %d: not allowed",
                               peer.pid, peer.uid, peer.gid)
            raise ProtocolError(f"uid {peer.uid} gid {peer.gid} may not receive the listeners; "
                                f"allowed: {self.allow.describe()}")
        if role == "worker" and peer.uid not in (0, os.getuid()):
            workers = sum(1 for p in peers if p.role == "worker" and p.uid == peer.uid)
            if workers >= self.max_workers_per_uid:
                self._warn.warning(peer.uid, "refused worker pid %d uid %d: it has %d workers "
                                   "already", peer.pid, peer.uid, workers)
                raise ProtocolError(f"too many workers from uid {peer.uid} (at most "
                                    f"{self.max_workers_per_uid})")
        if role == "ctl":
            ctls = sum(1 for p in peers if p.role == "ctl" and p.uid == peer.uid)
            if ctls >= self.max_ctl_per_uid:
                raise ProtocolError(f"too many fdctl connections from uid {peer.uid}")

    def _refuse_full(self, peers: Collection[Peer], conn: socket.socket, pid: int, uid: int,
                     limit: int) -> None:
        """Say why before closing: "no fdserver answered" would mislead."""
        busiest, count = collections.Counter(p.uid for p in peers).most_common(1)[0]
        reason = (f"fdserver is at its limit of {limit} connections for uid {uid} "
                  f"({len(peers)} open, {count} of them from uid {busiest})")
        self._warn.warning(uid, "refused pid %d uid %d: %s", pid, uid, reason)
        try:
            conn.send(encode({"type": "error", "message": reason}, MAX_ANSWER),
                      socket.MSG_DONTWAIT)
        except OSError:
            pass
        conn.close()

    def _evict(self, peer: Peer) -> None:
        self._warn.warning(peer.uid, "too many connections without a hello; closing the "
                           "oldest (pid %d uid %d)", peer.pid, peer.uid)
        peer.channel.close(None)       # logged above, at a bounded rate
