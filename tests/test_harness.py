"""The test harness itself: throwaway brokers that start, break on purpose and clean up."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pika
import pika.exceptions
import pytest
import pytest_twisted
from amqp_tools import connect, declare, get_all, publish, queue_counts
from rabbitmq import CtlError, QueueStats, RabbitNode, RabbitNodeError, _port_is_free
from twisted.internet.defer import Deferred
from waiting import Timeout, eventually, poll_until, within

RabbitFactory = Callable[..., RabbitNode]


def _alive(pid: int) -> bool:
    """True for a live process; a zombie waiting to be reaped counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_node_takes_a_publish_and_delivers_it(rabbit: RabbitNode, queue_name: str) -> None:
    """A published message comes back to a pika consumer, and the queue ends empty."""
    publish(rabbit.url(), queue_name, [b"one", b"two"])
    connection = connect(rabbit.url())
    channel = connection.channel()
    got = []
    for method, _properties, body in channel.consume(queue_name, inactivity_timeout=5):
        assert method is not None, "no delivery within 5 s"
        channel.basic_ack(method.delivery_tag)
        got.append(body)
        if len(got) == 2:
            break
    channel.cancel()
    connection.close()
    assert got == [b"one", b"two"]
    poll_until(
        lambda: rabbit.list_queues()[queue_name] == QueueStats(0, 0, 0), 5, message="queue empty"
    )


def test_restart_app_keeps_persistent_messages(rabbit: RabbitNode, queue_name: str) -> None:
    """A durable queue keeps its persistent messages across stop_app/start_app."""
    publish(rabbit.url(), queue_name, [b"a", b"b", b"c"])
    rabbit.restart_app()
    assert queue_counts(rabbit.url(), queue_name) == (3, 0)


def test_kill_and_start_keep_persistent_messages(fresh_rabbit: RabbitNode, queue_name: str) -> None:
    """After kill -9 the node refuses connections; started again, it has its messages back."""
    url = fresh_rabbit.url()
    publish(url, queue_name, [b"survivor"])
    fresh_rabbit.kill()
    assert not fresh_rabbit.is_running()
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        connect(url, timeout=2)
    fresh_rabbit.start()
    assert get_all(url, queue_name) == [b"survivor"]


def test_close_all_connections_forces_a_live_connection_closed(rabbit: RabbitNode) -> None:
    """close_all_connections ends a live BlockingConnection with 320 CONNECTION_FORCED."""
    connection = connect(rabbit.url(), name="victim")
    rabbit.close_all_connections("maintenance")
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
        poll_until(lambda: connection.process_data_events(0.1), 10, message="the close")
    assert closed.value.reply_code == 320
    assert "maintenance" in closed.value.reply_text


def test_close_connection_picks_one_connection(rabbit: RabbitNode) -> None:
    """close_connection closes only the connection chosen by its client-given name."""
    keep, victim = connect(rabbit.url(), name="keep"), connect(rabbit.url(), name="victim")
    chosen = [c for c in rabbit.list_connections() if c.client_name == "victim"]
    assert [c.user for c in chosen] == ["guest"]
    rabbit.close_connection(chosen[0], "just you")
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker):
        poll_until(lambda: victim.process_data_events(0.1), 10, message="the close")
    keep.process_data_events(0.1)
    assert keep.is_open
    keep.close()


def test_a_memory_alarm_blocks_a_publisher_until_cleared(
    rabbit: RabbitNode, queue_name: str
) -> None:
    """Under a memory alarm a publisher is blocked; once cleared, its message gets through."""
    url = rabbit.url()
    declare(url, queue_name)
    publisher = connect(url, name="publisher")
    events: list[str] = []
    publisher.add_on_connection_blocked_callback(lambda *_: events.append("blocked"))
    publisher.add_on_connection_unblocked_callback(lambda *_: events.append("unblocked"))
    channel = publisher.channel()

    def pump() -> list[str]:
        publisher.process_data_events(0.05)
        return events

    try:
        rabbit.set_memory_alarm(True)
        assert rabbit.alarms() == ["memory"]
        channel.basic_publish("", queue_name, b"held back")  # no confirms: returns at once
        poll_until(lambda: "blocked" in pump(), 10, message="connection.blocked")
        states = {c.client_name: c.state for c in rabbit.list_connections()}
        assert states["publisher"] == "blocked"
        assert queue_counts(url, queue_name) == (0, 0)
    finally:
        rabbit.set_memory_alarm(False)
    poll_until(lambda: "unblocked" in pump(), 10, message="connection.unblocked")
    poll_until(lambda: queue_counts(url, queue_name) == (1, 0), 10, message="the message")
    publisher.close()


