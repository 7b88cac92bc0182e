"""The dead-letter queue, for a person: see what is parked there and why, and replay it.

``python -m consumer_svc dead-letters --queue NAME list`` tallies the failures without
taking anything away; ``... replay [--count N]`` moves messages back to the work queue,
each one confirmed there before it leaves the dead-letter queue, stripped by the copy
rules of `_copies`. It finds and reaches the broker as the service does: its options
come from the service's table (`_options.CONNECTION`), resolved by `resolve_connection`
(the command line, ``CONSUMER_*``, ``AMQP_URL``, ``--url-file``, ``--config``), and it
logs in and speaks TLS through `_parameters` and `_tls`.
Everything a publisher wrote is untrusted: what is printed of it is escaped, and a
message that cannot be decoded is counted and passed over, never a crash. A short-lived
command, so it uses pika's ``BlockingConnection``: no reactor is installed or needed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import ssl
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import pika
import pika.exceptions
from pika import spec
from pika.adapters.utils import connection_workflow

from . import _codec
from ._copies import copy_properties, note_stripped, safe_headers, without_ours
from ._errors import ConfigurationError, ExitStatus
from ._options import CONFIG, CONNECTION
from ._parameters import connection_parameters as shared_parameters
from ._retry import ATTEMPTS, FAILED_AT, FAILURE, ORIGINAL_EXCHANGE, ORIGINAL_ROUTING_KEY
from ._secrets import redact
from ._settings import Connection, resolve_connection
from ._tls import ssl_options
from ._url import BrokerURL

#: sysexits.h statuses that `ExitStatus` has no member for (the service never needs them).
NO_INPUT = 66  # EX_NOINPUT: the dead-letter queue (or the work queue) does not exist
UNAVAILABLE = 69  # EX_UNAVAILABLE: the broker cannot be reached, or went away

#: Bytes of a body shown in a summary.
PREVIEW_BYTES = 60
#: Characters of a header's text value, and of one header, shown in a summary.
VALUE_CHARS = 60
HEADER_CHARS = 100
#: Headers shown in a summary; the rest are counted.
HEADER_ITEMS = 10
#: Failure reasons listed by `list`; the rest are counted in one line.
REASON_LINES = 20
#: Every wait of the connection is bounded (connect, handshake, a blocked publish).
CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 15.0
BLOCKED_TIMEOUT = 30.0

_GAVE_UP = re.compile(r" \(gave up after \d+ attempts\)$")
_NUMBERS = re.compile(r"(\d+)")
_BROKER_CLOSE = re.compile(r"\((\d+)\) ['\"](.*)['\"]\s*$")

#: TLS for each amqps:// URL (`_tls.ssl_options`).
TLS = Callable[[BrokerURL], pika.SSLOptions]


class CommandFailed(Exception):
    """The command cannot go on: its message is one line for stderr, with an exit status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- pure parts: reasons, headers, previews, escapes


def escape(value: str | bytes) -> str:
    """``value`` as text that cannot act on a terminal: controls and bytes shown as escapes.

    Every character that is not printable (C0 and C1 controls such as ESC, CR and
    BEL, bidi overrides and other format characters, line separators) becomes a
    Python-style escape, bytes that are not UTF-8 become ``\\xNN``, and a backslash
    is doubled, so that the escapes cannot be confused with the text.
    """
    text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
    return "".join(_escape_character(c) for c in text)


def _escape_character(c: str) -> str:
    if c == "\\":
        return "\\\\"
    if c.isprintable():
        return c
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if c in "\t\n\r":
        return {"\t": "\\t", "\n": "\\n", "\r": "\\r"}[c]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def quoted(value: Any, limit: int = 0) -> str:
    """A text or bytes value escaped and in single quotes; cut after ``limit`` characters if set."""
    text = escape(_text(value)).replace("'", "\\'")
    if limit and len(text) > limit:
        text = text[:limit] + "..."
    return f"'{text}'"


