"""`python -m consumer_svc dead-letters`: `list` takes nothing away, `replay` moves messages safely.

The dead-letter queue is filled the way the service fills it: copies of the original
messages with the ``consumer-svc-*`` headers added. The command runs as a subprocess
from an empty directory, so it is the installed package that runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import amqp_tools
import pika
import pytest
from amqp_tools import connect, get_messages
from rabbitmq import RabbitNode, free_port
from waiting import poll_until

from consumer_svc import _deadletters

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


def park(
    node: RabbitNode, queue: str, reasons: list[str], arguments: dict[str, Any] | None = None
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


def dead_letters(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the command against ``url``, with no AMQP_URL or CONSUMER_* from our environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMQP_", "CONSUMER_"))}
    return subprocess.run(
        [sys.executable, "-m", "consumer_svc", "dead-letters", "--url", url, *args],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env, check=False,
    )  # fmt: skip


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


def test_an_unreachable_broker_exits_69(tmp_path: Path) -> None:
    """Nothing listening on the port: exit 69 with one line naming host:port and why, no traceback."""
    port = free_port()

    result = dead_letters(tmp_path, f"amqp://guest:guest@127.0.0.1:{port}/", "--queue", "q", "list")

    assert result.returncode == 69
    assert result.stderr == (
        f"consumer_svc dead-letters: error: cannot reach 127.0.0.1:{port}: connection refused\n"
    )


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ("--url", "http://guest:s3cret@127.0.0.1/", "--queue", "q", "list"),
            "--url must start with amqp:// or amqps://, got 'http://guest:***@127.0.0.1/'",
        ),
        (
            ("--queue", "q", "replay", "--count", "0"),
            "--count must be a whole number of at least 1",
        ),
        (
            ("--queue", "q", "list", "--limit", "many"),
            "--limit must be a whole number of at least 1",
        ),
        (("list",), "no queue given: use --queue NAME, CONSUMER_QUEUE, or queue = NAME"),
    ],
)
def test_bad_arguments_exit_64_in_one_line(
    tmp_path: Path, args: tuple[str, ...], error: str
) -> None:
    """A bad argument or URL exits 64 before connecting, in one line that masks any password."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMQP_", "CONSUMER_"))}
    result = subprocess.run(
        [sys.executable, "-m", "consumer_svc", "dead-letters", *args],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env, check=False,
    )  # fmt: skip

    assert result.returncode == 64
    assert result.stderr.count("\n") == 1
    assert error in result.stderr
    assert "s3cret" not in result.stderr


def test_the_command_line_installs_no_reactor(tmp_path: Path) -> None:
    """Importing `python -m consumer_svc`'s module leaves the reactor and pika's Twisted adapter unimported."""
    probe = (
        "import sys, consumer_svc.__main__; "
        "print(sorted({'twisted.internet.reactor', 'pika.adapters.twisted_connection'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=True,
    )  # fmt: skip

    assert result.stdout == "[]\n"
