"""The Unix socket fdserver listens on: created safely, removed only if ours.

Rules: never replace something that is not a socket, never take over a socket
a live process still accepts on, replace a stale one (nobody listening).  The
check and the bind happen under an flock on the folder, so two fdservers
started at once cannot both decide the path is free.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from typing import Callable

from .errors import SocketFileError
from .transport import peer_credentials

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_PATH_BYTES = 107


class SocketFile:
    """A listening AF_UNIX socket at *path*, created by this process."""

    def __init__(self, path: str, *, mode: int = 0o660, group: int | None = None,
                 backlog: int = 128, on_created: Callable[[str], None] | None = None) -> None:
        self.path = os.path.abspath(path)
        if len(os.fsencode(self.path)) > MAX_PATH_BYTES:
            raise SocketFileError(f"socket path {path} is longer than {MAX_PATH_BYTES} bytes")
        folder = os.path.dirname(self.path)
        try:
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise SocketFileError(f"socket folder {folder} does not exist") from None
        except NotADirectoryError:
            raise SocketFileError(f"socket folder {folder} is not a folder") from None
        except PermissionError:
            raise SocketFileError(f"socket folder {folder}: permission denied") from None
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            _clear_stale(self.path)
            self.sock = _bind(self.path, mode, group, backlog, on_created)
            st = os.lstat(self.path)
            self._identity = (st.st_dev, st.st_ino)
        finally:
            os.close(dir_fd)

    def remove(self) -> str | None:
        """Unlink the path if it is still the socket this process created.

        Returns why it could not, if it could not (after dropping privileges
        the folder may not be writable any more; the next fdserver then finds
        the file stale and replaces it).
        """
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            return f"cannot remove {self.path}: {exc.strerror}"
        return None

    def close(self) -> str | None:
        self.sock.close()
        return self.remove()


def _clear_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a socket"
        raise SocketFileError(f"{path} exists and is {kind}; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        # Stale: a socket file nobody listens on (a crashed server left it).
        os.unlink(path)
        return
    except (BlockingIOError, TimeoutError, socket.timeout):
        raise SocketFileError(f"{path} is in use: a live server's backlog is full") from None
    except OSError as exc:
        raise SocketFileError(f"{path}: cannot check the existing socket: {exc.strerror}") from None
    else:
        pid = peer_credentials(probe)[0]
        raise SocketFileError(f"{path} is in use by a live server (pid {pid}); "
                              "refusing to take it over")
    finally:
        probe.close()


def _bind(path: str, mode: int, group: int | None, backlog: int,
          on_created: Callable[[str], None] | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # umask 0o177: the file is born 0600, so it never exists looser than asked.
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        reason = "permission denied" if exc.errno == errno.EACCES else exc.strerror
        raise SocketFileError(f"cannot create socket {path}: {reason}") from None
    finally:
        os.umask(old_umask)
    if on_created:
        on_created(path)         # a seam for tests: the file as first created
    try:
        # Group first, then mode: never readable by a group it was not meant for.
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)
    except OSError as exc:
        sock.close()
        os.unlink(path)
        raise SocketFileError(f"cannot set owner/mode of {path}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