def test_a_vhost_user_connects_with_url(rabbit: RabbitNode) -> None:
    """A new user on a new vhost with a slash in its name connects through url()."""
    rabbit.add_vhost("team/a")
    rabbit.add_user("alice", "s3cret:/@")
    try:
        rabbit.set_permissions("team/a", "alice")
        connection = connect(rabbit.url("alice", "s3cret:/@", vhost="team/a"), name="alice")
        mine = {c.client_name: c for c in rabbit.list_connections()}["alice"]
        connection.close()
        assert (mine.user, mine.vhost) == ("alice", "team/a")
    finally:
        rabbit.ctl("delete_user", "alice")
        rabbit.ctl("delete_vhost", "team/a")


def test_ctl_errors_carry_the_command_output(rabbit: RabbitNode) -> None:
    """A failing rabbitmqctl command raises CtlError with its status and message."""
    with pytest.raises(CtlError) as failed:
        rabbit.ctl("delete_vhost", "no-such-vhost")
    assert failed.value.returncode != 0
    assert "no-such-vhost" in str(failed.value)


def test_after_stop_nothing_of_the_node_remains(rabbit_factory: RabbitFactory) -> None:
    """stop() ends every process the node started and frees its ports; a second stop is a no-op."""
    node = rabbit_factory()
    pids = node.leftover_pids()
    assert len(pids) >= 4  # epmd, the script, beam.smp, erl_child_setup at least
    node.stop()
    assert node.leftover_pids() == []
    assert [p for p in pids if _alive(p)] == []
    assert all(_port_is_free(p) for p in (node.amqp_port, node.dist_port, node.epmd_port))
    node.stop()
    with pytest.raises(RabbitNodeError):
        node.ctl("status")


def test_a_node_that_cannot_start_says_why(rabbit_factory: RabbitFactory) -> None:
    """A bad extra config line fails start() with the node's own complaint, leaving nothing."""
    node = rabbit_factory("no_such_setting = 1", start=False)
    with pytest.raises(RabbitNodeError, match="unknown variable: no_such_setting"):
        node.start(timeout=30)
    assert node.leftover_pids() == []


@pytest_twisted.ensureDeferred
async def test_eventually_returns_the_first_true_value() -> None:
    """eventually() polls without blocking the reactor and returns the first true value."""
    calls: list[int] = []

    def third_time() -> str:
        calls.append(1)
        return "done" if len(calls) == 3 else ""

    assert await eventually(third_time, timeout=5, interval=0.01) == "done"


@pytest_twisted.ensureDeferred
async def test_eventually_runs_blocking_predicates_in_a_thread() -> None:
    """With blocking=True the predicate runs off the reactor thread."""
    main = threading.get_ident()
    assert await eventually(lambda: threading.get_ident() != main, timeout=5, blocking=True)


@pytest_twisted.ensureDeferred
async def test_eventually_fails_naming_what_it_waited_for() -> None:
    """At its deadline eventually() fails with the description and the last value."""
    with pytest.raises(Timeout, match=r"the impossible: .* last: 0"):
        await eventually(lambda: 0, timeout=0.2, what="the impossible")


@pytest_twisted.ensureDeferred
async def test_within_fails_a_deferred_that_never_fires() -> None:
    """within() turns a Deferred that never fires into a Timeout."""
    never: Deferred[None] = Deferred()
    with pytest.raises(Timeout, match=r"the reply did not happen within 0\.1 s"):
        await within(0.1, never, "the reply")
    assert not never.called  # not cancelled, see pika #1282
