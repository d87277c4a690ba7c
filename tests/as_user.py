"""Run an fdserver entry point as another user: ``as_user.py USER ENTRY ARGS...``.

Started as root, it imports everything the entry point needs, then drops to
USER for good (groups, then gid, then uid) and calls ``fdserver.cli.ENTRY``.
Importing first matters: the interpreter's own files may not be readable by
USER, and the project may live under a folder USER cannot enter.
"""

import os
import pwd
import sys

import tornado.httpserver  # noqa: F401
import tornado.web  # noqa: F401  (imported before the drop)

import fdserver.cli
import fdserver.client  # noqa: F401
import fdserver.ctl  # noqa: F401
import fdserver.listeners  # noqa: F401
import fdserver.loader
import fdserver.runner  # noqa: F401
import fdserver.server  # noqa: F401
import fdserver.socketfile  # noqa: F401


def main() -> int:
    user, entry, *args = sys.argv[1:]
    record = pwd.getpwnam(user)
    if args and ":" in args[0] and entry == "fdapp_main":
        # Load the app now, while its files are readable.
        fdserver.loader.load_app(args[0])
    os.setgroups([])
    os.setresgid(record.pw_gid, record.pw_gid, record.pw_gid)
    os.setresuid(record.pw_uid, record.pw_uid, record.pw_uid)
    return getattr(fdserver.cli, entry)(args)


if __name__ == "__main__":
    sys.exit(main())