def show_value(value: Any) -> str:
    """A header value as one escaped line: texts quoted, tables and arrays written out."""
    if isinstance(value, (str, bytes)):
        return quoted(value, VALUE_CHARS)
    if isinstance(value, Mapping):
        return (
            "{" + ", ".join(f"{escape(_text(k))}={show_value(v)}" for k, v in value.items()) + "}"
        )
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(item) for item in value) + "]"
    return escape(str(value))


def show_headers(headers: Mapping[Any, Any]) -> str:
    """The headers as one escaped line (at most `HEADER_ITEMS`, each cut at `HEADER_CHARS`)."""
    items = list(headers.items())
    shown = []
    for key, value in items[:HEADER_ITEMS]:
        item = f"{escape(_text(key))}={show_value(value)}"
        shown.append(item if len(item) <= HEADER_CHARS else item[:HEADER_CHARS] + "...")
    if len(items) > HEADER_ITEMS:
        shown.append(f"... and {len(items) - HEADER_ITEMS} more")
    return ", ".join(shown)


def reason_of(headers: Mapping[Any, Any] | None) -> str:
    """The failure a parked message carries, without the service's "(gave up after N attempts)".

    Raw text, as the publisher wrote it: escape it before printing.
    """
    value = _text((headers or {}).get(FAILURE))
    if not value:
        return "(no consumer-svc-failure header)"
    return _GAVE_UP.sub("", value.strip())


def tally(reasons: list[str]) -> list[tuple[int, str]]:
    """Group failure reasons by exception type and message, most common first.

    Reasons that differ only in their numbers are one group ("body of message 3 (5
    bytes)" and "body of message 7 (9 bytes)"); the numbers that differ show as #.
    """
    groups: dict[tuple[str, ...], list[str]] = {}
    for reason in reasons:
        # Splitting on a captured group puts the numbers at the odd positions.
        groups.setdefault(tuple(_NUMBERS.split(reason)[::2]), []).append(reason)
    rows = [(len(members), _common(members)) for members in groups.values()]
    # sorted() is stable: equally common reasons stay in the order first seen.
    return sorted(rows, key=lambda row: -row[0])


def _common(members: list[str]) -> str:
    """One label for reasons that differ only in numbers: those that differ become #."""
    split = [_NUMBERS.split(member) for member in set(members)]
    parts = [
        values[0] if index % 2 == 0 or len(set(values)) == 1 else "#"
        for index, values in enumerate(zip(*split))
    ]
    return "".join(parts)


def replay_copy(properties: spec.BasicProperties, *, username: str | None) -> Any:
    """The properties a replayed copy carries, by the copy rules of `_copies`.

    Our ``consumer-svc-*`` headers go (the message starts afresh); so do ``CC``/``BCC``
    and the broker's death headers, and ``user_id`` unless it names ``username`` (the
    user the tool logged in as; None when unknown, as with EXTERNAL). The copy is
    persistent, and ``consumer-svc-stripped`` names what was taken off.
    """
    kept, stripped = safe_headers(without_ours(properties.headers or {}))
    result, taken = copy_properties(properties, kept, username=username)
    result.headers = note_stripped(result.headers or {}, stripped + taken) or None
    return result


def preview(body: bytes, limit: int = PREVIEW_BYTES) -> str:
    """The first ``limit`` bytes of ``body`` as printable text (escapes for the rest)."""
    return escape(body[:limit]) + ("..." if len(body) > limit else "")


