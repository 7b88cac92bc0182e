"""Errors: the ones a handler raises say what happens to its message; the
others say why the service had to stop, and with which exit status."""

from __future__ import annotations

import enum


class Reject(Exception):
    """Raised by a handler: the message can never be handled; reject it without requeueing.

    The broker drops it, or dead-letters it if the queue has a dead-letter exchange.
    """


class UndecodableBody(ValueError):
    """The body could not be decoded (e.g. by ``Message.json()``): the handler fails."""


class ExitStatus(enum.IntEnum):
    """The process exit statuses, by cause (documented in README.md)."""

    OK = 0
    #: Anything unexpected (a crash, a traceback in the log).
    FAILURE = 1
    #: An option, the environment or the config file has a bad value.
    CONFIG = 64
    #: The handler cannot be imported or is not callable.
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


class HandlerImportError(ConfigurationError):
    """The handler reference cannot be imported or is not callable."""

    status = ExitStatus.HANDLER


class AccessRefused(FatalError):
    """The broker refused our credentials, vhost or permissions."""

    status = ExitStatus.ACCESS_REFUSED


class TopologyMismatch(FatalError):
    """A queue or exchange exists with other arguments than we declare."""

    status = ExitStatus.TOPOLOGY_MISMATCH
