"""Settings: one frozen object merged from the command line, the environment and the
config file by the options table (`_options`), validated before anything connects.

`resolve` gives the service its `Settings`; `resolve_connection` gives a tool
beside it (``python -m consumer_svc dead-letters``) the `Connection` part alone,
through the same code.
"""

from __future__ import annotations

import ast
import configparser
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import ConfigurationError
from ._options import BY_NAME, CONFIG, CONNECTION, OPTIONS, Option, default
from ._tls import check_tls_files
from ._url import BrokerURL, parse_url

CONFIG_SECTION = "consumer"


def dead_letter_queue(queue: str, given: str | None = None) -> str:
    """The dead-letter queue: ``given``, else ``<queue>.dead`` (the one place that says so)."""
    return given or f"{queue}.dead"


@dataclass(frozen=True)
class Settings:
    """Everything the service needs to know, validated; the defaults are the options table's."""

    url: BrokerURL
    queue: str
    #: Every broker URL, ``url`` first; reconnects go round them.
    urls: tuple[BrokerURL, ...] = ()
    handler: str | None = None
    #: Directories searched first for the handler's module (absolute).
    handler_path: tuple[str, ...] = ()
    concurrency: int = default("concurrency")
    #: 0: twice ``concurrency`` (set in __post_init__).
    prefetch: int = 0
    heartbeat: int = default("heartbeat")
    shutdown_timeout: float = default("shutdown-timeout")
    threads: int = default("threads")
    pause_after: int = default("pause-after")
    pause_max: float = default("pause-max")
    stall_check: float = default("stall-check")
    connect_timeout: float = default("connect-timeout")
    reconnect_initial: float = default("reconnect-initial")
    reconnect_max: float = default("reconnect-max")
    handler_timeout: float = default("handler-timeout")
    max_retries: int = default("max-retries")
    retry_delay: float = default("retry-delay")
    #: "": `dead_letter_queue` of the queue (set in __post_init__).
    dead_letter_queue: str = ""
    publish_timeout: float = default("publish-timeout")
    health_port: int | None = None
    health_host: str = default("health-host")
    log_level: str = default("log-level")
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    queue_arguments: Mapping[str, Any] = field(default_factory=dict)
    exchange: str | None = None
    exchange_type: str = default("exchange-type")
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
            object.__setattr__(self, "dead_letter_queue", dead_letter_queue(self.queue))


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


def resolve(
    command_line: Mapping[str, Any], environ: Mapping[str, str], config_path: str | None
) -> Settings:
    """Merge the sources, highest first: command line, environment, config file, defaults.

    ``command_line`` maps option names to the raw strings given (lists for
    repeatable options, True for flags); absent or None means not given.
    """
    values = _gather(OPTIONS, command_line, environ, _config_values(config_path, environ))
    connection = _connection(values, command_line)
    topology = _topology(values, connection.queue)
    if values["reconnect_max"] < values["reconnect_initial"]:
        raise ConfigurationError("--reconnect-max must not be below --reconnect-initial")
    return Settings(
        url=connection.urls[0],
        urls=connection.urls,
        queue=connection.queue,
        dead_letter_queue=connection.dead_letter_queue,
        tls_ca=connection.tls_ca,
        tls_cert=connection.tls_cert,
        tls_key=connection.tls_key,
        **topology,
        **values,
    )


def resolve_connection(
    command_line: Mapping[str, Any], environ: Mapping[str, str], config_path: str | None
) -> Connection:
    """The connection options alone, merged and checked exactly as `resolve` does.

    The other options are not read, so a value that only the service uses
    (say ``CONSUMER_PREFETCH``) cannot stop a tool; the config file's keys are
    still checked, as it is the service's file.
    """
    from_file = _config_values(config_path, environ)
    return _connection(_gather(CONNECTION, command_line, environ, from_file), command_line)


# -- the sources


def _config_values(config_path: str | None, environ: Mapping[str, str]) -> dict[str, str]:
    path = config_path or _from_environment(CONFIG, environ) or None
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
        raw = _raw(option, command_line, environ, from_file)
        if raw is True and option.flag:
            values[option.attribute] = True
        elif raw is not None:
            values[option.attribute] = option.convert(raw, option.name)
    return values


