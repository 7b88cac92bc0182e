"""The dead-letter queue, for a person: see what is parked there and why, and replay it.

``python -m consumer_svc dead-letters --queue NAME list`` tallies the failures without
taking anything away; ``... replay [--count N]`` moves messages back to the work queue,
each one confirmed there before it leaves the dead-letter queue. A short-lived command,
so it uses pika's ``BlockingConnection``: no reactor is installed or needed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import pika
import pika.exceptions
from pika.adapters.utils import connection_workflow

from ._copies import PREFIX
from ._errors import ConfigurationError, ExitStatus
from ._retry import ATTEMPTS, FAILED_AT, FAILURE, ORIGINAL_EXCHANGE, ORIGINAL_ROUTING_KEY
from ._settings import DEFAULT_URL, BrokerURL, parse_url, redact

#: sysexits.h statuses that `ExitStatus` has no member for (the service never needs them).
NO_INPUT = 66  # EX_NOINPUT: the dead-letter queue (or the work queue) does not exist
UNAVAILABLE = 69  # EX_UNAVAILABLE: the broker cannot be reached, or went away

#: Bytes of a body shown in a summary.
PREVIEW_BYTES = 60
#: Failure reasons listed by `list`; the rest are counted in one line.
REASON_LINES = 20
#: Every wait of the connection is bounded (connect, handshake, a blocked publish).
CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 15.0
BLOCKED_TIMEOUT = 30.0

_GAVE_UP = re.compile(r" \(gave up after \d+ attempts\)$")
_NUMBERS = re.compile(r"(\d+)")
_BROKER_CLOSE = re.compile(r"\((\d+)\) ['\"](.*)['\"]\s*$")


class CommandFailed(Exception):
    """The command cannot go on: its message is one line for stderr, with an exit status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- pure parts: reasons, headers, previews


def reason_of(headers: Mapping[str, Any] | None) -> str:
    """The failure a parked message carries, without the service's "(gave up after N attempts)"."""
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


