"""The public API is small and pinned; the client side imports no daemon code."""

import subprocess
import sys

import fdserver


def test_public_api_is_pinned():
    assert sorted(fdserver.__all__) == [
        "FdserverError", "ReceivedListener", "Registration", "__version__", "draining",
        "listener_of", "on_shutdown", "register"]
    for name in fdserver.__all__:
        assert hasattr(fdserver, name)


def test_client_imports_standalone():
    # An app process that only registers must not pull in the daemon or Tornado.
    code = ("import sys, fdserver.client; "
            "print(sorted(m for m in sys.modules if m.startswith(('fdserver', 'tornado'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(sorted([
        "fdserver", "fdserver._openssl", "fdserver.client", "fdserver.errors", "fdserver.lifecycle",
        "fdserver.protocol", "fdserver.tls", "fdserver.transport"]))
