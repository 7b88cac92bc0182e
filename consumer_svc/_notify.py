"""systemd's notify protocol (sd_notify), with the standard library only.

A datagram to ``$NOTIFY_SOCKET`` (a unix socket path; a leading ``@`` means
the abstract namespace) carrying newline-separated ``KEY=VALUE`` lines. When
the variable is unset every call is a no-op, so the service behaves the same
under any other supervisor.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from twisted.logger import Logger

from ._secrets import redact

log = Logger(namespace="consumer_svc.notify")


class Notifier:
    """Sends state to systemd, if systemd asked for it."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        path = environ.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if path.startswith("@"):
            self.address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self.address = path
        #: Seconds between watchdog pings (half of $WATCHDOG_USEC), or None.
        self.watchdog_interval: float | None = None
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2_000_000
        self._socket: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> None:
        """Send ``READY=1``-style fields, e.g. ``notify(READY=1, STATUS="consuming q")``."""
        if self.address is None:
            return
        payload = "\n".join(f"{key}={redact(str(value))}" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.setblocking(False)
            self._socket.sendto(payload.encode(), self.address)
        except OSError as e:
            if not self._failed:  # say it once, not on every status line
                self._failed = True
                log.warn("Cannot notify systemd at $NOTIFY_SOCKET: {error}", error=str(e))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