def clean_headers(headers: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The headers without any ``consumer-svc-*`` one: a replayed message starts afresh."""
    kept = {key: value for key, value in (headers or {}).items() if not key.startswith(PREFIX)}
    return kept or None


def preview(body: bytes, limit: int = PREVIEW_BYTES) -> str:
    """The first ``limit`` bytes of ``body`` as printable text (escapes for the rest)."""
    text = body[:limit].decode("utf-8", "backslashreplace")
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return text + ("..." if len(body) > limit else "")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


# -- talking to the broker


def connection_parameters(url: BrokerURL) -> pika.ConnectionParameters:
    """Parameters for ``url`` with every wait bounded, named in the broker's connection list."""
    ssl_options = None
    if url.tls:
        ssl_options = pika.SSLOptions(ssl.create_default_context(), server_hostname=url.host)
    return pika.ConnectionParameters(
        host=url.host,
        port=url.port,
        virtual_host=url.vhost,
        credentials=pika.PlainCredentials(url.username, url.password),
        ssl_options=ssl_options,
        connection_attempts=1,
        socket_timeout=CONNECT_TIMEOUT,
        stack_timeout=HANDSHAKE_TIMEOUT,
        blocked_connection_timeout=BLOCKED_TIMEOUT,
        client_properties={"connection_name": "consumer_svc dead-letters"},
    )


def connect(urls: list[BrokerURL]) -> pika.BlockingConnection:
    """Connect to the first of ``urls`` that answers; fail with the last one's reason."""
    failure = CommandFailed(UNAVAILABLE, "no broker URL given")
    for url in urls:
        try:
            return pika.BlockingConnection(connection_parameters(url))
        except (
            pika.exceptions.AMQPError,
            connection_workflow.AMQPConnectorException,
            OSError,
        ) as e:
            failure = _connect_failure(e, url)
            if failure.status == ExitStatus.ACCESS_REFUSED:
                break  # another node of the cluster would refuse the same credentials
    raise failure


def _broker_text(error: BaseException) -> str:
    """The broker's own words from pika's "probable ... error" exceptions."""
    text = str(error.args[0]) if error.args else str(error)
    match = _BROKER_CLOSE.search(text)
    return f"{match.group(2)}" if match else text


def _connect_failure(error: BaseException, url: BrokerURL) -> CommandFailed:
    where = f"{url.host}:{url.port}"
    who = f"user {url.username!r}, vhost {url.vhost!r}, {where}"
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
    headers: Mapping[str, Any]
    message_id: str | None

    def describe(self) -> list[str]:
        h = self.headers
        origin = (
            f"from exchange {_text(h.get(ORIGINAL_EXCHANGE))!r}"
            f" routing key {_text(h.get(ORIGINAL_ROUTING_KEY))!r}"
        )
        details = [
            f"attempts {_text(h.get(ATTEMPTS)) or '?'}",
            f"failed at {_text(h.get(FAILED_AT)) or '?'}",
            origin,
        ]
        if self.message_id:
            details.append(f"message id {self.message_id!r}")
        return [
            reason_of(h),
            ", ".join(details),
            f"body ({len(self.body)} bytes): {preview(self.body)}",
        ]


@dataclass
class Inventory:
    """What `list` saw in the dead-letter queue."""

    queue: str
    #: Ready messages when we started, by a passive declare.
    ready: int
    reasons: list[str] = field(default_factory=list)
    first: list[Parked] = field(default_factory=list)
    #: Whether the queue held more than the limit.
    more: bool = False

    def lines(self) -> list[str]:
        seen = len(self.reasons)
        if self.more:
            total = max(self.ready, seen + 1)
            head = f"{self.queue}: {total} message(s), more than --limit: tallied the first {seen}"
        else:
            head = f"{self.queue}: {seen} message(s)"
        out = [head]
        if not seen:
            return out
        rows = tally(self.reasons)
        width = len(str(rows[0][0]))
        out.append("failures, most common first:")
        out.extend(f"  {count:>{width}}  {reason}" for count, reason in rows[:REASON_LINES])
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
    connection, and the broker puts them all back, in their order.
    """
    result = Inventory(queue, ready=_check_queue(connection, queue, "dead-letter queue"))
    channel = connection.channel()
    try:
        # One more than the limit tells whether the queue holds more.
        while len(result.reasons) <= limit:
            method, properties, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                break
            if len(result.reasons) == limit:
                result.more = True
                break
            headers = properties.headers or {}
            result.reasons.append(reason_of(headers))
            if len(result.first) < show:
                result.first.append(Parked(body, headers, properties.message_id))
    except pika.exceptions.AMQPError as e:
        raise _broker_failure(e, f"reading {queue!r} failed") from None
    return result


# -- replay


class ReplayStopped(CommandFailed):
    """Replaying stopped on a failure after ``moved`` messages; the current one stays parked."""

    def __init__(self, status: int, message: str, moved: int) -> None:
        super().__init__(status, message)
        self.moved = moved


def replay(
    connection: pika.BlockingConnection, dead_letter_queue: str, queue: str, *, count: int | None
) -> int:
    """Move up to ``count`` (all when None) messages to ``queue``; return how many moved.

    One at a time: get (not acked), publish the cleaned copy to the default exchange
    with ``mandatory`` and a confirm, and only then ack the dead-letter copy. On a
    failure this raises `ReplayStopped`; the unacked message goes back to the
    dead-letter queue when the connection closes.
    """
    channel = connection.channel()
    channel.confirm_delivery()
    moved = 0
    while count is None or moved < count:
        what = f"replaying message {moved + 1} of {dead_letter_queue!r} failed"
        published = False
        try:
            method, properties, body = channel.basic_get(dead_letter_queue, auto_ack=False)
            if method is None:
                break
            properties.headers = clean_headers(properties.headers)
            # With confirms on, this waits for the broker's answer and raises unless it took the copy.
            channel.basic_publish("", queue, body, properties, mandatory=True)
            published = True
            channel.basic_ack(method.delivery_tag)
        except pika.exceptions.UnroutableError:
            raise ReplayStopped(
                NO_INPUT,
                f"{what}: the broker returned it, no queue {queue!r} to route it to; "
                "it stays parked",
                moved,
            ) from None
        except pika.exceptions.NackError:
            raise ReplayStopped(
                UNAVAILABLE, f"{what}: the broker refused the copy (nack); it stays parked", moved
            ) from None
        except pika.exceptions.AMQPError as e:
            failure = _broker_failure(e, what)
            fate = (
                f"its copy is in {queue!r} and it stays parked too: a duplicate if replayed again"
                if published
                else "it stays parked"
            )
            raise ReplayStopped(failure.status, f"{failure}; {fate}", moved) from None
        moved += 1
    return moved


# -- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dead-letters`` options and its ``list`` and ``replay`` commands."""
    parser.add_argument(
        "--queue", required=True, metavar="NAME", type=_name("--queue"), help="the work queue"
    )
    parser.add_argument(
        "--url",
        # argparse formats help with %: the %2F of the default URL needs escaping.
        help="the broker; several separated by commas for a cluster (default: $AMQP_URL, else "
        f"{DEFAULT_URL.replace('%', '%%')}); prefer $AMQP_URL, as --url shows in ps",
    )
    parser.add_argument(
        "--dead-letter-queue",
        metavar="NAME",
        type=_name("--dead-letter-queue"),
        help="the dead-letter queue (default: <queue>.dead)",
    )
    commands = parser.add_subparsers(dest="action", required=True, metavar="{list,replay}")
    listing = commands.add_parser(
        "list",
        help="count the parked messages and tally why they failed; takes nothing away",
        description="Count the parked messages, tally their failures (most common first) and "
        "summarise the first few. Messages are read without an ack and all go back to the "
        "queue, in order, when the command ends.",
    )
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
        "routing key = the queue), without their consumer-svc-* headers so they get every "
        "retry again. Each copy is confirmed by the broker before the parked message is "
        "removed; on any failure the command stops and that message stays parked.",
    )
    replaying.add_argument(
        "--count",
        type=_whole("--count", 1),
        metavar="N",
        help="replay only the first N messages (default: all)",
    )


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
        raw = args.url or environ.get("AMQP_URL") or DEFAULT_URL
        urls = [parse_url(part) for part in raw.split(",") if part.strip()]
        if not urls:
            raise ConfigurationError("--url is empty")
        dead_letter_queue = args.dead_letter_queue or f"{args.queue}.dead"
        if dead_letter_queue == args.queue:
            raise ConfigurationError("--dead-letter-queue must not be the queue itself")
    except ConfigurationError as e:
        print(f"{prefix}: error: {e}", file=err)
        return int(ExitStatus.CONFIG)

    connection: pika.BlockingConnection | None = None
    try:
        connection = connect(urls)
        if args.action == "list":
            seen = inventory(connection, dead_letter_queue, limit=args.limit, show=args.show)
            print("\n".join(seen.lines()), file=out)
        else:
            _check_queue(connection, dead_letter_queue, "dead-letter queue")
            _check_queue(connection, args.queue, "work queue")
            moved = replay(connection, dead_letter_queue, args.queue, count=args.count)
            _close_after_acks(connection, args.queue, moved)
            print(f"replayed {moved} message(s) from {dead_letter_queue} to {args.queue}", file=out)
    except pika.exceptions.AMQPError as e:  # a lost connection between the steps above
        out.flush()
        failure = _broker_failure(e, f"{args.action} failed")
        print(f"{prefix}: error: {redact(str(failure))}", file=err)
        return failure.status
    except CommandFailed as e:
        if isinstance(e, ReplayStopped):
            print(
                f"replayed {e.moved} message(s) from {dead_letter_queue} to {args.queue}", file=out
            )
        out.flush()
        print(f"{prefix}: error: {redact(str(e))}", file=err)
        return e.status
    finally:
        _close(connection)
    return int(ExitStatus.OK)


def _close_after_acks(connection: pika.BlockingConnection, queue: str, moved: int) -> None:
    """Close, and so know that the broker took every ack: it answers the close after them."""
    try:
        connection.close()
    except (pika.exceptions.AMQPError, OSError) as e:
        raise ReplayStopped(
            UNAVAILABLE,
            f"the connection failed while closing ({e!r}): the broker may have missed the last "
            f"ack(s), so the last message(s) replayed to {queue!r} may still be parked too",
            moved,
        ) from None


def _close(connection: pika.BlockingConnection | None) -> None:
    """Close politely, so that the acks sent are processed and the rest are requeued."""
    if connection is not None and connection.is_open:
        # A failed close is fine: a lost connection's unacked messages are requeued just the same.
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            connection.close()


def _name(option: str) -> Any:
    def convert(raw: str) -> str:
        if not raw.strip():
            raise argparse.ArgumentTypeError(f"{option} must not be empty")
        return raw.strip()

    return convert


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
