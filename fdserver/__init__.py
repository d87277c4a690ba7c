"""fdserver: hand a privileged daemon's listening sockets to Tornado app processes.

The public API is what an app process needs to get its sockets without
``fdapp``; the daemon, runner and control tool are reached through their
console scripts (``fdserver``, ``fdapp``, ``fdctl``).
"""

__version__ = "0.1.0"

from .client import ReceivedListener, Registration, register  # noqa: E402
from .errors import FdserverError  # noqa: E402

__all__ = ["FdserverError", "ReceivedListener", "Registration", "__version__", "register"]
