"""`python -m consumer_svc dead-letters`: `list` takes nothing away, `replay` moves messages safely.

The dead-letter queue is filled the way the service fills it: copies of the original
messages with the ``consumer-svc-*`` headers added, and also as a hostile publisher
would (terminal escapes, keys that are not UTF-8, CC and x-death, headers pika cannot
decode). The command runs as a subprocess from an empty directory, so it is the
installed package that runs; it finds the broker as the service does (TLS, --url-file,
the environment, --config).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pika
import pytest
from support import amqp_tools
from support.amqp_tools import connect, get_messages
from support.certs import CA, TLSBroker
from support.dead_letters import dead_letters, tool
from support.waiting import poll_until

from consumer_svc import _deadletters
from consumer_svc.testing.rabbitmq import RabbitNode, free_port

pytestmark = pytest.mark.brokers("3.10", "4.0")
UNDECODABLE = "UndecodableBody: body of message {} ({} bytes) is not JSON: Expecting value: line 1 column 1 (char 0)"


def parked(queue: str, number: int, reason: str) -> tuple[bytes, pika.BasicProperties]:
    """A dead-letter copy as the service makes it: original properties and headers, plus ours."""
    headers = {
        "tenant": "acme",
        "consumer-svc-failure": reason,
        "consumer-svc-attempts": 6,
        "consumer-svc-failed-at": f"2026-11-23T08:01:{number:02}Z",
        "consumer-svc-original-exchange": "orders",
        "consumer-svc-original-routing-key": "order.created",
        "consumer-svc-queue": queue,
    }
    properties = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=f"m{number}",
        correlation_id=f"c{number}",
        reply_to="answers",
        timestamp=1_795_000_000 + number,
        headers=headers,
    )
    # Message 1 is not JSON, and longer than a summary shows.
    body = b"\xff\x00 not json " + b"z" * 60 if number == 1 else f'{{"order": {number}}}'.encode()
    return body, properties


class HasURL(Protocol):
    """A broker node, or anything else that gives its URL."""

    def url(self) -> str: ...


def park(
    node: HasURL, queue: str, reasons: list[str], arguments: dict[str, Any] | None = None
) -> list[bytes]:
    """Declare ``queue`` and fill ``<queue>.dead`` with one confirmed copy per reason; return the bodies."""
    connection = connect(node.url())
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, arguments=arguments)
        channel.queue_declare(f"{queue}.dead", durable=True)
        channel.confirm_delivery()
        bodies = []
        for number, reason in enumerate(reasons):
            body, properties = parked(queue, number, reason)
            channel.basic_publish("", f"{queue}.dead", body, properties, mandatory=True)
            bodies.append(body)
        return bodies
    finally:
        connection.close()


@pytest.fixture
def dlq(rabbit: RabbitNode, queue_name: str) -> Iterator[str]:
    """The dead-letter queue of ``queue_name``; deleted afterwards."""
    name = f"{queue_name}.dead"
    yield name
    amqp_tools.delete(rabbit.url(), name)


def counts(node: RabbitNode, queue: str) -> tuple[int, int]:
    """``(ready, unacked)`` as the queue process reports them."""
    stats = node.list_queues()[queue]
    return stats.messages_ready, stats.messages_unacknowledged


def settles_at(node: RabbitNode, queue: str, expected: tuple[int, int]) -> None:
    """Wait until ``queue`` holds ``expected`` (ready, unacked): rabbitmqctl lags acks a little."""
    poll_until(lambda: counts(node, queue) == expected, 10, message=f"{queue} at {expected}")


def test_list_tallies_the_failures_and_takes_nothing_away(
    rabbit: RabbitNode, queue_name: str, dlq: str, tmp_path: Path
) -> None:
    """`list` counts the parked messages and tallies why they failed, most common first, and afterwards every message is still parked, in order, none unacked."""
    bodies = park(
        rabbit,
        queue_name,
        [
            "ValueError: bad payload (gave up after 6 attempts)",
            UNDECODABLE.format(2, 72),
            "ValueError: bad payload (gave up after 6 attempts)",
            "Reject: malformed order",
            UNDECODABLE.format(7, 12),
            "ValueError: bad payload (gave up after 6 attempts)",
        ],
    )

    result = dead_letters(tmp_path, rabbit.url(), "--queue", queue_name, "list", "--show", "2")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{dlq}: 6 message(s)",
        "failures, most common first:",
        "  3  ValueError: bad payload",
        "  2  UndecodableBody: body of message # (# bytes) is not JSON: Expecting value: line 1 column 1 (char 0)",
        "  1  Reject: malformed order",
        "the first 2:",
        "  1. ValueError: bad payload",
        "     attempts 6, failed at 2026-11-23T08:01:00Z, from exchange 'orders' routing key 'order.created', message id 'm0'",
        "     headers: tenant='acme'",
        '     body (12 bytes): {"order": 0}',
        "  2. " + UNDECODABLE.format(2, 72),
        "     attempts 6, failed at 2026-11-23T08:01:01Z, from exchange 'orders' routing key 'order.created', message id 'm1'",
        "     headers: tenant='acme'",
        "     body (72 bytes): \\xff\\x00 not json " + "z" * 48 + "...",
    ]
    settles_at(rabbit, dlq, (6, 0))
    assert [m.body for m in get_messages(rabbit.url(), dlq)] == bodies


def test_list_says_when_the_queue_holds_more_than_the_limit(
    rabbit: RabbitNode, queue_name: str, dlq: str, tmp_path: Path
) -> None:
    """With --limit 3 and five parked messages, `list` tallies three, says there are more, and leaves all five."""
    park(rabbit, queue_name, ["ValueError: bad payload"] * 5)

    result = dead_letters(
        tmp_path, rabbit.url(), "--queue", queue_name, "list", "--limit", "3", "--show", "0"
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{dlq}: 5 message(s), more than --limit: tallied the first 3",
        "failures, most common first:",
        "  3  ValueError: bad payload",
    ]
    settles_at(rabbit, dlq, (5, 0))


def test_replay_moves_every_message_back_without_our_headers(
    rabbit: RabbitNode, queue_name: str, dlq: str, tmp_path: Path
) -> None:
    """`replay` moves every parked message to the work queue in order, body and properties kept, every consumer-svc-* header gone."""
    bodies = park(rabbit, queue_name, ["ValueError: bad payload", "Reject: malformed order"])

    result = dead_letters(tmp_path, rabbit.url(), "--queue", queue_name, "replay")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"replayed 2 message(s) from {dlq} to {queue_name}\n"
    settles_at(rabbit, dlq, (0, 0))
    replayed = get_messages(rabbit.url(), queue_name)
    assert [m.body for m in replayed] == bodies
    for number, message in enumerate(replayed):
        original = parked(queue_name, number, "")[1]
        p = message.properties
        assert message.routing_key == queue_name
        assert p.headers == {"tenant": "acme"}
        assert (p.content_type, p.delivery_mode, p.message_id, p.correlation_id) == (
            original.content_type,
            original.delivery_mode,
            original.message_id,
            original.correlation_id,
        )
        assert (p.reply_to, p.timestamp) == (original.reply_to, original.timestamp)


def test_replay_count_moves_exactly_the_first_n(
    rabbit: RabbitNode, queue_name: str, dlq: str, tmp_path: Path
) -> None:
    """`replay --count 2` moves the first two parked messages and leaves the other three parked."""
    bodies = park(rabbit, queue_name, [f"ValueError: {n}" for n in range(5)])

    result = dead_letters(tmp_path, rabbit.url(), "--queue", queue_name, "replay", "--count", "2")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"replayed 2 message(s) from {dlq} to {queue_name}\n"
    settles_at(rabbit, dlq, (3, 0))
    assert [m.body for m in get_messages(rabbit.url(), queue_name)] == bodies[:2]


def test_replay_into_a_missing_work_queue_moves_nothing(
    rabbit: RabbitNode, queue_name: str, dlq: str, tmp_path: Path
) -> None:
    """When the work queue does not exist, `replay` says so in one line, exits 66 and every message stays parked."""
    park(rabbit, queue_name, ["ValueError: bad payload"] * 2)
    elsewhere = f"{queue_name}-gone"

    result = dead_letters(
        tmp_path,
        rabbit.url(),
        *("--queue", elsewhere, "--dead-letter-queue", dlq, "replay"),
    )

    assert result.returncode == 66
    assert result.stderr == (
        f"consumer_svc dead-letters: error: work queue {elsewhere!r} does not exist\n"
    )
    settles_at(rabbit, dlq, (2, 0))


def test_a_refused_copy_stops_the_replay_and_stays_parked(
    rabbit: RabbitNode, queue_name: str, dlq: str, tmp_path: Path
) -> None:
    """When the broker nacks a copy (the work queue is full), `replay` stops there, says how many moved, exits 69, and the rest stays parked."""
    full_after_one = {"x-max-length": 1, "x-overflow": "reject-publish"}
    park(rabbit, queue_name, ["ValueError: bad payload"] * 3, full_after_one)

    result = dead_letters(tmp_path, rabbit.url(), "--queue", queue_name, "replay")

    assert result.returncode == 69
    assert result.stdout == f"replayed 1 message(s) from {dlq} to {queue_name}\n"
    assert result.stderr == (
        f"consumer_svc dead-letters: error: replaying message 2 of {dlq!r} failed: "
        "the broker refused the copy (nack); it stays parked\n"
    )
    settles_at(rabbit, dlq, (2, 0))
    settles_at(rabbit, queue_name, (1, 0))


def test_an_unroutable_copy_stops_the_replay_and_stays_parked(
    rabbit: RabbitNode, queue_name: str, dlq: str
) -> None:
    """A copy the broker returns as unroutable stops the replay, and its message goes back to the dead-letter queue."""
    park(rabbit, queue_name, ["ValueError: bad payload"] * 2)
    connection = connect(rabbit.url())
    try:
        with pytest.raises(_deadletters.ReplayStopped) as stopped:
            _deadletters.replay(connection, dlq, f"{queue_name}-gone", count=None)
    finally:
        connection.close()

    assert (stopped.value.status, stopped.value.moved) == (66, 0)
    assert "it stays parked" in str(stopped.value)
    settles_at(rabbit, dlq, (2, 0))


def test_a_missing_dead_letter_queue_exits_66(
    rabbit: RabbitNode, queue_name: str, tmp_path: Path
) -> None:
    """With no dead-letter queue, the command exits 66 with one line naming it, and declares nothing."""
    result = dead_letters(tmp_path, rabbit.url(), "--queue", queue_name, "list")

    assert result.returncode == 66
    assert result.stderr == (
        f"consumer_svc dead-letters: error: dead-letter queue '{queue_name}.dead' does not exist\n"
    )
    assert f"{queue_name}.dead" not in rabbit.list_queues()


def test_a_wrong_password_exits_77_and_is_not_printed(rabbit: RabbitNode, tmp_path: Path) -> None:
    """A refused login exits 77 with one line naming the user, never the password."""
    result = dead_letters(tmp_path, rabbit.url(password="n0t-the-Passw0rd"), "--queue", "q", "list")

    assert result.returncode == 77
    assert result.stderr.startswith("consumer_svc dead-letters: error: access refused: ")
    assert result.stderr.count("\n") == 1
    assert "user 'guest'" in result.stderr
    assert "n0t-the-Passw0rd" not in result.stdout + result.stderr


# -- finding the broker as the service does: TLS, --url-file, AMQP_URL, --config


def test_list_over_tls_verifies_the_broker_with_tls_ca(
    tls_broker: TLSBroker, queue_name: str, tmp_path: Path
) -> None:
    """Over amqps:// with --tls-ca (a CA no system trusts), `list` verifies the broker and reads the queue."""
    park(tls_broker.node, queue_name, ["ValueError: bad payload"])

    result = tool(
        tmp_path,
        *("--url", tls_broker.url(), "--tls-ca", str(tls_broker.ca.path)),
        *("--queue", queue_name, "list", "--show", "0"),
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"{queue_name}.dead: 1 message(s)"


def test_a_broker_certificate_from_an_untrusted_ca_is_refused(
    tls_broker: TLSBroker, tmp_path: Path
) -> None:
    """Without the test CA in --tls-ca, the broker's certificate fails verification: exit 69 saying why."""
    other = CA(tmp_path, name="another CA")

    result = tool(
        tmp_path, "--url", tls_broker.url(), "--tls-ca", str(other.path), "--queue", "q", "list"
    )

    assert result.returncode == 69
    assert result.stderr.startswith(
        f"consumer_svc dead-letters: error: cannot reach localhost:{tls_broker.port}: TLS failed"
    )
    assert "certificate verify failed" in result.stderr


def test_mutual_tls_without_credentials_logs_in_with_external(
    tls_broker: TLSBroker, queue_name: str, tmp_path: Path
) -> None:
    """A URL without credentials plus --tls-cert/--tls-key (from CONSUMER_*) logs in as the certificate's user, in a vhost that guest may not enter."""
    vhost = f"certificate-only-{queue_name[-6:]}"
    tls_broker.node.add_vhost(vhost)
    tls_broker.node.set_permissions(vhost, "consumer-client")
    tls_broker.node.set_permissions(vhost, "guest")  # to park; then taken away again
    park_url = tls_broker.node.url(vhost=vhost)
    park(RabbitAt(park_url), queue_name, ["ValueError: bad payload"] * 2)
    tls_broker.node.ctl("clear_permissions", "-p", vhost, "guest")
    cert, key = tls_broker.client

    result = tool(
        tmp_path,
        *("--url", tls_broker.url(credentials="").replace("%2F", vhost), "--queue", queue_name),
        "list",
        env={
            "CONSUMER_TLS_CA": str(tls_broker.ca.path),
            "CONSUMER_TLS_CERT": str(cert),
            "CONSUMER_TLS_KEY": str(key),
        },
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"{queue_name}.dead: 2 message(s)"


class RabbitAt:
    """Enough of a `RabbitNode` for `park`: a node known by one URL."""

    def __init__(self, url: str) -> None:
        self._url = url

    def url(self) -> str:
        return self._url


def test_url_file_names_the_broker_and_its_password_stays_unprinted(
    rabbit: RabbitNode, queue_name: str, dlq: str, tmp_path: Path
) -> None:
    """--url-file gives the broker URL (with a password) from a file, as for the service."""
    rabbit.add_user(f"reader-{queue_name[-6:]}", "Fi1e-Passw0rd")
    rabbit.set_permissions("/", f"reader-{queue_name[-6:]}")
    park(rabbit, queue_name, ["ValueError: bad payload"])
    url_file = tmp_path / "url"
    url_file.write_text(
        f"# the broker\n{rabbit.url(f'reader-{queue_name[-6:]}', 'Fi1e-Passw0rd')}\n"
    )

    result = tool(tmp_path, "--url-file", str(url_file), "--queue", queue_name, "list")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"{dlq}: 1 message(s)"
    assert "Fi1e-Passw0rd" not in result.stdout + result.stderr


def test_amqp_url_and_consumer_queue_come_from_the_environment(
    rabbit: RabbitNode, queue_name: str, dlq: str, tmp_path: Path
) -> None:
    """With no --url and no --queue, $AMQP_URL names the broker and $CONSUMER_QUEUE the queue."""
    park(rabbit, queue_name, ["ValueError: bad payload"] * 3)

    result = tool(tmp_path, "list", env={"AMQP_URL": rabbit.url(), "CONSUMER_QUEUE": queue_name})

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"{dlq}: 3 message(s)"


def test_the_config_file_gives_url_queue_and_dead_letter_queue(
    rabbit: RabbitNode, queue_name: str, tmp_path: Path
) -> None:
    """--config reads the service's [consumer] section (service-only keys too): url, queue and dead-letter-queue."""
    parked_in = f"{queue_name}.parked"
    connection = connect(rabbit.url())
    try:
        channel = connection.channel()
        channel.queue_declare(parked_in, durable=True)
        channel.basic_publish("", parked_in, b"x", parked(queue_name, 0, "Reject: no")[1])
    finally:
        connection.close()
    config = tmp_path / "tap.conf"
    config.write_text(
        f"[consumer]\nurl = {rabbit.url()}\nqueue = {queue_name}\n"
        f"dead-letter-queue = {parked_in}\nprefetch = 7\n"
    )
    try:
        result = tool(tmp_path, "--config", str(config), "list", "--show", "0")
    finally:
        amqp_tools.delete(rabbit.url(), parked_in)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{parked_in}: 1 message(s)",
        "failures, most common first:",
        "  1  Reject: no",
    ]


def test_the_command_line_beats_the_environment_which_beats_the_config_file(
    rabbit: RabbitNode, queue_name: str, dlq: str, tmp_path: Path
) -> None:
    """The service's precedence: --url over $AMQP_URL over the config file's url (a dead port below each winner)."""
    park(rabbit, queue_name, ["ValueError: bad payload"])
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    config = tmp_path / "tap.conf"
    config.write_text(f"[consumer]\nurl = {dead}\nqueue = {queue_name}\n")

    environment_wins = tool(
        tmp_path, "--config", str(config), "list", env={"AMQP_URL": rabbit.url()}
    )
    command_line_wins = tool(
        tmp_path, "--config", str(config), "--url", rabbit.url(), "list", env={"AMQP_URL": dead}
    )
    file_alone = tool(tmp_path, "--config", str(config), "list")

    assert environment_wins.returncode == 0, environment_wins.stderr
    assert command_line_wins.returncode == 0, command_line_wins.stderr
    assert file_alone.returncode == 69
    assert "connection refused" in file_alone.stderr


# -- untrusted text, escaped; messages pika cannot decode


def test_list_escapes_hostile_headers_and_a_non_utf8_key(
    rabbit: RabbitNode, queue_name: str, dlq: str, tmp_path: Path
) -> None:
    """Terminal escapes in the reason, headers, message id and body, and a key that is not UTF-8, reach stdout as escapes, never raw."""
    amqp_tools.declare(rabbit.url(), dlq)
    headers: dict[Any, Any] = {
        "consumer-svc-failure": "ValueError: \x1b[2J\x1b]0;owned\x07 \u202egnp.exe",
        "consumer-svc-attempts": 6,
        "consumer-svc-original-exchange": "orders\r\x1b[1A",
        b"\xff\xfekey": b"\xc3\x28\x1b[31m",
        "note": "\x9b6n\u2067",
    }
    properties = pika.BasicProperties(headers=headers, message_id="m\x1b[5m")
    amqp_tools_publish(rabbit.url(), dlq, b"\x1b[?1049h body", properties)

    result = tool(tmp_path, "--url", rabbit.url(), "--queue", queue_name, "list")

    assert result.returncode == 0, result.stderr
    # Not splitlines(): it would split on a raw CR or U+2028 and hide them.
    assert all(c.isprintable() or c == "\n" for c in result.stdout)
    lines = result.stdout.splitlines()
    assert lines[2] == "  1  ValueError: \\x1b[2J\\x1b]0;owned\\x07 \\u202egnp.exe"
    assert lines[5] == (
        "     attempts 6, failed at ?, from exchange 'orders\\r\\x1b[1A' routing key '',"
        " message id 'm\\x1b[5m'"
    )
    assert lines[6].startswith("     headers: ")
    assert sorted(lines[6].removeprefix("     headers: ").split(", ")) == [
        "\\xff\\xfekey='\\xc3(\\x1b[31m'",
        "note='\\x9b6n\\u2067'",
    ]
    assert lines[7] == "     body (13 bytes): \\x1b[?1049h body"


def test_replay_keeps_a_non_utf8_header_key(
    rabbit: RabbitNode, queue_name: str, dlq: str, tmp_path: Path
) -> None:
    """A header key and value that are not UTF-8 neither crash `replay` nor get lost: the copy carries them."""
    park(rabbit, queue_name, [])
    properties = pika.BasicProperties(headers={b"\xff\xfekey": b"\xc3\x28", "tenant": "acme"})
    amqp_tools_publish(rabbit.url(), dlq, b"bytes", properties)

    result = tool(tmp_path, "--url", rabbit.url(), "--queue", queue_name, "replay")

    assert result.returncode == 0, result.stderr
    [copy] = get_messages(rabbit.url(), queue_name)
    # Byte for byte: pika gives the key as bytes, the service's codec as surrogate escapes.
    keys = {
        k.encode("utf-8", "surrogateescape") if isinstance(k, str) else k: v
        for k, v in copy.properties.headers.items()
    }
    assert keys == {b"\xff\xfekey": b"\xc3\x28", b"tenant": "acme"}


def amqp_tools_publish(url: str, queue: str, body: bytes, properties: pika.BasicProperties) -> None:
    """Publish one message with ``properties`` as given, confirmed."""
    connection = connect(url)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", queue, body, properties, mandatory=True)
    finally:
        connection.close()


class RawProperties(pika.BasicProperties):
    """Properties sent as the given bytes: headers RabbitMQ takes and pika cannot decode."""

    def __init__(self, encoded: bytes) -> None:
        super().__init__()
        self.encoded = encoded

    def encode(self) -> list[bytes]:
        return [self.encoded]


#: A 'T' timestamp in year 10000: Python's datetime, and so pika's decoder, cannot hold it.
PAST_9999 = struct.pack(">Q", 253_402_300_800 + 86_400)


def undecodable_properties(message_id: bytes) -> RawProperties:
    """Properties with a message id and a headers table pika's decoder raises on."""
    entry = b"\x04when" + b"T" + PAST_9999
    flags = pika.BasicProperties.FLAG_HEADERS | pika.BasicProperties.FLAG_MESSAGE_ID
    return RawProperties(
        struct.pack(">HI", flags, len(entry)) + entry + bytes([len(message_id)]) + message_id
    )


def park_with_an_undecodable_one(node: RabbitNode, queue: str) -> None:
    """Park a good message, one pika cannot decode (message id 'bad-1'), and another good one."""
    park(node, queue, ["ValueError: bad payload"])
    amqp_tools_publish(node.url(), f"{queue}.dead", b"unreadable", undecodable_properties(b"bad-1"))
    body, properties = parked(queue, 2, "ValueError: bad payload")
    amqp_tools_publish(node.url(), f"{queue}.dead", body, properties)


def test_list_reads_a_message_pika_alone_cannot_decode_and_goes_on(
    rabbit: RabbitNode, queue_name: str, dlq: str, tmp_path: Path
) -> None:
    """A timestamp past year 9999 (pika alone raises on it) is read, clamped, between two good ones; all three stay parked."""
    park_with_an_undecodable_one(rabbit, queue_name)

    result = tool(tmp_path, "--url", rabbit.url(), "--queue", queue_name, "list")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"{dlq}: 3 message(s)"
    assert "9999-12-31 23:59:59+00:00" in result.stdout
    settles_at(rabbit, dlq, (3, 0))


def test_replay_moves_a_message_pika_alone_cannot_decode_with_the_rest(
    rabbit: RabbitNode, queue_name: str, dlq: str, tmp_path: Path
) -> None:
    """`replay` moves all three; the far-future timestamp arrives clamped to the last second datetime holds."""
    park_with_an_undecodable_one(rabbit, queue_name)

    result = tool(tmp_path, "--url", rabbit.url(), "--queue", queue_name, "replay")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"replayed 3 message(s) from {dlq} to {queue_name}"]
    settles_at(rabbit, dlq, (0, 0))
    messages = get_messages(rabbit.url(), queue_name)
    assert [m.properties.message_id for m in messages] == ["m0", "bad-1", "m2"]
    assert str(messages[1].headers["when"]) == "9999-12-31 23:59:59+00:00"


