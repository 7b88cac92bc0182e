"""systemd's notify protocol, without a broker: where to send, and when to ping the watchdog."""

from __future__ import annotations

import socket

from consumer_svc._notify import Notifier


def test_the_abstract_namespace_is_understood() -> None:
    """NOTIFY_SOCKET=@name means an abstract unix socket."""
    name = f"consumer-svc-test-{id(object())}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(b"\0" + name.encode())
    listener.settimeout(5)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.notify(READY=1, STATUS="hello")
        assert listener.recv(1024) == b"READY=1\nSTATUS=hello"
        notifier.close()
    finally:
        listener.close()


def test_without_notify_socket_nothing_happens() -> None:
    """Under another supervisor the calls are no-ops."""
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.notify(READY=1)
    assert notifier.watchdog_interval is None


def test_the_watchdog_interval_is_half_of_watchdog_usec() -> None:
    """WATCHDOG_USEC=4000000 asks for a ping every 2 s; another pid's watchdog is not ours."""
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000"}).watchdog_interval == 2.0
    assert (
        Notifier(
            {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}
        ).watchdog_interval
        is None
    )
