"""Who fdserver runs as, and who may receive its listeners.

fdserver needs root for one thing: binding ports below 1024.  With
``--user``/``--group`` it binds, creates its Unix socket, then drops to that
user and group for good: supplementary groups cleared, real, effective and
saved ids all changed, and the result checked (including that root cannot be
regained).  Everything it imports later must be imported before the drop.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass, field

from .errors import PrivilegeError


def uid_of(name: str) -> int:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise PrivilegeError(f"no such user: {name}") from None


def gid_of(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise PrivilegeError(f"no such group: {name}") from None


def primary_gid(user: str) -> int:
    try:
        return pwd.getpwnam(user).pw_gid
    except KeyError:
        raise PrivilegeError(f"no such user: {user}") from None


def drop(uid: int, gid: int) -> None:
    """Become uid:gid for good, with no supplementary groups; verify it."""
    if os.geteuid() != 0:
        if (os.getuid(), os.getgid()) == (uid, gid):
            return
        raise PrivilegeError(f"--user/--group need fdserver to start as root "
                             f"(it runs as uid {os.geteuid()})")
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot drop privileges to uid {uid} gid {gid}: "
                             f"{exc.strerror}") from None
    if (os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid)
            or (os.getgroups() not in ([], [gid]))):
        raise PrivilegeError(f"privilege drop did not take: uids {os.getresuid()}, "
                             f"gids {os.getresgid()}, groups {os.getgroups()}")
    if uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise PrivilegeError("privilege drop did not take: root could be regained")


@dataclass
class AllowList:
    """Which peers (by SO_PEERCRED uid/gid) may receive or hand back listeners.

    With a list, exactly the listed users and groups are allowed, and root:
    not fdserver's own user, which is often a shared one such as ``nobody``.
    An empty list allows every peer that can open the socket: its file mode
    and group are the gate (0660 by default, so only its owner and group can
    connect).
    """

    uids: set[int] = field(default_factory=set)
    gids: set[int] = field(default_factory=set)
    # uids named as members of an allowed group, resolved before the drop
    member_uids: set[int] = field(default_factory=set)

    @classmethod
    def from_names(cls, users: list[str], groups: list[str]) -> AllowList:
        allow = cls(uids={uid_of(u) for u in users}, gids={gid_of(g) for g in groups})
        for name in groups:
            try:
                members = grp.getgrnam(name).gr_mem
            except KeyError:
                members = []
            for member in members:
                try:
                    allow.member_uids.add(pwd.getpwnam(member).pw_uid)
                except KeyError:
                    pass
        return allow

    @property
    def restricted(self) -> bool:
        return bool(self.uids or self.gids)

    def allows(self, uid: int, gid: int) -> bool:
        if not self.restricted or uid == 0:
            return True
        return uid in self.uids or uid in self.member_uids or gid in self.gids

    def describe(self) -> str:
        parts = []
        if self.uids:
            parts.append("users " + ",".join(_user_name(u) for u in sorted(self.uids)))
        if self.gids:
            parts.append("groups " + ",".join(_group_name(g) for g in sorted(self.gids)))
        return "; ".join(parts) + " (and root)"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
