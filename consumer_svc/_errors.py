"""Errors: the ones a handler raises say what happens to its message; the
others say why the service had to stop, and with which exit status."""

from __future__ import annotations

import enum


class Reject(Exception):
    """Raised by a handler: the message can never be handled; park it in the dead-letter queue now."""


class Retry(Exception):
    """Raised by a handler: try the message again after ``delay`` seconds (counts as an attempt)."""

    def __init__(self, reason: str = "", *, delay: float | None = None) -> None:
        super().__init__(reason or "retry requested")
        if delay is not None and not 0 <= delay <= 86400 * 7:
            raise ValueError(f"Retry delay must be from 0 to 7 days in seconds, got {delay!r}")
        self.delay = delay


class Pause(Exception):
    """Raised by a handler: a downstream is down; hand the message back unharmed and pause.

    The service takes no new messages, lets those in flight finish, and after
    ``delay`` seconds (default: the pause backoff) tries one message again.
    """

    def __init__(self, reason: str = "", *, delay: float | None = None) -> None:
        super().__init__(reason or "pause requested")
        if delay is not None and not 0 < delay <= 86400:
            raise ValueError(f"Pause delay must be from 0 to 1 day in seconds, got {delay!r}")
        self.delay = delay


class SetupFailed(Exception):
    """Setting up the channels failed in a way that a reconnect may fix."""


class UndecodableBody(Reject, ValueError):
    """The body could not be decoded (e.g. by ``Message.json()``): parked after one attempt."""


class PublishFailed(Exception):
    """A publish was not confirmed by the broker (nacked, unroutable, timed out, or no channel)."""


class PublishRefused(PublishFailed):
    """The broker closed the publishing channel over a publish (e.g. a ``user_id`` it refuses)."""


class ExitStatus(enum.IntEnum):
    """The process exit statuses, by cause (documented in README.md)."""

    OK = 0
    #: Anything unexpected (a crash, a traceback in the log).
    FAILURE = 1
    #: An option, the environment or the config file has a bad value, or the health
    #: port cannot be listened on (taken by another process, not permitted).
    CONFIG = 64
    #: The handler cannot be imported, is not callable or cannot run as written.
    HANDLER = 65
    #: The broker refused the credentials, the vhost or a permission.
    ACCESS_REFUSED = 77
    #: The queue or exchange exists with other arguments than configured.
    TOPOLOGY_MISMATCH = 78


class FatalError(Exception):
    """A failure that retrying cannot fix: the service logs it and exits."""

    status: ExitStatus = ExitStatus.FAILURE


class ConfigurationError(FatalError):
    """An option, the environment or the config file has a bad value."""

    status = ExitStatus.CONFIG


class ListenFailed(ConfigurationError):
    """An address the service must listen on (``--health-port``) is taken or not permitted."""


class HandlerImportError(ConfigurationError):
    """The handler reference cannot be imported or is not callable."""

    status = ExitStatus.HANDLER


class AccessRefused(FatalError):
    """The broker refused our credentials, vhost or permissions."""

    status = ExitStatus.ACCESS_REFUSED


class TopologyMismatch(FatalError):
    """A queue or exchange exists with other arguments than we declare."""

    status = ExitStatus.TOPOLOGY_MISMATCH
