"""The options table: every option of ``twistd consumer`` described once, in `OPTIONS`.

Each `Option` holds its name, default, help and conversion. The table drives
``twistd consumer --help`` (`tap.Options`), the keys of the config file, the
environment variables (`Option.environment`), the connection options of the
dead-letters tool (`CONNECTION`), the defaults of `Settings` (`default`), and
README.md's options table (`markdown_table`; a test holds README to it).
Help texts may mark code with backticks, as Markdown does; ``--help`` shows
them without.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from ._errors import ConfigurationError
from ._url import DEFAULT_URL

EXCHANGE_TYPES = ("direct", "fanout", "topic", "headers")
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")

# -- conversions: each takes the raw string and the option name, and raises
# ConfigurationError with a sentence a person understands.


def _integer(low: int, high: int) -> Callable[[str, str], int]:
    def convert(raw: str, name: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise ConfigurationError(
                f"--{name} must be a whole number from {low} to {high}, got {raw!r}"
            )
        return value

    return convert


def _seconds(low: float, high: float) -> Callable[[str, str], float]:
    def convert(raw: str, name: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            value = float("nan")
        if not low <= value <= high:  # also rejects nan and inf
            raise ConfigurationError(
                f"--{name} must be a number of seconds from {low:g} to {high:g}, got {raw!r}"
            )
        return value

    return convert


def _text(raw: str, name: str) -> str:
    value = raw.strip()
    if not value:
        raise ConfigurationError(f"--{name} must not be empty")
    return value


def _readable(raw: str, name: str) -> str:
    path = raw.strip()
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ConfigurationError(f"--{name} {path!r} cannot be read: {e.strerror}") from None
    return path


def _one_of(choices: tuple[str, ...], *, fold_case: bool) -> Callable[[str, str], str]:
    def convert(raw: str, name: str) -> str:
        value = raw.strip().lower() if fold_case else raw.strip()
        if value not in choices:
            raise ConfigurationError(f"--{name} must be one of {', '.join(choices)}, got {raw!r}")
        return value

    return convert


def _urls(values: list[str], name: str) -> list[str]:
    """Each value may hold several URLs separated by commas, as the environment's does."""
    urls = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if values and not urls:
        raise ConfigurationError(f"--{name} is empty")
    return urls


def _directories(raw: str, name: str) -> tuple[str, ...]:
    paths = []
    for item in raw.split(os.pathsep):
        if not item.strip():
            continue
        path = os.path.abspath(item.strip())
        if not os.path.isdir(path):
            raise ConfigurationError(f"--{name} {item.strip()!r} is not a directory")
        paths.append(path)
    return tuple(paths)


def _boolean(raw: str, name: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigurationError(f"{name} must be true or false, got {raw!r}")


def _argument_value(raw: str) -> Any:
    """Queue arguments are typed by RabbitMQ: numbers must be numbers."""
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(raw)
    except ValueError:
        return raw


def _queue_arguments(values: list[str], name: str) -> dict[str, Any]:
    arguments: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"--{name} takes KEY=VALUE, got {item!r}")
        arguments[key.strip()] = _argument_value(raw.strip())
    return arguments


def _reply_to_patterns(values: list[str], name: str) -> tuple[str, ...]:
    patterns = tuple(v.strip() for v in values)
    if any(not pattern for pattern in patterns):
        raise ConfigurationError(f"--{name} must not be empty")
    return patterns


def _stripped(values: list[str], name: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in values)


@dataclass(frozen=True)
class Option:
    """One option: its name, default, help text and conversion."""

    name: str
    #: What the value is called in README.md and the tools' --help ("" for a flag).
    metavar: str
    #: The default as it would be written; None when there is none, or when it is worked
    #: out from other options (then ``shown`` says how).
    default: str | None
    help: str
    convert: Callable[[Any, str], Any] = _text
    repeatable: bool = False
    flag: bool = False
    #: How the default reads where it is not a value: "twice `--concurrency`".
    shown: str | None = None
    required: bool = False
    short: str | None = None
    #: Environment variables read after ``CONSUMER_<OPTION>``.
    also: tuple[str, ...] = ()

    @property
    def attribute(self) -> str:
        return self.name.replace("-", "_")

    @property
    def environment(self) -> tuple[str, ...]:
        """The environment variables that set this option, first one first."""
        return ("CONSUMER_" + self.attribute.upper(), *self.also)

    @property
    def default_text(self) -> str:
        """The default in words, as README.md's table gives it."""
        if self.required:
            return "(required)"
        if self.shown is not None:
            return self.shown
        if self.default is not None:
            return f"`{self.default}`"
        return "off" if self.flag else "none"

    @property
    def usage(self) -> str:
        """The help for ``--help``: the text without Markdown's backticks, then the default."""
        if self.required:
            suffix = " [required]"
        elif self.shown is not None or self.default is not None:
            suffix = f" [default: {self.default_text}]"
        else:
            suffix = ""
        return (self.help + suffix).replace("`", "")


