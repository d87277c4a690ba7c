"""fdserver: hand a privileged daemon's listening sockets to Tornado app processes.

The public API: what an app process needs to get its sockets without
``fdapp`` (``register``), and what an app under fdapp may learn of its
process's life (``draining``, ``on_shutdown``) and of a request
(``listener_of``: the listener it came on).  The daemon, runner and
control tool are reached through their console scripts (``fdserver``,
``fdapp``, ``fdctl``).
"""

__version__ = "0.2.0.dev0"

from .client import ReceivedListener, Registration, register  # noqa: E402
from .errors import FdserverError  # noqa: E402
from .lifecycle import draining, on_shutdown  # noqa: E402
from .tls import listener_of  # noqa: E402

__all__ = ["FdserverError", "ReceivedListener", "Registration", "__version__", "draining",
           "listener_of", "on_shutdown", "register"]
