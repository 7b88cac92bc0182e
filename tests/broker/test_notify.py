"""systemd's notify protocol through a real broker: READY only once consuming, WATCHDOG pings,
STOPPING at stop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest_twisted
from support.service_support import settings_for
from support.waiting import eventually, within
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IReactorUNIXDatagram
from twisted.internet.protocol import DatagramProtocol

from consumer_svc._notify import Notifier
from consumer_svc._service import ConsumerService
from consumer_svc._states import State
from consumer_svc.testing.rabbitmq import RabbitNode


class Systemd(DatagramProtocol):
    """What a service manager would receive on $NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.messages: list[dict[str, str]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.messages.append(fields)

    def seen(self, key: str) -> list[str]:
        return [m[key] for m in self.messages if key in m]


@pytest_twisted.ensureDeferred
async def test_ready_only_once_consuming_and_stopping_at_stop(
    rabbit: RabbitNode, queue_name: str, tmp_path: Path
) -> None:
    """READY=1 comes after the consumer is registered, never before; WATCHDOG=1 pings while healthy; STOPPING=1 at stop."""
    systemd = Systemd()
    path = str(tmp_path / "notify")
    port = cast(IReactorUNIXDatagram, reactor).listenUNIXDatagram(path, systemd, 8192, 0o666)
    states_at_ready: list[State] = []
    try:

        class Watched(Notifier):
            """The real notifier, noting the service's state whenever it sends READY."""

            def notify(self, **fields: str | int) -> None:
                if "READY" in fields:
                    states_at_ready.append(service.state)
                super().notify(**fields)

        notifier = Watched({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "300000"})
        service = ConsumerService(
            settings_for(rabbit.url(), queue_name),
            lambda m: None,
            exit=lambda s: None,
            notifier=notifier,
        )
        service.startService()
        await eventually(lambda: systemd.seen("READY"), timeout=20, what="READY=1")
        assert states_at_ready == [State.CONSUMING]
        statuses = systemd.seen("STATUS")
        assert statuses[0].startswith("Connecting to 127.0.0.1:")
        assert f"Consuming queue {queue_name}" in statuses
        await eventually(
            lambda: len(systemd.seen("WATCHDOG")) >= 3, timeout=5, what="watchdog pings"
        )
        await within(30, service.stopService())
        await eventually(lambda: systemd.seen("STOPPING"), timeout=5, what="STOPPING=1")
        await eventually(
            lambda: systemd.seen("STATUS")[-1] == "Stopped", timeout=5, what="STATUS=Stopped"
        )
    finally:
        await within(5, maybeDeferred(port.stopListening))