def _text(value: Any) -> str:
    """A header or property as text; bytes that are not UTF-8 kept for `escape` to show."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


# -- reading what pika cannot decode


@contextlib.contextmanager
def tolerant_decoding() -> Iterator[None]:
    """pika decodes with the service's tolerant codec (`consumer_svc._codec`) meanwhile.

    pika's own decoder raises on headers the broker accepts (a timestamp past year 9999,
    tables nested ~1000 deep), and the exception ends the connection, so one such message
    would stop every ``basic.get`` after it. With the codec installed (for good: it is a
    superset of pika's) such values are clamped or marked, and a header table that cannot
    be read at all arrives as `UndecodableHeaders`.
    """
    _codec.install()
    yield


def unreadable(properties: Any) -> str | None:
    """Why a message's headers could not be read, or None."""
    headers = getattr(properties, "headers", None)
    if type(headers) is _codec.UndecodableHeaders:
        return f"its headers cannot be decoded ({headers.error})"
    return None


# -- talking to the broker


def connection_parameters(
    url: BrokerURL, tls: TLS | None = None, *, client_certificate: bool = False
) -> pika.ConnectionParameters:
    """The service's parameters for ``url`` (`_parameters`: the same login, EXTERNAL with a
    client certificate and no credentials), plus what pika's own transport needs: host,
    port, TLS (``tls``, from `_tls.ssl_options`; needed for amqps://) and every wait bounded.
    """
    parameters = shared_parameters(
        url, name="consumer_svc dead-letters", client_certificate=client_certificate
    )
    parameters.host = url.host
    parameters.port = url.port
    if url.tls:
        if tls is None:
            raise ValueError(f"{url} needs TLS options")
        parameters.ssl_options = tls(url)
    parameters.connection_attempts = 1
    parameters.socket_timeout = CONNECT_TIMEOUT
    parameters.stack_timeout = HANDSHAKE_TIMEOUT
    parameters.blocked_connection_timeout = BLOCKED_TIMEOUT
    return parameters


def connect(
    urls: tuple[BrokerURL, ...] | list[BrokerURL],
    tls: TLS | None = None,
    *,
    client_certificate: bool = False,
) -> tuple[pika.BlockingConnection, BrokerURL]:
    """Connect to the first of ``urls`` that answers; fail with the last one's reason.

    Returns the connection and the URL it went to.
    """
    failure = CommandFailed(UNAVAILABLE, "no broker URL given")
    for url in urls:
        try:
            parameters = connection_parameters(url, tls, client_certificate=client_certificate)
            return pika.BlockingConnection(parameters), url
        except (
            pika.exceptions.AMQPError,
            connection_workflow.AMQPConnectorException,
            OSError,
        ) as e:
            failure = _connect_failure(e, url, url.external_login(client_certificate))
            if failure.status == ExitStatus.ACCESS_REFUSED:
                break  # another node of the cluster would refuse the same credentials
    raise failure


def _broker_text(error: BaseException) -> str:
    """The broker's own words from pika's "probable ... error" exceptions."""
    text = str(error.args[0]) if error.args else str(error)
    match = _BROKER_CLOSE.search(text)
    return f"{match.group(2)}" if match else text


def _connect_failure(error: BaseException, url: BrokerURL, external: bool) -> CommandFailed:
    where = f"{url.host}:{url.port}"
    user = "the client certificate's user (EXTERNAL)" if external else f"user {url.username!r}"
    who = f"{user}, vhost {url.vhost!r}, {where}"
    if isinstance(
        error, (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError)
    ):
        return CommandFailed(
            ExitStatus.ACCESS_REFUSED, f"access refused: {_broker_text(error)} ({who})"
        )
    if isinstance(error, pika.exceptions.ProbableAccessDeniedError):
        return CommandFailed(
            ExitStatus.ACCESS_REFUSED, f"virtual host refused: {_broker_text(error)} ({who})"
        )
    if isinstance(error, pika.exceptions.ConnectionClosed):
        status = ExitStatus.ACCESS_REFUSED if error.reply_code in (403, 530) else UNAVAILABLE
        return CommandFailed(
            status, f"{where} closed the connection: {error.reply_code} {error.reply_text} ({who})"
        )
    cause: BaseException = error
    # pika wraps the connector's error (refused, timed out, TLS ...) in AMQPConnectionError.
    if isinstance(error, pika.exceptions.AMQPConnectionError) and error.args:
        cause = error.args[0] if isinstance(error.args[0], BaseException) else error
    return CommandFailed(UNAVAILABLE, f"cannot reach {where}: {_why(cause)}")


def _why(cause: BaseException) -> str:
    # pika unwraps some connector errors and not others: handle both forms.
    if isinstance(cause, connection_workflow.AMQPConnectorPhaseErrorBase):
        cause = cause.exception
    if isinstance(cause, connection_workflow.AMQPConnectorStackTimeout):
        return f"no AMQP handshake within {HANDSHAKE_TIMEOUT:g} s"
    if isinstance(cause, ssl.SSLError):
        return f"TLS failed: {cause}"
    if isinstance(cause, pika.exceptions.IncompatibleProtocolError):
        return "the peer closed the connection during the AMQP handshake (not a RabbitMQ port?)"
    if isinstance(cause, pika.exceptions.StreamLostError):
        return f"connection lost during the AMQP handshake: {cause}"
    if isinstance(cause, socket.gaierror):
        return "host name not found"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, (TimeoutError, socket.timeout)):
        return f"TCP connect timed out after {CONNECT_TIMEOUT:g} s"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return repr(cause)


