"""Whether the host is drained (``fdctl drain``), kept until ``fdctl undrain``.

The state lives in a small file, ``--drain-file`` (default
``<socket>.drained``, next to fdserver's socket; only with ``--agent``: a
drain is what the agent tells the balancer).  It must outlive whatever stops
the host: under systemd the shipped unit puts it in ``/var/lib/fdserver``
(``StateDirectory=``), since ``/run/fdserver`` is removed on ``systemctl
stop`` and at a reboot.  fdserver opens (or creates) it at start-up, before
it drops privileges, and keeps the descriptor, so that it can still rewrite
it afterwards in a folder it may no longer write to.  Empty means in
rotation; anything else means drained (a damaged file must never undo a
drain).

Opened with care, since fdserver may run as root there: the folder must
belong to root or fdserver's user and be writable by its owner only, and
the folders above it checked as the socket's are; the
file is never followed through a symbolic link, and a file fdserver did not
create is used only if it is a regular file of root or fdserver's user with
no other name (a hard link could point at any file).  fdserver never changes
the mode of, nor removes, a file it did not create.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Collection

from .errors import FdserverError
from .socketfile import check_ancestors

log = logging.getLogger("fdserver")

MARK = b"drained\n"


class DrainState:
    """The drained state in the file at *path*; *owners*: uids trusted besides root
    and this process's (fdserver's --user)."""

    def __init__(self, path: str, owners: Collection[int] = ()) -> None:
        self.path = path
        self._fd = _open(path, {0, os.geteuid(), *owners})
        try:
            content = os.pread(self._fd, 64, 0)
        except OSError:
            content = MARK
        self.drained = bool(content.strip())
        if self.drained:
            log.info("host drained (%s says so): the agent answers 'drain' until "
                     "fdctl undrain", self.path)

    def set(self, drained: bool) -> bool:
        """Record the state; False if it could not be written (it holds until restart)."""
        self.drained = drained
        try:
            os.ftruncate(self._fd, 0)
            if drained:
                os.pwrite(self._fd, MARK, 0)
            os.fsync(self._fd)
        except OSError as exc:
            log.warning("cannot record the drain state in %s: %s", self.path, exc.strerror)
            return False
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _open(path: str, trusted: set[int]) -> int:
    def refuse(why: str) -> FdserverError:
        return FdserverError(f"--drain-file {path}: {why}")

    folder, name = os.path.split(os.path.abspath(path))
    if not name:
        raise refuse("names a folder, not a file")
    try:
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise refuse(f"folder {folder}: {_cause(exc)}") from None
    try:
        # The folders above too, as for the socket: one another user may
        # write to could swap this folder for a link to any other.
        check_ancestors(folder, trusted, f"--drain-file {path}: folder")
        st = os.fstat(dir_fd)
        if st.st_uid not in trusted:
            raise refuse(f"folder {folder} belongs to uid {st.st_uid}, who could replace "
                         "the file; use a folder of root or fdserver's user "
                         "(e.g. /var/lib/fdserver)")
        if st.st_mode & 0o022:
            raise refuse(f"folder {folder} is writable by users other than its owner (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}), who could replace the file; "
                         "use one only its owner can write to (e.g. /var/lib/fdserver)")
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            return os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise refuse(f"cannot create it: {_cause(exc)}") from None
        try:
            fd = os.open(name, flags, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise refuse("is a symbolic link; refusing to follow it") from None
            raise refuse(f"cannot open it: {_cause(exc)}") from None
    finally:
        os.close(dir_fd)
    st = os.fstat(fd)
    why = ("is not a regular file" if not stat.S_ISREG(st.st_mode)
           else f"belongs to uid {st.st_uid}, neither root nor fdserver's user"
           if st.st_uid not in trusted
           else "has other names (hard links)" if st.st_nlink != 1 else None)
    if why:
        os.close(fd)
        raise refuse(f"{why}; refusing to use it")
    return fd


def _cause(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()
