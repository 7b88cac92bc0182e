"""Settings: one frozen object merged from the command line, the environment
and the config file, validated before anything connects."""

from __future__ import annotations

import ast
import configparser
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

from ._errors import ConfigurationError
from ._tls import check_tls_files
from ._url import DEFAULT_URL, BrokerURL, parse_url

CONFIG_SECTION = "consumer"
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


def _log_level(raw: str, name: str) -> str:
    value = raw.strip().lower()
    if value not in LOG_LEVELS:
        raise ConfigurationError(f"--{name} must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return value


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


@dataclass(frozen=True)
class Option:
    """One setting: its option name, default, help text and conversion."""

    name: str
    default: str | None
    help: str
    convert: Callable[[Any, str], Any] = _text
    repeatable: bool = False
    flag: bool = False

    @property
    def attribute(self) -> str:
        return self.name.replace("-", "_")

    @property
    def environment(self) -> str:
        return "CONSUMER_" + self.attribute.upper()


OPTIONS: tuple[Option, ...] = (
    Option(
        "url",
        None,
        f"A broker URL (default: $AMQP_URL, else {DEFAULT_URL}); repeat it for a cluster.",
        lambda values, name: [v.strip() for v in values],
        repeatable=True,
    ),
    Option(
        "url-file",
        None,
        "Read the broker URL(s), one per line, from this file (keeps a password out of ps).",
    ),
    Option("queue", None, "The queue to consume (required)."),
    Option("handler", None, "The handler, package.module:function (default: log and ack)."),
    Option(
        "handler-path",
        None,
        "Directories (separated by ':') searched first for the handler's module; the "
        "current directory only if named here (--handler-path .).",
        lambda raw, name: _directories(raw, name),
    ),
    Option(
        "concurrency",
        "10",
        "At most this many handlers run at once.",
        _integer(1, 65535),
    ),
    Option(
        "prefetch",
        None,
        "Messages the broker may send ahead (QoS prefetch count; default: twice --concurrency,"
        " so the next message is there when a handler finishes).",
        _integer(1, 65535),
    ),
    Option(
        "heartbeat",
        "30",
        "AMQP heartbeat timeout in seconds; 0 disables heartbeats.",
        _integer(0, 65535),
    ),
    Option(
        "shutdown-timeout",
        "30",
        "Seconds in-flight handlers get to finish on shutdown.",
        _seconds(0, 86400),
    ),
    Option("threads", "10", "Size of the thread pool for @blocking handlers.", _integer(1, 1000)),
    Option(
        "pause-after",
        "10",
        "Pause after this many failures in a row (a downstream is down; not counting Reject);"
        " 0 never pauses.",
        _integer(0, 1000000),
    ),
    Option(
        "pause-max",
        "300",
        "The longest wait between two probes while paused, in seconds.",
        _seconds(1, 86400),
    ),
    Option(
        "stall-check",
        "60",
        "Every this many seconds, check that a queue with ready messages still delivers to us;"
        " 0 never checks.",
        _seconds(0, 86400),
    ),
    Option(
        "connect-timeout",
        "15",
        "Seconds a TCP connect, and then the AMQP handshake, may take.",
        _seconds(0.1, 3600),
    ),
    Option(
        "reconnect-initial",
        "1",
        "Seconds before the first reconnect attempt.",
        _seconds(0.01, 3600),
    ),
    Option(
        "reconnect-max",
        "30",
        "Cap on the seconds between reconnect attempts.",
        _seconds(0.01, 3600),
    ),
    Option(
        "handler-timeout",
        "600",
        "Seconds a handler may run before it is cancelled; its message is then retried "
        "(a failed attempt).",
        _seconds(0.001, 86400),
    ),
    Option(
        "max-retries",
        "5",
        "Retries of a failed message after its first attempt, before it is dead-lettered.",
        _integer(0, 1000),
    ),
    Option(
        "retry-delay",
        "5",
        "Seconds before the first retry; each further retry waits twice as long (at most 1 h).",
        _seconds(0.001, 3600),
    ),
    Option(
        "dead-letter-queue",
        None,
        "Where failed messages are parked (declared durable) [default: <queue>.dead].",
    ),
    Option(
        "publish-timeout",
        "30",
        "Seconds a publish (retry, dead-letter, or the handler's own) may wait for its confirm.",
        _seconds(0.1, 3600),
    ),
    Option(
        "tls-ca",
        None,
        "CA certificates (PEM) to verify the broker with [default: the system's].",
        _readable,
    ),
    Option(
        "tls-cert", None, "A client certificate (PEM) for mutual TLS; needs --tls-key.", _readable
    ),
    Option("tls-key", None, "The client certificate's private key (PEM).", _readable),
    Option(
        "health-port",
        None,
        "Serve /healthz, /readyz and /metrics over HTTP on this port.",
        _integer(1, 65535),
    ),
    Option("health-host", "127.0.0.1", "The address the health port listens on."),
    Option(
        "log-level",
        "info",
        "Log from this level up: " + ", ".join(LOG_LEVELS) + ".",
        _log_level,
    ),
    Option(
        "queue-arg",
        None,
        "A queue argument KEY=VALUE, e.g. x-queue-type=quorum (repeatable).",
        _queue_arguments,
        repeatable=True,
    ),
    Option("exchange", None, "Declare this exchange and bind the queue to it."),
    Option("exchange-type", "direct", "The exchange's type: " + ", ".join(EXCHANGE_TYPES) + "."),
    Option(
        "routing-key",
        None,
        "Bind the queue with this routing key (repeatable).",
        lambda values, name: tuple(v.strip() for v in values),
        repeatable=True,
    ),
    Option(
        "reply-to-allow",
        None,
        "Also let message.reply() write to queues matching this glob (repeatable) "
        "[always allowed: amq.gen-*, amq.rabbitmq.reply-to*].",
        _reply_to_patterns,
        repeatable=True,
    ),
    Option(
        "no-declare",
        None,
        "Only check that the queue exists (passively); declare nothing.",
        _boolean,
        flag=True,
    ),
)
BY_NAME = {option.name: option for option in OPTIONS}


@dataclass(frozen=True)
class Settings:
    """Everything the service needs to know, validated."""

    url: BrokerURL
    queue: str
    #: Every broker URL, ``url`` first; reconnects go round them.
    urls: tuple[BrokerURL, ...] = ()
    handler: str | None = None
    #: Directories searched first for the handler's module (absolute).
    handler_path: tuple[str, ...] = ()
    concurrency: int = 10
    #: 0: twice ``concurrency`` (set in __post_init__).
    prefetch: int = 0
    heartbeat: int = 30
    shutdown_timeout: float = 30.0
    threads: int = 10
    pause_after: int = 10
    pause_max: float = 300.0
    stall_check: float = 60.0
    connect_timeout: float = 15.0
    reconnect_initial: float = 1.0
    reconnect_max: float = 30.0
    handler_timeout: float = 600.0
    max_retries: int = 5
    retry_delay: float = 5.0
    dead_letter_queue: str = ""
    publish_timeout: float = 30.0
    health_port: int | None = None
    health_host: str = "127.0.0.1"
    log_level: str = "info"
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    queue_arguments: Mapping[str, Any] = field(default_factory=dict)
    exchange: str | None = None
    exchange_type: str = "direct"
    routing_keys: tuple[str, ...] = ()
    declare: bool = True
    #: Globs of queues, besides amq.gen-* and direct reply-to, that replies may go to.
    reply_to_allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.prefetch:
            object.__setattr__(self, "prefetch", min(65535, 2 * self.concurrency))
        if not self.urls:
            object.__setattr__(self, "urls", (self.url,))
        if not self.dead_letter_queue:
            object.__setattr__(self, "dead_letter_queue", f"{self.queue}.dead")


def _ini_error(error: configparser.Error) -> str:
    """What is wrong with an INI file, in one line that names the line."""
    if isinstance(error, configparser.MissingSectionHeaderError):
        return f"line {error.lineno}: {error.line.strip()!r} comes before any [section] header"
    if isinstance(error, configparser.ParsingError):
        lineno, shown = error.errors[0]
        try:  # configparser keeps the line as its repr
            line = str(ast.literal_eval(shown))
        except (ValueError, SyntaxError):
            line = str(shown)
        more = f" (and {len(error.errors) - 1} more)" if len(error.errors) > 1 else ""
        return (
            f"line {lineno}: {line.strip()!r} is neither KEY = VALUE nor a [section] header{more}"
        )
    if isinstance(error, configparser.DuplicateOptionError):
        return f"line {error.lineno}: {error.option!r} is set twice in [{error.section}]"
    if isinstance(error, configparser.DuplicateSectionError):
        return f"line {error.lineno}: section [{error.section}] appears twice"
    return str(error).splitlines()[0]


def read_config_file(path: str) -> dict[str, str]:
    """The ``[consumer]`` section of an INI file, keys normalised to option names."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigurationError(f"cannot read config file {path!r}: {e.strerror}") from None
    except configparser.Error as e:
        raise ConfigurationError(
            f"config file {path!r} is not valid INI: {_ini_error(e)}"
        ) from None
    if not parser.has_section(CONFIG_SECTION):
        raise ConfigurationError(f"config file {path!r} has no [{CONFIG_SECTION}] section")
    values: dict[str, str] = {}
    for key, value in parser.items(CONFIG_SECTION):
        name = key.strip().replace("_", "-")
        if name not in BY_NAME:
            raise ConfigurationError(
                f"config file {path!r}: unknown key {key!r} in [{CONFIG_SECTION}]"
            )
        values[name] = value
    return values


def _split_list(raw: str) -> list[str]:
    return [item.strip() for item in re.split(r"[\n,]", raw) if item.strip()]


#: The options that say where the broker and the queues are, and how to reach them:
#: all that a tool working beside the service (``python -m consumer_svc dead-letters``) needs.
CONNECTION_OPTIONS: tuple[str, ...] = (
    "url",
    "url-file",
    "queue",
    "dead-letter-queue",
    "tls-ca",
    "tls-cert",
    "tls-key",
)


@dataclass(frozen=True)
class Connection:
    """Where the broker and the queues are, and the TLS files to reach it with; validated."""

    #: Every broker URL, in the order to try them.
    urls: tuple[BrokerURL, ...]
    queue: str
    dead_letter_queue: str
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


def _config_values(config_path: str | None, environ: Mapping[str, str]) -> dict[str, str]:
    path = config_path or environ.get("CONSUMER_CONFIG") or None
    return read_config_file(path) if path else {}


def _gather(
    options: tuple[Option, ...],
    command_line: Mapping[str, Any],
    environ: Mapping[str, str],
    from_file: Mapping[str, str],
) -> dict[str, Any]:
    """Each option's converted value from the first source that gives it, by attribute name."""
    values: dict[str, Any] = {}
    for option in options:
        raw: Any = command_line.get(option.name)
        if option.repeatable and not raw:
            raw = None
        if raw is None:
            env = environ.get(option.environment)
            if env is None and option.name == "url":
                env = environ.get("AMQP_URL")
                if env is not None and command_line.get("url-file"):
                    env = None  # an explicit --url-file wins over the environment
            raw = env if env is not None else from_file.get(option.name)
            if raw is not None and option.repeatable:
                raw = _split_list(raw)
        if raw is None:
            raw = option.default
        if raw is None:
            continue
        if option.flag and raw is True:
            values[option.attribute] = True
            continue
        values[option.attribute] = option.convert(raw, option.name)
    return values


def _connection(values: dict[str, Any], command_line: Mapping[str, Any]) -> Connection:
    """Take the connection options out of ``values`` and check them together."""
    url_file = values.pop("url_file", None)
    raw_urls: list[str] = values.pop("url", None) or []
    if url_file and command_line.get("url"):
        raise ConfigurationError("give --url or --url-file, not both")
    if url_file:
        try:
            with open(url_file, encoding="utf-8") as f:
                raw_urls = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except OSError as e:
            raise ConfigurationError(f"cannot read --url-file {url_file!r}: {e.strerror}") from None
        if not raw_urls:
            raise ConfigurationError(f"--url-file {url_file!r} holds no URL")
    urls = tuple(parse_url(raw) for raw in raw_urls or [DEFAULT_URL])
    queue = values.pop("queue", None)
    if not queue:
        raise ConfigurationError(
            "no queue given: use --queue NAME, CONSUMER_QUEUE, or queue = NAME in the config file"
        )
    dead_letter_queue = values.pop("dead_letter_queue", None) or f"{queue}.dead"
    if dead_letter_queue == queue:
        raise ConfigurationError("--dead-letter-queue must not be the queue itself")
    tls = {name: values.pop(name, None) for name in ("tls_ca", "tls_cert", "tls_key")}
    if bool(tls["tls_cert"]) != bool(tls["tls_key"]):
        raise ConfigurationError("--tls-cert and --tls-key go together")
    given = [f"--{name.replace('_', '-')}" for name, value in tls.items() if value]
    plain = [url for url in urls if not url.tls]
    if given and plain:
        raise ConfigurationError(
            f"{'/'.join(given)} need an amqps:// URL, but {plain[0]} is amqp:// "
            "(it would connect in plaintext): use amqps:// (port 5671 by default)"
        )
    check_tls_files(tls["tls_ca"], tls["tls_cert"], tls["tls_key"])
    return Connection(urls=urls, queue=queue, dead_letter_queue=dead_letter_queue, **tls)


def resolve_connection(
    command_line: Mapping[str, Any], environ: Mapping[str, str], config_path: str | None
) -> Connection:
    """The connection options alone, merged and checked exactly as `resolve` does.

    The other options are not read, so a value that only the service uses
    (say ``CONSUMER_PREFETCH``) cannot stop a tool; the config file's keys are
    still checked, as it is the service's file.
    """
    from_file = _config_values(config_path, environ)
    options = tuple(BY_NAME[name] for name in CONNECTION_OPTIONS)
    return _connection(_gather(options, command_line, environ, from_file), command_line)


def resolve(
    command_line: Mapping[str, Any], environ: Mapping[str, str], config_path: str | None
) -> Settings:
    """Merge the sources, highest first: command line, environment, config file, defaults.

    ``command_line`` maps option names to the raw strings given (lists for
    repeatable options, True for flags); absent or None means not given.
    """
    values = _gather(OPTIONS, command_line, environ, _config_values(config_path, environ))
    connection = _connection(values, command_line)
    queue = connection.queue
    exchange_type = values.pop("exchange_type")
    if exchange_type not in EXCHANGE_TYPES:
        raise ConfigurationError(
            f"--exchange-type must be one of {', '.join(EXCHANGE_TYPES)}, got {exchange_type!r}"
        )
    routing_keys = values.pop("routing_key", ())
    if routing_keys and not values.get("exchange"):
        raise ConfigurationError("--routing-key needs --exchange NAME to bind the queue to")
    if values.get("exchange") and not routing_keys and exchange_type in ("direct", "topic"):
        routing_keys = (queue,)
    no_declare = values.pop("no_declare", False)
    if no_declare and (values.get("exchange") or values.get("queue_arg")):
        raise ConfigurationError("--no-declare cannot be combined with --exchange or --queue-arg")
    if values["reconnect_max"] < values["reconnect_initial"]:
        raise ConfigurationError("--reconnect-max must not be below --reconnect-initial")
    return Settings(
        url=connection.urls[0],
        urls=connection.urls,
        queue=queue,
        dead_letter_queue=connection.dead_letter_queue,
        tls_ca=connection.tls_ca,
        tls_cert=connection.tls_cert,
        tls_key=connection.tls_key,
        queue_arguments=values.pop("queue_arg", {}),
        exchange_type=exchange_type,
        routing_keys=routing_keys,
        declare=not no_declare,
        **values,
    )
