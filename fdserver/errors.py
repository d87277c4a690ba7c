"""Every error fdserver raises on purpose; the entry points print them as one line."""


class FdserverError(Exception):
    """Base class: something a user or operator can act on."""


class UsageError(FdserverError):
    """The command line asks for something that cannot work."""


class ProtocolError(FdserverError):
    """The peer sent something that is not a valid frame or message."""


class TransportError(FdserverError):
    """The connection failed below the protocol: EOF, truncation, I/O error."""


class BindError(FdserverError):
    """A --bind spec is malformed or its address cannot be bound."""


class AddressInUseError(BindError):
    """The address is bound by another socket (perhaps our own, held by workers)."""


class SocketFileError(FdserverError):
    """The Unix socket path cannot be used."""


class ConnectError(FdserverError):
    """No fdserver answered at the socket path; *reason*: why, in a few words."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class UntrustedServerError(ConnectError):
    """The process serving the socket path is not fdserver's expected user."""


class RefusedError(FdserverError):
    """fdserver answered, but with an error message."""


class AppError(FdserverError):
    """The MODULE:ATTR given to fdapp cannot be loaded as a Tornado app."""


class PrivilegeError(FdserverError):
    """A user or group is unknown, or dropping privileges failed."""


class ActivationError(FdserverError):
    """The socket-activation environment is malformed or not meant for us."""


class RollingRestartError(FdserverError):
    """A step of the rolling restart failed; later processes were left alone."""


class SupervisorFault(RollingRestartError):
    """supervisord answered a call with a fault; *fault* is its name (SPAWN_ERROR, ...)."""

    def __init__(self, message: str, fault: str) -> None:
        super().__init__(message)
        self.fault = fault


class TLSError(FdserverError):
    """A certificate, key or TLS setting cannot be used."""


class ReloadError(FdserverError):
    """fdserver refused a reload; the certificate in service stays."""