# -- what a replayed copy may carry


def test_a_replayed_copy_is_stripped_and_lands_only_in_the_work_queue(
    rabbit: RabbitNode, queue_name: str, dlq: str, tmp_path: Path
) -> None:
    """A parked message with CC, x-death, x-first-death-* and another user's user_id is replayed persistent, without them, noted in consumer-svc-stripped, and the queue CC named gets nothing."""
    publisher = f"publisher-{queue_name[-6:]}"
    rabbit.add_user(publisher, "pub-Passw0rd")
    rabbit.set_permissions("/", publisher)
    park(rabbit, queue_name, [])
    elsewhere = f"{queue_name}.elsewhere"
    properties = pika.BasicProperties(
        delivery_mode=pika.DeliveryMode.Transient,
        user_id=publisher,
        message_id="m-cc",
        headers={
            "tenant": "acme",
            "CC": [elsewhere],
            "x-death": [{"queue": queue_name, "reason": "rejected", "count": 1}],
            "x-first-death-queue": queue_name,
            "consumer-svc-failure": "ValueError: bad payload",
        },
    )
    # Parked before `elsewhere` exists, so that only a replay could put anything there.
    amqp_tools_publish(rabbit.url(publisher, "pub-Passw0rd"), dlq, b"cc me", properties)
    amqp_tools.declare(rabbit.url(), elsewhere)
    try:
        result = tool(tmp_path, "--url", rabbit.url(), "--queue", queue_name, "replay")

        assert result.returncode == 0, result.stderr
        assert amqp_tools.queue_counts(rabbit.url(), elsewhere) == (0, 0)
    finally:
        amqp_tools.delete(rabbit.url(), elsewhere)
    [copy] = get_messages(rabbit.url(), queue_name)
    p = copy.properties
    assert (copy.body, p.message_id, p.user_id, p.delivery_mode) == (b"cc me", "m-cc", None, 2)
    assert p.headers == {
        "tenant": "acme",
        "consumer-svc-original-user-id": publisher,
        "consumer-svc-stripped": "CC, x-death, x-first-death-queue, user_id",
    }