def _broker_failure(error: BaseException, what: str) -> CommandFailed:
    """A failure after connecting: a channel error, or the connection lost."""
    if isinstance(error, pika.exceptions.ChannelClosed):
        text = f"{what}: {error.reply_code} {error.reply_text}"
        if error.reply_code == 404:
            return CommandFailed(NO_INPUT, text)
        if error.reply_code == 403:
            return CommandFailed(ExitStatus.ACCESS_REFUSED, text)
        return CommandFailed(ExitStatus.FAILURE, text)
    if isinstance(error, pika.exceptions.ConnectionBlockedTimeout):
        return CommandFailed(
            UNAVAILABLE,
            f"{what}: the broker blocked the connection for {BLOCKED_TIMEOUT:g} s (a resource alarm)",
        )
    if isinstance(error, pika.exceptions.ConnectionClosed):
        return CommandFailed(
            UNAVAILABLE, f"{what}: the connection was closed: {error.reply_code} {error.reply_text}"
        )
    return CommandFailed(UNAVAILABLE, f"{what}: lost the connection: {error!r}")


def _check_queue(connection: pika.BlockingConnection, queue: str, role: str) -> int:
    """The ready messages of ``queue``, by a passive declare (which declares nothing)."""
    channel = connection.channel()
    try:
        frame = channel.queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosed as e:
        if e.reply_code == 404:
            raise CommandFailed(NO_INPUT, f"{role} {queue!r} does not exist") from None
        raise _broker_failure(e, f"cannot check {role} {queue!r}") from None
    channel.close()
    return int(frame.method.message_count)


# -- list


@dataclass
class Parked:
    """What `list` shows of one parked message."""

    body: bytes
    headers: Mapping[Any, Any]
    message_id: Any
    #: Why its headers or properties could not be decoded, if so.
    unreadable: str | None = None

    @property
    def reason(self) -> str:
        """Its failure, raw: the one the service noted, or why it cannot be read."""
        if self.unreadable:
            return f"(cannot be read: {self.unreadable})"
        return reason_of(self.headers)

    def describe(self) -> list[str]:
        """Escaped lines: the reason, where it came from, the other headers, the body."""
        h = self.headers
        details = []
        if not self.unreadable:
            details = [
                f"attempts {escape(_text(h.get(ATTEMPTS))) or '?'}",
                f"failed at {escape(_text(h.get(FAILED_AT))) or '?'}",
                f"from exchange {quoted(h.get(ORIGINAL_EXCHANGE))}"
                f" routing key {quoted(h.get(ORIGINAL_ROUTING_KEY))}",
            ]
        if self.message_id:
            details.append(f"message id {quoted(self.message_id, VALUE_CHARS)}")
        lines = [escape(self.reason)]
        if details:
            lines.append(", ".join(details))
        others = without_ours(h)
        if others:
            lines.append(f"headers: {show_headers(others)}")
        lines.append(f"body ({len(self.body)} bytes): {preview(self.body)}")
        return lines