#: ``--config``: where the other options may come from, so not one of them (not a key of
#: the config file, not a setting).
CONFIG = Option(
    "config",
    "FILE",
    None,
    "An INI file whose `[consumer]` section sets any other option (the keys are the option "
    "names; see `tap.conf`).",
    short="c",
)

OPTIONS: tuple[Option, ...] = (
    Option(
        "url",
        "URL",
        DEFAULT_URL,
        "The broker; `amqps://` connects with TLS (the host name verified). Repeat it, or "
        "separate URLs with commas, for the nodes of a cluster. A URL on the command line "
        "shows in `ps`: prefer `--url-file` or the environment.",
        _urls,
        repeatable=True,
        also=("AMQP_URL",),
    ),
    Option(
        "url-file",
        "FILE",
        None,
        "Read the broker URL(s) from this file, one per line (`#` starts a comment), so that "
        "no password shows in `ps`; it wins over a URL from the environment or the config file.",
    ),
    Option(
        "queue",
        "NAME",
        None,
        "The queue to consume: the work queue, whose retry and dead-letter queues are named "
        "after it.",
        required=True,
    ),
    Option(
        "handler",
        "REF",
        None,
        "The handler: `package.module:function` or `package.module.function`.",
        shown="log and ack each message",
    ),
    Option(
        "handler-path",
        "DIRS",
        None,
        "Directories, separated by `:`, searched first for the handler's module; the "
        "current directory only if named (`--handler-path .`).",
        _directories,
    ),
    Option("concurrency", "N", "10", "Handlers that run at once.", _integer(1, 65535)),
    Option(
        "prefetch",
        "N",
        None,
        "Messages the broker sends ahead (QoS prefetch, per consumer), so that the next one "
        "is there when a handler finishes.",
        _integer(1, 65535),
        shown="twice `--concurrency`",
    ),
    Option(
        "heartbeat",
        "SECONDS",
        "30",
        "AMQP heartbeat timeout; 0 disables heartbeats. A dead broker is noticed within "
        "heartbeat + 5 to twice that many seconds.",
        _integer(0, 65535),
    ),
    Option(
        "shutdown-timeout",
        "SECONDS",
        "30",
        "How long in-flight handlers may finish on stop; the whole stop takes at most this + 5 s.",
        _seconds(0, 86400),
    ),
    Option(
        "threads", "N", "10", "Size of the thread pool for `@blocking` handlers.", _integer(1, 1000)
    ),
    Option(
        "pause-after",
        "N",
        "10",
        "Pause after this many failures in a row (a downstream is down; `Reject` does not "
        "count); 0 never pauses.",
        _integer(0, 1000000),
    ),
    Option(
        "pause-max",
        "SECONDS",
        "300",
        "The longest wait between two probes while paused.",
        _seconds(1, 86400),
    ),
    Option(
        "stall-check",
        "SECONDS",
        "60",
        "How often to check that a queue with ready messages still delivers to us; 0 never checks.",
        _seconds(0, 86400),
    ),
    Option(
        "handler-timeout",
        "SECONDS",
        "600",
        "Seconds a handler may run before it is cancelled; its message is then retried (a "
        "failed attempt). A `@blocking` handler's thread cannot be stopped: its result is "
        "ignored. Keep this well below RabbitMQ's `consumer_timeout` (30 min by default), "
        "which would otherwise close the channel.",
        _seconds(0.001, 86400),
    ),
    Option(
        "max-retries",
        "N",
        "5",
        "Retries of a failed message after its first attempt, before it is dead-lettered.",
        _integer(0, 1000),
    ),
    Option(
        "retry-delay",
        "SECONDS",
        "5",
        "The wait before the first retry; each further one waits twice as long, at most 1 h.",
        _seconds(0.001, 3600),
    ),
    Option(
        "dead-letter-queue",
        "NAME",
        None,
        "Where messages given up on are parked (declared durable).",
        shown="`<queue>.dead`",
    ),
    Option(
        "publish-timeout",
        "SECONDS",
        "30",
        "How long a publish (a retry copy, a dead-letter copy, or the handler's own) may wait "
        "for the broker's confirm.",
        _seconds(0.1, 3600),
    ),
    Option(
        "connect-timeout",
        "SECONDS",
        "15",
        "Limit for the TCP connect, and then again for the AMQP handshake (pika's Twisted "
        "adapter has none).",
        _seconds(0.1, 3600),
    ),
    Option(
        "reconnect-initial",
        "SECONDS",
        "1",
        "The first reconnect delay; each further failure doubles it.",
        _seconds(0.01, 3600),
    ),
    Option(
        "reconnect-max",
        "SECONDS",
        "30",
        "Cap on the reconnect delay; every delay is shortened by a random 0-50 % (jitter).",
        _seconds(0.01, 3600),
    ),
    Option(
        "queue-arg",
        "KEY=VALUE",
        None,
        "A queue argument, repeatable, e.g. `x-queue-type=quorum`; integer-looking values are "
        "sent as integers, `true`/`false` as booleans. A value the broker refuses "
        "(`x-max-length=lots`) stops the service with exit 64 naming the argument.",
        _queue_arguments,
        repeatable=True,
    ),
    Option("exchange", "NAME", None, "Declare this exchange (durable) and bind the queue to it."),
    Option(
        "exchange-type",
        "TYPE",
        "direct",
        "The exchange's type: " + ", ".join(f"`{t}`" for t in EXCHANGE_TYPES) + ".",
        _one_of(EXCHANGE_TYPES, fold_case=False),
    ),
    Option(
        "routing-key",
        "KEY",
        None,
        "A binding key for the queue, repeatable; needs `--exchange`.",
        _stripped,
        repeatable=True,
        shown="the queue name (a `direct` or `topic` exchange)",
    ),
    Option(
        "reply-to-allow",
        "GLOB",
        None,
        "Also let `message.reply()` write to queues matching this glob (`fnmatch`, "
        "case-sensitive, the whole name; repeatable), e.g. `rpc.replies.*`; replies always "
        "may go to `amq.gen-*` and `amq.rabbitmq.reply-to*`.",
        _reply_to_patterns,
        repeatable=True,
    ),
    Option(
        "no-declare",
        "",
        None,
        "Declare nothing: only check (passively) that the queue, its retry queues and its "
        "dead-letter queue exist, for a user without configure permission (README.md, "
        "Least privilege).",
        _boolean,
        flag=True,
    ),
    Option(
        "tls-ca",
        "FILE",
        None,
        "CA certificates (PEM) to verify an `amqps://` broker with.",
        _readable,
        shown="the system trust store",
    ),
    Option(
        "tls-cert",
        "FILE",
        None,
        "A client certificate (PEM) for mutual TLS, with `--tls-key`; it logs in with EXTERNAL "
        "when the URL has no credentials.",
        _readable,
    ),
    Option(
        "tls-key",
        "FILE",
        None,
        "The client certificate's private key (PEM, not encrypted).",
        _readable,
    ),
    Option(
        "health-port",
        "PORT",
        None,
        "Serve `/healthz`, `/readyz` and `/metrics` over HTTP on this port.",
        _integer(1, 65535),
        shown="off",
    ),
    Option("health-host", "ADDRESS", "127.0.0.1", "The address the health port listens on."),
    Option(
        "log-level",
        "LEVEL",
        "info",
        "Log from this level up: "
        + ", ".join(f"`{level}`" for level in LOG_LEVELS)
        + "; applies to twistd's text log and to `consumer_svc.json_lines` (not to `--syslog`).",
        _one_of(LOG_LEVELS, fold_case=True),
    ),
)
BY_NAME = {option.name: option for option in OPTIONS}
#: Everything the command line of ``twistd consumer`` takes.
COMMAND_LINE: tuple[Option, ...] = (CONFIG, *OPTIONS)

#: Where the broker and the queues are, and how to reach them: all that a tool working
#: beside the service (``python -m consumer_svc dead-letters``) needs, besides `CONFIG`.
CONNECTION: tuple[Option, ...] = tuple(
    BY_NAME[name]
    for name in ("url", "url-file", "queue", "dead-letter-queue", "tls-ca", "tls-cert", "tls-key")
)


def default(name: str) -> Any:
    """The option's default, converted: what `Settings` holds when it is not given."""
    option = BY_NAME[name]
    return option.convert(option.default, name)


def markdown_table(options: tuple[Option, ...] = COMMAND_LINE) -> str:
    """README.md's options table, one row for each option."""
    rows = ["| option | default | environment | meaning |", "|---|---|---|---|"]
    for option in options:
        spelled = f"`--{option.name} {option.metavar}`" if option.metavar else f"`--{option.name}`"
        if option.short:
            spelled += f", `-{option.short}`"
        environment = ", ".join(f"`{name}`" for name in option.environment)
        rows.append(f"| {spelled} | {option.default_text} | {environment} | {option.help} |")
    return "\n".join(rows) + "\n"
