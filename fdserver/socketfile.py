"""The Unix socket fdserver listens on: created safely, removed only if ours.

Rules (the threat model is in docs/security.md):

* the socket's folder, and every folder above it, must not let anyone but
  root or fdserver's own user replace the path (OpenSSH's StrictModes): a
  user who could would bind the path while fdserver restarts and receive
  the workers' listeners;
* never replace something that is not a socket, nor a socket a live process
  still accepts on, nor a stale socket another user owns;
* never follow a link, and never change the owner or mode of anything but
  the socket just created: it is bound in a private folder (0700, inside the
  socket's folder) with its final mode from the umask, its group is set
  there, and only then is it linked into place, which fails rather than
  replace whatever appeared at the path meanwhile.

The checks and the bind happen under an flock on the folder, so two
fdservers started at once cannot both decide the path is free.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import secrets
import socket
import stat
from collections.abc import Callable, Collection, Iterator

from .errors import SocketFileError
from .transport import peer_credentials

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_PATH_BYTES = 107
_BOUND_NAME = "s"          # the socket's name inside the private folder


class SocketFile:
    """A listening AF_UNIX socket at *path*, created by this process.

    *owners* are the uids trusted to own the folders on the way to *path* and
    a stale socket at it: root, this process's user and the user fdserver
    drops to.  *on_created* is a seam for tests: it is called with the bound
    socket's path (in the private folder) before its owner is set.
    """

    def __init__(self, path: str, *, mode: int = 0o660, group: int | None = None,
                 backlog: int = 128, owners: Collection[int] = (),
                 on_created: Callable[[str], None] | None = None) -> None:
        if len(os.fsencode(os.path.abspath(path))) > MAX_PATH_BYTES:
            raise SocketFileError(f"socket path {path} is longer than {MAX_PATH_BYTES} bytes")
        # The folder as the kernel resolves it: abspath() would drop a ".."
        # that follows a symlink, and check one folder while peers reach another.
        folder, name = os.path.split(path)
        if not name:
            raise SocketFileError(f"socket path {path} names a folder, not a socket")
        folder = os.path.realpath(folder or ".")
        self.path = os.path.join(folder, name)
        trusted = {0, os.geteuid(), *owners}
        check_folder(folder, trusted)
        with _named(folder):
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            _clear_stale(self.path, dir_fd, name, trusted)
            self.sock, self._identity = _bind(self.path, dir_fd, name, mode, group, backlog,
                                              on_created)
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


def check_folder(folder: str, trusted: Collection[int]) -> None:
    """Refuse a socket folder whose entries someone untrusted could replace.

    The folder itself must belong to a trusted uid and be writable by its
    owner only.  Each folder above it must belong to a trusted uid too, and
    if others may write to it, be sticky (like /tmp) while the entry under
    it belongs to a trusted uid: then nobody else can rename or remove it.
    Symbolic links on the way are checked where they stand, then followed.
    """
    folder = os.path.abspath(folder)
    with _named(folder):
        st = os.stat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise SocketFileError(f"socket folder {folder} is not a folder")
    if st.st_uid not in trusted:
        raise SocketFileError(
            f"socket folder {folder} belongs to {_user(st.st_uid)}, who could replace the "
            f"socket; use a folder owned by root or fdserver's user (e.g. /run/fdserver)")
    if st.st_mode & 0o022:
        raise SocketFileError(
            f"socket folder {folder} is writable by users other than its owner (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): another user could take over the socket path; "
            f"use a folder only root or fdserver's user can write to (e.g. /run/fdserver, "
            f"mode 0750)")
    check_ancestors(folder, trusted)


def check_ancestors(folder: str, trusted: Collection[int], label: str = "socket folder") -> None:
    """Refuse *folder* (a socket folder, or what *label* says) if a folder
    above it could let someone untrusted replace it (see check_folder), on
    the path as given and as the kernel resolves it."""
    for path in {folder, os.path.realpath(folder)}:
        _check_ancestors(path, trusted, label)


def _check_ancestors(path: str, trusted: Collection[int], label: str) -> None:
    child = path
    while True:
        parent = os.path.dirname(child)
        try:
            child_st = os.lstat(child)
            parent_st = os.stat(parent)
        except OSError as exc:
            raise SocketFileError(f"{label} {path}: cannot check {child}: "
                                  f"{exc.strerror}") from None
        if parent_st.st_uid not in trusted:
            raise SocketFileError(
                f"{label} {path}: {parent} belongs to {_user(parent_st.st_uid)}, who "
                f"could replace {child}")
        if parent_st.st_mode & 0o022 and not (parent_st.st_mode & stat.S_ISVTX
                                              and child_st.st_uid in trusted):
            raise SocketFileError(
                f"{label} {path}: {parent} is writable by users other than its owner (mode "
                f"{stat.S_IMODE(parent_st.st_mode):04o}), so {child} could be replaced")
        if parent == child or parent == "/":
            return
        child = parent


def _clear_stale(path: str, dir_fd: int, name: str, trusted: Collection[int]) -> None:
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a socket"
        raise SocketFileError(f"{path} exists and is {kind}; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    # Through a descriptor of the file itself: a short path, whatever its own length.
    file_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        probe.connect(f"/proc/self/fd/{file_fd}")
    except ConnectionRefusedError:
        pass           # stale: a socket file nobody listens on (a crashed server left it)
    except (BlockingIOError, TimeoutError):
        raise SocketFileError(f"{path} is in use: a live server's backlog is full") from None
    except OSError as exc:
        raise SocketFileError(f"{path}: cannot check the existing socket: "
                              f"{exc.strerror or exc}") from None
    else:
        pid = peer_credentials(probe)[0]
        raise SocketFileError(f"{path} is in use by a live server (pid {pid}); "
                              "refusing to take it over")
    finally:
        probe.close()
        os.close(file_fd)
    if st.st_uid not in trusted:
        raise SocketFileError(f"{path} is a stale socket of {_user(st.st_uid)}; refusing to "
                              "remove another user's file (remove it yourself if it is safe)")
    os.unlink(name, dir_fd=dir_fd)


def _bind(path: str, dir_fd: int, name: str, mode: int, group: int | None, backlog: int,
          on_created: Callable[[str], None] | None) -> tuple[socket.socket, tuple[int, int]]:
    # A private folder next to the path: nobody else can swap anything in it.
    private = f".fdserver-{secrets.token_hex(4)}"
    try:
        os.mkdir(private, 0o700, dir_fd=dir_fd)
    except OSError as exc:
        reason = "permission denied" if exc.errno == errno.EACCES else exc.strerror
        raise SocketFileError(f"cannot create socket {path}: {reason}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    private_fd = -1
    try:
        private_fd = os.open(private, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                             dir_fd=dir_fd)
        bound = f"/proc/self/fd/{private_fd}/{_BOUND_NAME}"
        # The umask gives the final mode at bind(): no chmod, never looser.
        old_umask = os.umask(~mode & 0o777)
        try:
            sock.bind(bound)
        finally:
            os.umask(old_umask)
        if on_created:
            on_created(bound)
        if group is not None:
            os.chown(_BOUND_NAME, -1, group, dir_fd=private_fd, follow_symlinks=False)
        st = os.stat(_BOUND_NAME, dir_fd=private_fd, follow_symlinks=False)
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketFileError(f"cannot create socket {path}: the bound file changed")
        sock.listen(backlog)     # ready before anyone can reach it
        try:
            os.link(_BOUND_NAME, name, src_dir_fd=private_fd, dst_dir_fd=dir_fd,
                    follow_symlinks=False)
        except FileExistsError:
            raise SocketFileError(f"cannot create socket {path}: something else appeared at "
                                  "that path meanwhile; refusing to replace it") from None
        sock.setblocking(False)
        return sock, (st.st_dev, st.st_ino)
    except OSError as exc:
        sock.close()
        reason = "permission denied" if exc.errno == errno.EACCES else exc.strerror
        raise SocketFileError(f"cannot create socket {path}: {reason}") from None
    except BaseException:
        sock.close()
        raise
    finally:
        if private_fd >= 0:
            try:
                os.unlink(_BOUND_NAME, dir_fd=private_fd)
            except FileNotFoundError:
                pass
            os.close(private_fd)
        os.rmdir(private, dir_fd=dir_fd)


@contextlib.contextmanager
def _named(folder: str) -> Iterator[None]:
    """Turn the errors of opening the socket folder into one line naming it."""
    try:
        yield
    except FileNotFoundError:
        raise SocketFileError(f"socket folder {folder} does not exist") from None
    except NotADirectoryError:
        raise SocketFileError(f"socket folder {folder} is not a folder") from None
    except PermissionError:
        raise SocketFileError(f"socket folder {folder}: permission denied") from None


def _user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