@dataclass
class Inventory:
    """What `list` saw in the dead-letter queue."""

    queue: str
    #: Ready messages when we started, by a passive declare.
    ready: int
    #: Each message's reason, raw (escaped when printed).
    reasons: list[str] = field(default_factory=list)
    first: list[Parked] = field(default_factory=list)
    #: Whether the queue held more than the limit.
    more: bool = False
    #: Messages whose headers or properties could not be decoded.
    unreadable: int = 0

    def lines(self) -> list[str]:
        seen = len(self.reasons)
        if self.more:
            total = max(self.ready, seen + 1)
            head = f"{self.queue}: {total} message(s), more than --limit: tallied the first {seen}"
        else:
            head = f"{self.queue}: {seen} message(s)"
        if self.unreadable:
            head += f", {self.unreadable} cannot be read"
        out = [escape(head)]
        if not seen:
            return out
        rows = tally(self.reasons)
        width = len(str(rows[0][0]))
        out.append("failures, most common first:")
        out.extend(f"  {count:>{width}}  {escape(reason)}" for count, reason in rows[:REASON_LINES])
        if len(rows) > REASON_LINES:
            rest = rows[REASON_LINES:]
            out.append(
                f"  ... and {len(rest)} other reason(s) in {sum(c for c, _ in rest)} message(s)"
            )
        if self.first:
            out.append(f"the first {len(self.first)}:")
            for number, parked in enumerate(self.first, 1):
                first, *rest_lines = parked.describe()
                indent = " " * (len(str(number)) + 4)
                out.append(f"  {number}. {first}")
                out.extend(indent + line for line in rest_lines)
        return out


def inventory(
    connection: pika.BlockingConnection, queue: str, *, limit: int, show: int
) -> Inventory:
    """Look at up to ``limit`` messages of ``queue`` without taking any away.

    Each is fetched with ``basic.get`` and never acked; the caller closes the
    connection, and the broker puts them all back, in their order. A message
    whose properties cannot be decoded is counted as such, and the look goes on.
    """
    result = Inventory(queue, ready=_check_queue(connection, queue, "dead-letter queue"))
    channel = connection.channel()
    try:
        with tolerant_decoding():
            # One more than the limit tells whether the queue holds more.
            while len(result.reasons) <= limit:
                method, properties, body = channel.basic_get(queue, auto_ack=False)
                if method is None:
                    break
                if len(result.reasons) == limit:
                    result.more = True
                    break
                parked = Parked(
                    body, properties.headers or {}, properties.message_id, unreadable(properties)
                )
                result.unreadable += parked.unreadable is not None
                result.reasons.append(parked.reason)
                if len(result.first) < show:
                    result.first.append(parked)
    except pika.exceptions.AMQPError as e:
        raise _broker_failure(e, f"reading {queue!r} failed") from None
    return result


# -- replay


@dataclass
class Progress:
    """How far a replay got."""

    moved: int = 0
    #: One line for each message left parked because it cannot be read or copied.
    left: list[str] = field(default_factory=list)

    @property
    def looked_at(self) -> int:
        return self.moved + len(self.left)

    def summary(self, dead_letter_queue: str, queue: str) -> str:
        line = f"replayed {self.moved} message(s) from {dead_letter_queue} to {queue}"
        if self.left:
            line += f"; left {len(self.left)} parked that cannot be replayed"
        return escape(line)


class ReplayStopped(CommandFailed):
    """Replaying stopped on a failure after ``moved`` messages; the current one stays parked."""

    def __init__(self, status: int, message: str, progress: Progress) -> None:
        super().__init__(status, message)
        self.progress = progress

    @property
    def moved(self) -> int:
        return self.progress.moved


def replay(
    connection: pika.BlockingConnection,
    dead_letter_queue: str,
    queue: str,
    *,
    count: int | None,
    username: str | None = None,
) -> Progress:
    """Move the first ``count`` (all when None) messages to ``queue``; say how it went.

    One at a time: get (not acked), publish the copy (`replay_copy`) to the default
    exchange with ``mandatory`` and a confirm, and only then ack the dead-letter copy.
    A message that cannot be decoded (or whose copy cannot be encoded) is left
    parked, with a line in `Progress.left`, and the replay goes on: its headers are
    unknown, so a copy could neither be stripped of ``CC``/``BCC`` nor keep the rest.
    It stays unacked until the connection closes (a nack would put it back at the
    head, to be fetched again), then the broker puts it back. On a failure this
    raises `ReplayStopped`; the unacked message goes back the same way.
    """
    channel = connection.channel()
    channel.confirm_delivery()
    progress = Progress()
    with tolerant_decoding():
        while count is None or progress.looked_at < count:
            if not _replay_one(channel, dead_letter_queue, queue, username, progress):
                break
    return progress


