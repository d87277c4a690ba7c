"""Entry points of the three console scripts: fdserver, fdapp, fdctl.

Only these functions read argv, set up logging and turn FdserverErrors into a
one-line message and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .certificates import Material

import setproctitle

from . import __version__
from .errors import ConnectError, FdserverError, ReloadError, UsageError

EXIT_ERROR = 1
# fdctl drain --wait: fdserver waits at most this long (fdserver.server).
MAX_DRAIN_WAIT = 3600.0


def _logging_flags(p: argparse.ArgumentParser) -> None:
    from .logconfig import LEVELS, level_name

    p.add_argument("--log-level", type=level_name, metavar="LEVEL",
                   help=f"least level logged: {', '.join(LEVELS)} (default: info); "
                        "applied after --log-config")
    p.add_argument("--log-config", metavar="FILE",
                   help="a logging.config configuration applied on top of the default: "
                        "a dictConfig dictionary in FILE.json (or FILE.yaml with PyYAML), "
                        "or an INI file for fileConfig (see docs/metrics.md)")


def _run(prog: str, body: Callable[[], int]) -> int:
    try:
        return body()
    except FdserverError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _octal(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0660") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text} is not a permission mode")
    return value


def _raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every registration, and every
    dispatched connection not yet read by its worker, holds a descriptor."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if math.isnan(value) or value == math.inf:
        raise argparse.ArgumentTypeError(f"{text} is not a finite number of seconds")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _above_zero(text: str) -> float:
    value = _positive(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return value


def _wait_seconds(text: str) -> float:
    value = _above_zero(text)
    if value > MAX_DRAIN_WAIT:
        raise argparse.ArgumentTypeError(f"{text} is more than {MAX_DRAIN_WAIT:g} (an hour)")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


# -- fdserver ---------------------------------------------------------------

def fdserver_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fdserver",
        description="Bind listening sockets once and hand them to app processes "
                    "that connect on a Unix socket.")
    p.add_argument("--bind", action="append", default=[], metavar="[NAME=]HOST:PORT",
                   help="address to listen on; repeatable; IPv6 as [::]:80; NAME (default "
                        "http) is what apps see. Not needed under systemd socket activation "
                        "(LISTEN_FDS), whose sockets are used instead")
    p.add_argument("--socket", required=True, metavar="PATH",
                   help="Unix socket app processes and fdctl connect to")
    p.add_argument("--user", metavar="NAME",
                   help="after binding and creating the socket, drop to this user for good "
                        "(start as root)")
    p.add_argument("--group", metavar="NAME",
                   help="group to drop to (default: the --user's primary group)")
    p.add_argument("--socket-mode", type=_octal, default=0o660, metavar="MODE",
                   help="permissions of the Unix socket (default 0660: owner and group)")
    p.add_argument("--socket-group", metavar="NAME",
                   help="group owning the Unix socket (default: --group)")
    p.add_argument("--allow-user", action="append", default=[], metavar="NAME",
                   help="a user whose processes may receive the listeners; repeatable")
    p.add_argument("--allow-group", action="append", default=[], metavar="NAME",
                   help="a group whose members may receive the listeners; repeatable. "
                        "With any --allow-*, exactly those users and groups (and root) may: "
                        "not fdserver's own --user. Without any "
                        "--allow-*, every process that can open the socket may: the socket's "
                        "mode and group are the gate, and with the default 0660 only its "
                        "owner and --socket-group can connect, so this is safe")
    p.add_argument("--backlog", type=int, default=1024,
                   help="listen backlog of each listener (default %(default)s)")
    p.add_argument("--dispatch", action="store_true",
                   help="accept connections here and pass each one to a ready worker (one "
                        "that has read all it was sent first, then the fewest open "
                        "connections: exact balance, one more hop), instead of letting the "
                        "workers accept on the shared listeners")
    p.add_argument("--unavailable-timeout", type=_positive, default=10.0, metavar="SECONDS",
                   help="with no ready worker, connections are answered 503 Service "
                        "Unavailable (Retry-After: 1, Connection: close) after this long. "
                        "Shared mode: once no worker has been ready for this long, fdserver "
                        "accepts on the listeners itself and answers every new connection "
                        "503 (those queued meanwhile too) until a worker is ready again. "
                        "With --dispatch: how long each connection waits in fdserver for a "
                        "ready worker (default %(default)s)")
    p.add_argument("--dispatch-timeout", dest="unavailable_timeout", type=_positive,
                   default=argparse.SUPPRESS, metavar="SECONDS",
                   help="the former name of --unavailable-timeout, still accepted")
    p.add_argument("--recover-timeout", type=_positive, default=10.0, metavar="SECONDS",
                   help="if a --bind address is in use, perhaps held by the workers of an "
                        "fdserver that died or was restarted, wait this long for a worker "
                        "to hand the listener back before failing; 0 fails at once "
                        "(default %(default)s)")
    p.add_argument("--max-connections", type=int, default=4096, metavar="N",
                   help="connections on the Unix socket at once, workers and fdctl together; "
                        "the last 64 (a quarter, if fewer than 256) are kept for root and "
                        "fdserver's own user, half of them also for the --allow-* users "
                        "(default %(default)s)")
    p.add_argument("--handshake-timeout", type=_positive, default=5.0, metavar="SECONDS",
                   help="close connections that send no hello in time (default %(default)s)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve GET /metrics (Prometheus) and GET /health on this address: "
                        "the counts of every worker of this host (needs "
                        "fdserver[metrics]; see docs/metrics.md)")
    tls = p.add_argument_group(
        "TLS", "fdserver reads the certificate and key (as root, before dropping "
               "privileges; on a reload as --user, e.g. with --group ssl-cert) and sends them "
               "to its workers: the app's user needs no access to the key file. "
               "fdctl reload or SIGHUP re-reads them")
    tls.add_argument("--certfile", metavar="PATH",
                     help="PEM certificate, followed by its chain (e.g. fullchain.pem)")
    tls.add_argument("--keyfile", metavar="PATH", help="PEM private key, unencrypted")
    tls.add_argument("--tls-listener", action="append", default=[], metavar="NAME",
                     help="serve TLS on the listener called NAME; repeatable (default: the "
                          "listener called https)")
    tls.add_argument("--ca-certs", metavar="PATH",
                     help="PEM CA certificates: require client certificates signed by them")
    tls.add_argument("--ciphers", metavar="LIST",
                     help="OpenSSL cipher list for TLS 1.2 (default: Python's, forward-secret "
                          "AEAD suites only)")
    p.add_argument("--proxy-protocol", action="append", default=[], metavar="NAME",
                   help="connections on the listener NAME start with a PROXY protocol "
                        "header (v1 or v2, HAProxy's send-proxy / send-proxy-v2): the app "
                        "sees the address it carries; a connection without one is closed. "
                        "Repeatable. Only for listeners that nothing but the balancer can "
                        "reach")
    agent = p.add_argument_group(
        "HAProxy agent-check", "answer HAProxy's agent-check with this host's ready "
        "capacity (docs/fleet.md)")
    agent.add_argument("--agent", metavar="HOST:PORT",
                       help="address to answer agent-checks on: 'up ready N%%' (N: ready "
                            "workers over --agent-capacity), 'down' with no ready worker, "
                            "'drain' after fdctl drain or while fdserver stops")
    agent.add_argument("--agent-capacity", type=_count, metavar="N",
                       help="workers that make the host whole (default: the most that were "
                            "ready at once in the last --agent-window)")
    agent.add_argument("--agent-window", type=_above_zero, default=600.0, metavar="SECONDS",
                       help="how long a peak of ready workers counts as the capacity "
                            "(default %(default)s)")
    agent.add_argument("--agent-linger", type=_positive, default=2.0, metavar="SECONDS",
                       help="on SIGTERM, answer 'drain' this long before stopping: set it "
                            "above HAProxy's agent-inter (default %(default)s)")
    agent.add_argument("--drain-file", metavar="PATH",
                       help="where fdctl drain is recorded, to last until fdctl undrain "
                            "across restarts: put it on persistent storage, e.g. "
                            "/var/lib/fdserver/drained (default: the --socket path "
                            "followed by .drained)")
    _logging_flags(p)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def fdserver_main(argv: Sequence[str] | None = None) -> int:
    args = fdserver_parser().parse_args(argv)

    def body() -> int:
        import os

        # Everything used after the privilege drop is imported here, first.
        from . import logconfig, privileges, systemd
        from .agent import Capacity, bind_agent
        from .hostdrain import DrainState
        from .listeners import bind_all, parse_bind
        from .recovery import Recovery
        from .server import Server
        from .socketfile import SocketFile

        specs = [parse_bind(spec) for spec in args.bind]
        agent_spec = None
        if args.agent:
            if "=" in args.agent:
                raise UsageError(f"--agent {args.agent}: expected HOST:PORT")
            try:
                agent_spec = parse_bind(args.agent)
            except FdserverError as exc:
                raise UsageError(str(exc).replace("--bind", "--agent", 1)) from None
        if args.drain_file is not None and not args.agent:
            raise UsageError(f"--drain-file {args.drain_file} needs --agent: the drain is "
                             "what the agent tells the balancer")
        if args.agent_capacity == 0:
            raise UsageError("--agent-capacity 0: at least 1")
        if args.max_connections < 16:
            raise UsageError(f"--max-connections {args.max_connections}: at least 16")
        if args.backlog < 1:
            raise UsageError(f"--backlog {args.backlog}: at least 1")
        if args.group and not args.user:
            raise UsageError("--group needs --user")
        uid = privileges.uid_of(args.user) if args.user else os.getuid()
        gid = (privileges.gid_of(args.group) if args.group
               else privileges.primary_gid(args.user) if args.user else None)
        socket_group = args.socket_group or args.group
        socket_gid = privileges.gid_of(socket_group) if socket_group else gid
        allow = privileges.AllowList.from_names(args.allow_user, args.allow_group)
        if args.metrics is not None:
            try:
                from . import exposition
            except ImportError as exc:
                raise UsageError(f"--metrics needs prometheus_client ({exc}): pip install "
                                 "'fdserver[metrics]'") from None
        logconfig.setup("fdserver", level=args.log_level, config=args.log_config)
        _raise_fd_limit()
        listeners = systemd.activated_listeners(os.environ)
        if listeners is not None and specs:
            raise UsageError(
                "--bind given, but systemd passed listening sockets (LISTEN_FDS); use one")
        if listeners is None and not specs:
            raise UsageError("nothing to serve: give --bind HOST:PORT")
        names = ([listener.name for listener in listeners] if listeners is not None
                 else [spec.name for spec in specs])
        _check_proxy_names(args.proxy_protocol, names, activated=listeners is not None)
        material = _tls_material(args, names)
        notifier = systemd.Notifier(os.environ)
        socket_file = SocketFile(args.socket, mode=args.socket_mode, group=socket_gid,
                                 owners=(uid,))
        metrics_socket = None
        try:
            if args.metrics is not None:
                metrics_socket = exposition.bind_metrics(args.metrics)
            recovery = None
            agent = None
            if agent_spec:
                agent = (bind_agent(args.agent, agent_spec),
                         Capacity(args.agent_capacity, args.agent_window),
                         DrainState(args.drain_file or socket_file.path + ".drained",
                                    owners=(uid,)))
            if listeners is None:
                listeners, in_use = bind_all(specs, args.backlog,
                                             defer_in_use=args.recover_timeout > 0)
                recovery = (Recovery(in_use, args.recover_timeout, args.backlog) if in_use
                            else None)
            setproctitle.setproctitle(
                " ".join(["fdserver", *(sys.argv[1:] if argv is None else argv)]))
            if args.user:
                assert gid is not None          # --user gives one
                privileges.drop(uid, gid)
        except BaseException:
            socket_file.close()
            if metrics_socket is not None:
                metrics_socket.close()
            raise
        _schedule_as_batch()
        Server(listeners, socket_file, handshake_timeout=args.handshake_timeout,
               max_peers=args.max_connections,
               allow=allow, notifier=notifier, recovery=recovery, dispatch=args.dispatch,
               unavailable_timeout=args.unavailable_timeout, tls=material,
               metrics_socket=metrics_socket, agent=agent, agent_linger=args.agent_linger,
               proxy_listeners=frozenset(args.proxy_protocol), backlog=args.backlog).run()
        return 0

    return _run("fdserver", body)


def _check_proxy_names(wanted: list[str], names: list[str], *, activated: bool) -> None:
    for name in wanted:
        if name not in names:
            how = (f"systemd passed {', '.join(names)}; FileDescriptorName={name} in the "
                   "socket unit names one" if activated
                   else f"--bind {name}=HOST:PORT names one")
            raise UsageError(f"--proxy-protocol {name}: no listener is called {name} ({how})")


def _tls_material(args: argparse.Namespace, names: list[str]) -> Material | None:
    """Read and check the certificate and key, before privileges are dropped."""
    from . import certificates, tls

    if bool(args.certfile) != bool(args.keyfile):
        raise UsageError("--certfile and --keyfile go together")
    files = None
    if args.certfile:
        if args.ciphers:
            certificates.ciphers_ok(args.ciphers)
        files = certificates.TLSFiles(
            args.certfile, args.keyfile, args.ca_certs, args.ciphers,
            frozenset(args.tls_listener or [certificates.DEFAULT_LISTENER]))
    elif args.ca_certs or args.ciphers:
        raise UsageError("--ca-certs and --ciphers need --certfile and --keyfile")
    certificates.check_names(files, names, args.tls_listener)
    if files is None:
        return None
    # The key will be in this process's memory: keep others of its user out.
    tls.not_dumpable()
    return certificates.read(files)


def _schedule_as_batch() -> None:
    """fdserver's wakeups do not preempt the workers.

    Under SCHED_BATCH the kernel lets the running worker finish its time
    slice instead of switching to fdserver as soon as a message or (in
    dispatch mode) a connection arrives.  On a busy machine fdserver then
    wakes less often and handles several at each wakeup, which saves context
    switches on both sides; on an idle core it still runs at once.  See the
    benchmarks: in dispatch mode it roughly halves fdserver's CPU per
    dispatched connection; in shared mode, where fdserver only reads load
    reports and sends shares, the workers serve 1-2% more with a TLS
    handshake per request.
    """
    import os
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError) as exc:       # not Linux, or refused
        logging.getLogger("fdserver").warning("cannot switch to SCHED_BATCH: %s", exc)


# -- fdapp ------------------------------------------------------------------

def fdapp_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fdapp",
        description="Run one Tornado app process on the listening sockets fdserver hands out.")
    p.add_argument("app", metavar="MODULE:ATTR",
                   help="a tornado.web.Application, a callable or async callable returning "
                        "one (called inside the event loop), or the app's own main() that "
                        "calls app.listen(): it is served on fdserver's listeners. The current "
                        "directory is importable. Arguments after -- are the app's own "
                        "sys.argv[1:] (for tornado.options)")
    p.add_argument("--socket", required=True, metavar="PATH", help="fdserver's Unix socket")
    p.add_argument("--connect-timeout", type=_positive, default=10.0, metavar="SECONDS",
                   help="keep trying to reach fdserver this long (default %(default)s)")
    p.add_argument("--server-user", metavar="NAME",
                   help="the user fdserver runs as, if neither root nor this process's user "
                        "(e.g. fdserver under systemd socket activation): the process "
                        "serving --socket must be one of those before this process "
                        "registers with it or hands it a listener")
    p.add_argument("--graceful-timeout", type=_positive, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, wait this long for open connections (default %(default)s)")
    p.add_argument("--keepalive-grace", type=_positive, default=1.0, metavar="SECONDS",
                   help="while draining, close a keep-alive connection once idle this long "
                        "(default %(default)s)")
    p.add_argument("--no-balance", action="store_true",
                   help="accept like plain Tornado, as many connections as are queued, "
                        "instead of holding back while this process has more than its "
                        "share (shared mode), nor close keep-alive connections when "
                        "fdserver asks, to even out the load (see docs/modes.md)")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                   help="the event loop: asyncio's own, or uvloop (faster; pip install "
                        "'fdserver[uvloop]') (default %(default)s)")
    p.add_argument("--access-log", action="store_true",
                   help="log every request, one line each, through the logger "
                        "fdserver.access to stderr (off by default: it costs throughput)")
    p.add_argument("--access-log-format", choices=("text", "json"), default="text",
                   help="text: PID LISTENER CLIENT \"METHOD PATH\" STATUS BYTES DURATIONms; "
                        "json: one JSON object a line (default %(default)s)")
    _logging_flags(p)
    p.add_argument("--xheaders", action="store_true",
                   help="take the client's address and scheme from X-Real-Ip/X-Forwarded-For "
                        "and X-Scheme/X-Forwarded-Proto, from the peers in "
                        "--forwarded-allow-ips only")
    p.add_argument("--forwarded-allow-ips", metavar="LIST",
                   help="comma-separated IPs and networks of the proxies whose X-Forwarded-For "
                        "is believed (implies --xheaders); * for any peer (default with "
                        "--xheaders: 127.0.0.1,::1)")
    p.add_argument("--timeout", type=_positive, metavar="SECONDS",
                   help="if the event loop has not run for this long (a handler blocks it), "
                        "write every thread's stack to the log and exit 1, so that the "
                        "supervisor restarts the process (default: never)")
    p.add_argument("--max-requests", type=_count, metavar="N",
                   help="after N requests (plus --max-requests-jitter), drain and exit 0 so "
                        "that the supervisor starts a fresh process; fdserver lets one "
                        "worker of the host do so at a time (default: never)")
    p.add_argument("--max-requests-jitter", type=_count, default=0, metavar="J",
                   help="add a random 0..J to --max-requests, so that workers started "
                        "together do not recycle together (default %(default)s)")
    p.add_argument("--shutdown-timeout", type=_positive, default=5.0, metavar="SECONDS",
                   help="after the drain, time for the app's shutdown hooks "
                        "(fdserver.on_shutdown) in all (default %(default)s)")
    http = p.add_argument_group(
        "HTTPServer settings", "Tornado's HTTPServer options, for a server fdapp makes (a "
        "main() that makes its own HTTPServer sets them itself)")
    http.add_argument("--max-body-size", type=int, metavar="BYTES",
                      help="largest request body (Tornado's default: 100 MB)")
    http.add_argument("--max-buffer-size", type=int, metavar="BYTES",
                      help="most bytes buffered per connection (Tornado's default: 100 MB)")
    http.add_argument("--idle-connection-timeout", type=_positive, metavar="SECONDS",
                      help="close a keep-alive connection idle this long (Tornado's default: "
                           "3600)")
    http.add_argument("--body-timeout", type=_positive, metavar="SECONDS",
                      help="longest time to read a request body (Tornado's default: none)")
    http.add_argument("--decompress-request", action="store_true",
                      help="decompress gzip request bodies")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def fdapp_main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)     # after it: the app's own
    args = fdapp_parser().parse_args(argv[:cut])
    app_argv = argv[cut + 1:]

    def body() -> int:
        import os
        import signal

        from .tls import not_dumpable

        # First of all: a worker may be sent the TLS key, and a process of its
        # user that opened /proc/PID/mem before this would keep reading it.
        not_dumpable()

        # Until the worker's loop takes the signals over, a stop request just
        # ends the process cleanly: nothing has been served yet.
        signal.signal(signal.SIGTERM, _stopped_during_start_up)
        from .forwarded import DEFAULT, TrustedProxies

        xheaders = args.xheaders or args.forwarded_allow_ips is not None
        trusted = TrustedProxies.parse(args.forwarded_allow_ips or DEFAULT) if xheaders else None

        from . import logconfig
        from .client import Registration, register, trusted_server_uids
        from .loader import load_app
        from .loops import loop_factory
        from .privileges import uid_of
        from .runner import Worker, features
        from .systemd import Notifier

        loop = loop_factory(args.loop)      # before the app loads: a missing uvloop says so
        server_uids = trusted_server_uids(uid_of(args.server_user) if args.server_user else None)
        # Tornado's own access log: its warnings (4xx) and errors (5xx) only,
        # and nothing with --access-log, whose lines say it all.
        logging.getLogger("tornado.access").setLevel(
            logging.CRITICAL + 1 if args.access_log else logging.WARNING)
        logconfig.setup("fdapp", level=args.log_level, config=args.log_config,
                        access_log=args.access_log_format if args.access_log else None)
        # The app's own command line, as if it ran by itself (tornado.options).
        sys.argv = [args.app, *app_argv]
        target = load_app(args.app)

        def registration() -> Registration:
            def attempt(timeout: float) -> Registration:
                return register(args.socket, connect_timeout=timeout,
                                features=features(not args.no_balance),
                                server_uids=server_uids)
            try:
                return attempt(0)
            except ConnectError as exc:
                if args.connect_timeout <= 0 or not exc.reason:
                    raise           # no waiting asked for, or someone answered, wrongly
                # Started before fdserver: say what it waits for, not nothing.
                logging.getLogger("fdapp").info("waiting up to %gs for fdserver at %s (%s)",
                                                args.connect_timeout, args.socket, exc.reason)
            return attempt(args.connect_timeout)

        title = f"fdapp {args.app} --socket {args.socket}"
        setproctitle.setproctitle(title)
        # Under systemd (Type=notify), `systemctl restart fdapp@N` returns only
        # once the replacement is ready: a rolling restart is a plain loop.
        notifier = Notifier(os.environ)
        sd_states = {"ready": "READY=1", "draining": "STOPPING=1"}

        def on_state(state: str) -> None:
            setproctitle.setproctitle(f"{title} [{state}]")
            notifier.notify(sd_states[state], f"STATUS={state}")

        options = {"xheaders": xheaders, "forwarded_allow_ips": trusted,
                   "decompress_request": args.decompress_request,
                   **{name: value for name in ("max_body_size", "max_buffer_size",
                                               "idle_connection_timeout", "body_timeout")
                      if (value := getattr(args, name)) is not None}}
        worker = Worker(args.app, target, registration, graceful_timeout=args.graceful_timeout,
                        keepalive_grace=args.keepalive_grace, on_state=on_state,
                        server_options=options, balance=not args.no_balance,
                        timeout=args.timeout, shutdown_timeout=args.shutdown_timeout,
                        max_requests=args.max_requests,
                        max_requests_jitter=args.max_requests_jitter,
                        access_log_format=args.access_log_format if args.access_log else None,
                        loop_factory=loop)
        return worker.run()

    return _run("fdapp", body)


def _stopped_during_start_up(signum: int, frame: object) -> None:
    raise SystemExit(0)


# -- fdctl ------------------------------------------------------------------

def fdctl_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fdctl", description="Operate a running fdserver.")
    p.add_argument("--socket", metavar="PATH",
                   help="fdserver's Unix socket (required; before or after the command)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # After the command too: "fdctl status --socket PATH" is what people type.
    socket_too = argparse.ArgumentParser(add_help=False)
    socket_too.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                            help="fdserver's Unix socket")
    subparsers = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, what: str) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, help=what, parents=[socket_too])
    status = command("status", "listeners and workers, with their states")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    drain = command(
        "drain", "take this host out of the balancer's rotation: fdserver's agent answers "
                 "'drain' (open connections carry on) until undrain, across fdserver restarts")
    drain.add_argument("--wait", type=_wait_seconds, metavar="SECONDS",
                       help="return once every balancer that asked the agent in the last "
                            "minute has been told (it then sends no new request), or fail "
                            "after SECONDS (at most 3600)")
    command("undrain", "put this host back into the balancer's rotation")
    rolling = command(
        "rolling-restart",
        "restart app processes one at a time through supervisord, each only after the "
        "previous replacement reported ready")
    rolling.add_argument("--supervisor", required=True, metavar="URL",
                         help="supervisord's server URL: unix:///path/supervisor.sock "
                              "or http://host:port")
    rolling.add_argument("--group", metavar="NAME",
                         help="only this supervisord group (default: every supervisord "
                              "process that is a worker registered with fdserver)")
    rolling.add_argument("--ready-timeout", type=_positive, default=60.0, metavar="SECONDS",
                         help="give up if a replacement is not ready this long after its "
                              "start (default %(default)s)")
    command("reload", "re-read the TLS certificate and key and put them in service in every "
                      "worker, with no restart (as SIGHUP); if they fail the checks, the ones in "
                      "service stay")
    return p


def fdctl_main(argv: Sequence[str] | None = None) -> int:
    parser = fdctl_parser()
    args = parser.parse_args(argv)
    if not args.socket:
        parser.error("the following arguments are required: --socket")

    def body() -> int:
        from .ctl import Control, format_status

        if args.command == "status":
            with Control(args.socket) as control:
                status = control.status()
            print(json.dumps(status, indent=2) if args.json else format_status(status))
            return 0
        if args.command in ("drain", "undrain"):
            return _drain(args)
        if args.command == "rolling-restart":
            return _rolling_restart(args)
        if args.command == "reload":
            with Control(args.socket) as control:
                ok, said = control.reload()
            if not ok:
                raise ReloadError(f"reload failed: {said}")
            print(said)
            return 0
        raise AssertionError(args.command)

    return _run("fdctl", body)


def _drain(args: argparse.Namespace) -> int:
    from .ctl import Control

    wait = getattr(args, "wait", None)
    with Control(args.socket, timeout=10.0 + (wait or 0)) as control:
        answer = control.drain(args.command == "drain", wait)
    if not answer.get("persisted", True):
        print("fdctl: warning: fdserver could not record the state: it holds until "
              "fdserver restarts (see fdserver's log)", file=sys.stderr)
    if args.command == "undrain":
        print("undrained: the agent answers with the host's ready capacity again")
        return 0
    told = answer.get("told") or []
    waiting = answer.get("waiting") or []
    if wait is None:
        print("drained: the agent answers 'drain' until fdctl undrain")
        return 0
    if waiting:
        print(f"fdctl: error: after {wait:g}s, not told yet: {', '.join(waiting)} "
              f"(told: {', '.join(told) or 'none'}); the host stays drained until fdctl "
              "undrain", file=sys.stderr)
        return EXIT_ERROR
    print(f"drained; told {', '.join(told)}" if told else
          "drained; no balancer asked the agent in the last minute")
    return 0


def _rolling_restart(args: argparse.Namespace) -> int:
    import time

    from .rolling import Step, Supervisor, rolling_restart

    started = time.monotonic()

    def progress(step: Step) -> None:
        print(f"{step.name}: {step.old_pid} → {step.new_pid} ready in {step.seconds:.1f}s",
              flush=True)

    steps = rolling_restart(args.socket, Supervisor(args.supervisor), group=args.group,
                            ready_timeout=args.ready_timeout, progress=progress)
    print(f"rolling restart done: {len(steps)} processes replaced in "
          f"{time.monotonic() - started:.1f}s")
    return 0