def _raw(
    option: Option,
    command_line: Mapping[str, Any],
    environ: Mapping[str, str],
    from_file: Mapping[str, str],
) -> Any:
    """What the first source that sets ``option`` holds, unconverted; None when none does.

    The command line gives lists for repeatable options; the environment, the
    file and the table give text, split into a list for those. An empty list is
    no value: the next source gives it.
    """
    given = command_line.get(option.name)
    if given is not None and given != []:
        return given
    for text in (_from_environment(option, environ), from_file.get(option.name), option.default):
        if text is None:
            continue
        if not option.repeatable:
            return text
        items = _split_list(text)
        if items:
            return items
    return None


def _from_environment(option: Option, environ: Mapping[str, str]) -> str | None:
    return next((environ[name] for name in option.environment if name in environ), None)


def _split_list(raw: str) -> list[str]:
    return [item.strip() for item in re.split(r"[\n,]", raw) if item.strip()]


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


# -- checks across options: each takes its options out of ``values``


def _connection(values: dict[str, Any], command_line: Mapping[str, Any]) -> Connection:
    """The broker URLs, the queues and the TLS files, checked together."""
    urls = _broker_urls(values.pop("url_file", None), values.pop("url"), command_line)
    queue = values.pop("queue", None)
    if not queue:
        raise ConfigurationError(
            "no queue given: use --queue NAME, CONSUMER_QUEUE, or queue = NAME in the config file"
        )
    parked = dead_letter_queue(queue, values.pop("dead_letter_queue", None))
    if parked == queue:
        raise ConfigurationError("--dead-letter-queue must not be the queue itself")
    tls = {name: values.pop(name, None) for name in ("tls_ca", "tls_cert", "tls_key")}
    _check_tls(urls, **tls)
    return Connection(urls=urls, queue=queue, dead_letter_queue=parked, **tls)


def _broker_urls(
    url_file: str | None, urls: list[str], command_line: Mapping[str, Any]
) -> tuple[BrokerURL, ...]:
    """--url-file's URLs if it is given (not with --url), else --url's (the default at least)."""
    if url_file and command_line.get("url"):
        raise ConfigurationError("give --url or --url-file, not both")
    return tuple(parse_url(raw) for raw in (_read_url_file(url_file) if url_file else urls))


def _read_url_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            urls = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except OSError as e:
        raise ConfigurationError(f"cannot read --url-file {path!r}: {e.strerror}") from None
    if not urls:
        raise ConfigurationError(f"--url-file {path!r} holds no URL")
    return urls


def _check_tls(
    urls: tuple[BrokerURL, ...], tls_ca: str | None, tls_cert: str | None, tls_key: str | None
) -> None:
    """TLS files go with amqps:// URLs only, a certificate with its key, and all must load."""
    if bool(tls_cert) != bool(tls_key):
        raise ConfigurationError("--tls-cert and --tls-key go together")
    named = {"--tls-ca": tls_ca, "--tls-cert": tls_cert, "--tls-key": tls_key}
    given = [name for name, path in named.items() if path]
    plain = [url for url in urls if not url.tls]
    if given and plain:
        raise ConfigurationError(
            f"{'/'.join(given)} need an amqps:// URL, but {plain[0]} is amqp:// "
            "(it would connect in plaintext): use amqps:// (port 5671 by default)"
        )
    check_tls_files(tls_ca, tls_cert, tls_key)


def _topology(values: dict[str, Any], queue: str) -> dict[str, Any]:
    """What to declare: the queue's arguments, the exchange's type and bindings, or nothing."""
    exchange = values.get("exchange")
    exchange_type = values.pop("exchange_type")
    queue_arguments = values.pop("queue_arg", {})
    routing_keys = values.pop("routing_key", ())
    if routing_keys and not exchange:
        raise ConfigurationError("--routing-key needs --exchange NAME to bind the queue to")
    if exchange and not routing_keys and exchange_type in ("direct", "topic"):
        routing_keys = (queue,)
    no_declare = values.pop("no_declare", False)
    if no_declare and (exchange or queue_arguments):
        raise ConfigurationError("--no-declare cannot be combined with --exchange or --queue-arg")
    return {
        "queue_arguments": queue_arguments,
        "exchange_type": exchange_type,
        "routing_keys": routing_keys,
        "declare": not no_declare,
    }