def _replay_one(
    channel: Any, dead_letter_queue: str, queue: str, username: str | None, progress: Progress
) -> bool:
    """Replay the next message, or leave it parked; False when there is none."""
    position = progress.looked_at + 1
    what = f"replaying message {position} of {dead_letter_queue!r} failed"
    published = False
    try:
        method, properties, body = channel.basic_get(dead_letter_queue, auto_ack=False)
        if method is None:
            return False
        why = unreadable(properties)
        copy = None
        if why is None:
            try:
                copy = replay_copy(properties, username=username)
                copy.encode()  # what pika cannot encode fails here, before anything is sent
            except Exception as e:  # any encoder error: this message cannot be copied
                why = f"its copy cannot be encoded ({type(e).__name__}: {e})"
        if copy is None or why is not None:
            named = f" (message id {quoted(properties.message_id, VALUE_CHARS)})"
            progress.left.append(
                f"message {position}{named if properties.message_id else ''} stays parked: "
                + escape(why or "")
            )
            return True
        # With confirms on, this waits for the broker's answer and raises unless it took the copy.
        channel.basic_publish("", queue, body, copy, mandatory=True)
        published = True
        channel.basic_ack(method.delivery_tag)
    except pika.exceptions.UnroutableError:
        raise ReplayStopped(
            NO_INPUT,
            f"{what}: the broker returned it, no queue {queue!r} to route it to; it stays parked",
            progress,
        ) from None
    except pika.exceptions.NackError:
        raise ReplayStopped(
            UNAVAILABLE, f"{what}: the broker refused the copy (nack); it stays parked", progress
        ) from None
    except pika.exceptions.AMQPError as e:
        failure = _broker_failure(e, what)
        fate = (
            f"its copy is in {queue!r} and it stays parked too: a duplicate if replayed again"
            if published
            else "it stays parked"
        )
        raise ReplayStopped(failure.status, f"{failure}; {fate}", progress) from None
    progress.moved += 1
    return True


# -- the command