def test_list_masks_the_password_it_connects_with(
    rabbit: RabbitNode, queue_name: str, dlq: str, tmp_path: Path
) -> None:
    """A parked copy whose failure quotes the password the tool connects with is listed with it masked."""
    rabbit.add_user("dl-reader", "Dl-secret@42")
    rabbit.set_permissions("/", "dl-reader")
    park(rabbit, queue_name, ["ConnectionError: login Dl-secret@42 refused"])
    url = f"amqp://dl-reader:Dl-secret%4042@127.0.0.1:{rabbit.amqp_port}/%2F"
    done = dead_letters(tmp_path, url, "--queue", queue_name, "list")
    assert done.returncode == 0, done.stderr
    assert "Dl-secret" not in done.stdout
    assert "ConnectionError: login *** refused" in done.stdout


def test_connection_options_may_follow_the_command(
    rabbit: RabbitNode, queue_name: str, dlq: str, tmp_path: Path
) -> None:
    """`list --queue Q --url U` works as `--queue Q --url U list` does (it used to say "required: --queue")."""
    park(rabbit, queue_name, ["ValueError: bad payload"])

    after = tool(tmp_path, "list", "--queue", queue_name, "--url", rabbit.url(), "--show", "0")
    before = tool(tmp_path, "--queue", queue_name, "--url", rabbit.url(), "list", "--show", "0")

    assert after.returncode == 0, after.stderr
    assert after.stdout == before.stdout
    assert after.stdout.splitlines()[0] == f"{dlq}: 1 message(s)"