def _connection_arguments(parser: argparse.ArgumentParser, *, again: bool = False) -> None:
    """The service's options that say where the queues are, from its options table.

    ``again``: on a command's own parser, so that ``list --queue Q`` works as
    ``--queue Q list`` does; unset there, they leave the value given before alone.
    """
    keep: dict[str, Any] = {"default": argparse.SUPPRESS} if again else {}
    for option in (CONFIG, *CONNECTION):
        names = [f"-{option.short}"] if option.short else []
        parser.add_argument(
            *names,
            f"--{option.name}",
            action="append" if option.repeatable else "store",
            metavar=option.metavar,
            help=option.usage.replace("%", "%%"),  # argparse formats help with %
            **keep,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dead-letters`` options and its ``list`` and ``replay`` commands."""
    _connection_arguments(parser)
    commands = parser.add_subparsers(dest="action", required=True, metavar="{list,replay}")
    listing = commands.add_parser(
        "list",
        help="count the parked messages and tally why they failed; takes nothing away",
        description="Count the parked messages, tally their failures (most common first) and "
        "summarise the first few, every text escaped. A message that cannot be decoded is "
        "counted as such. Messages are read without an ack and all go back to the "
        "queue, in order, when the command ends.",
    )
    _connection_arguments(listing, again=True)
    listing.add_argument(
        "--limit",
        type=_whole("--limit", 1),
        default=10000,
        metavar="N",
        help="look at no more than N messages, all held unacked meanwhile (default: 10000)",
    )
    listing.add_argument(
        "--show",
        type=_whole("--show", 0),
        default=5,
        metavar="K",
        help="summarise the first K messages (default: 5)",
    )
    replaying = commands.add_parser(
        "replay",
        help="move parked messages back to the work queue, each confirmed before it is removed",
        description="Publish parked messages back to the work queue (default exchange, "
        "routing key = the queue), persistent, without their consumer-svc-* headers so they "
        "get every retry again, and without CC/BCC, x-death and the like, or a user_id other "
        "than the tool's own user (consumer-svc-stripped names what was taken off). Each "
        "copy is confirmed by the broker before the parked message is removed; on any "
        "failure the command stops and that message stays parked. A message that cannot "
        "be decoded stays parked, with a line saying why, and the replay goes on.",
    )
    _connection_arguments(replaying, again=True)
    replaying.add_argument(
        "--count",
        type=_whole("--count", 1),
        metavar="N",
        help="replay only the first N messages, counting those left parked (default: all)",
    )


def connection_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Connection:
    """The connection options of a parsed command, resolved as the service resolves them."""
    given = {option.name: getattr(args, option.attribute) for option in CONNECTION}
    return resolve_connection(given, environ, args.config)


def run(
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Carry out a parsed ``dead-letters`` command; return the exit status."""
    environ = os.environ if environ is None else environ
    out = out or sys.stdout
    err = err or sys.stderr
    prefix = "consumer_svc dead-letters"
    try:
        settings = connection_settings(args, environ)
        tls = ssl_options(settings) if any(url.tls for url in settings.urls) else None
    except ConfigurationError as e:
        print(f"{prefix}: error: {redact(escape(str(e)))}", file=err)
        return int(ExitStatus.CONFIG)
    dead_letter_queue, queue = settings.dead_letter_queue, settings.queue
    client_certificate = bool(settings.tls_cert)

    connection: pika.BlockingConnection | None = None
    try:
        connection, url = connect(settings.urls, tls, client_certificate=client_certificate)
        if args.action == "list":
            seen = inventory(connection, dead_letter_queue, limit=args.limit, show=args.show)
            # A copy parked before passwords were masked may still quote one.
            print(redact("\n".join(seen.lines())), file=out)
        else:
            _check_queue(connection, dead_letter_queue, "dead-letter queue")
            _check_queue(connection, queue, "work queue")
            # With EXTERNAL the broker names the user from the certificate: not known here.
            username = None if url.external_login(client_certificate) else url.username
            progress = replay(
                connection, dead_letter_queue, queue, count=args.count, username=username
            )
            _close_after_acks(connection, queue, progress)
            for line in progress.left:
                print(redact(line), file=out)
            print(redact(progress.summary(dead_letter_queue, queue)), file=out)
    except pika.exceptions.AMQPError as e:  # a lost connection between the steps above
        out.flush()
        failure = _broker_failure(e, f"{args.action} failed")
        print(f"{prefix}: error: {redact(escape(str(failure)))}", file=err)
        return failure.status
    except CommandFailed as e:
        if isinstance(e, ReplayStopped):
            for line in e.progress.left:
                print(redact(line), file=out)
            print(redact(e.progress.summary(dead_letter_queue, queue)), file=out)
        out.flush()
        print(f"{prefix}: error: {redact(escape(str(e)))}", file=err)
        return e.status
    finally:
        _close(connection)
    return int(ExitStatus.OK)


def _close_after_acks(connection: pika.BlockingConnection, queue: str, progress: Progress) -> None:
    """Close, and so know that the broker took every ack: it answers the close after them."""
    try:
        connection.close()
    except (pika.exceptions.AMQPError, OSError) as e:
        raise ReplayStopped(
            UNAVAILABLE,
            f"the connection failed while closing ({e!r}): the broker may have missed the last "
            f"ack(s), so the last message(s) replayed to {queue!r} may still be parked too",
            progress,
        ) from None


def _close(connection: pika.BlockingConnection | None) -> None:
    """Close politely, so that the acks sent are processed and the rest are requeued."""
    if connection is not None and connection.is_open:
        # A failed close is fine: a lost connection's unacked messages are requeued just the same.
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            connection.close()


def _whole(option: str, low: int) -> Any:
    def convert(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(
                f"{option} must be a whole number of at least {low}, got {raw!r}"
            )
        return value

    return convert
