"""Coalesced acks keep every guarantee: a multiple-ack never covers a message whose handler did not succeed."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
from pika.exceptions import NackError
from support.consuming import SETTINGS
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from consumer_svc import Message
from consumer_svc._acks import Acks
from consumer_svc._consumer import Consumer
from consumer_svc.testing import FakeChannel, FakeConnection
from consumer_svc.testing._fakes import connect, invoker


class Broker(FakeChannel):
    """A channel that settles like RabbitMQ: a multiple-ack takes every unacked tag up to its own."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.unacked: set[int] = set()
        self.acked: set[int] = set()
        self.handed_back: set[int] = set()
        self.wire: list[tuple[str, int]] = []

    def deliver(self, tag: int, *args: Any, **kwargs: Any) -> None:
        self.unacked.add(tag)
        super().deliver(tag, *args, **kwargs)

    def ack(self, tag: int, multiple: bool = False) -> None:
        assert self.is_open, "ack on a closed channel"
        assert tag in self.unacked, f"PRECONDITION_FAILED - unknown delivery tag {tag}"
        covered = {t for t in self.unacked if t <= tag} if multiple else {tag}
        self.unacked -= covered
        self.acked |= covered
        self.wire.append(("ack up to" if multiple else "ack", tag))

    def nack(self, tag: int, requeue: bool = True) -> None:
        assert tag in self.unacked
        self.unacked.discard(tag)
        self.handed_back.add(tag)

    def reject(self, tag: int, requeue: bool = False) -> None:
        self.nack(tag)


def test_a_run_of_finished_deliveries_is_acked_once() -> None:
    """Fifty messages handled in one reactor turn cost one multiple-ack."""
    clock = Clock()
    channel = Broker(clock)
    consumer = Consumer(SETTINGS, invoker(lambda m: None), clock)
    connect(consumer.machine, FakeConnection(Broker(clock), channel))
    for tag in range(1, 51):
        channel.deliver(tag)
    clock.advance(0)
    assert channel.wire == [("ack up to", 50)]
    assert channel.acked == set(range(1, 51))


def test_finished_deliveries_beyond_one_in_flight_are_acked_one_by_one() -> None:
    """A slow first message stops the multiple-ack short of it; the others are acked singly, not held."""
    clock = Clock()
    acks = Acks(Broker(clock))
    channel = acks.channel
    assert isinstance(channel, Broker)
    for tag in (1, 2, 3, 4):
        channel.unacked.add(tag)
        acks.delivered(tag)
    acks.ack(2)
    acks.ack(3)
    clock.advance(0)
    assert channel.wire == [("ack", 2), ("ack", 3)]
    acks.ack(1)
    acks.ack(4)
    clock.advance(0)
    assert channel.wire[2:] == [
        ("ack up to", 4)
    ]  # 2 and 3 are no longer unacked: not covered twice
    assert channel.unacked == set()


@pytest.mark.parametrize("lose_the_channel", [False, True])
@pytest.mark.parametrize("seed", range(25))
def test_out_of_order_failures_and_lost_channels_never_ack_a_failed_message(
    seed: int, lose_the_channel: bool
) -> None:
    """Random finishing order and random failures (whose copies are not confirmed), and maybe a lost channel
    mid-way: only messages whose handlers succeeded are acked, each once; without a loss, all of them are.

    (With a loss, successes whose ack was still waiting for the end of the turn are not acked: the broker
    redelivers them, a duplicate and never a loss.)"""
    rng = random.Random(seed)
    clock = Clock()
    pending: dict[int, Deferred[None]] = {}

    def handler(message: Message) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        pending[message.delivery_tag] = d
        return d

    channels = [Broker(clock) for _ in range(4)]  # publisher, consumer, then again after the loss
    publisher, first = channels[0], channels[1]
    for channel in channels[0::2]:
        channel.auto_confirm = False  # failures cannot be parked: they are handed back
    # All 30 run at once, and failures in a row never pause: the ledger alone is under test.
    settings = dataclasses.replace(SETTINGS, concurrency=30, pause_after=0)
    consumer = Consumer(settings, invoker(handler), clock)
    connect(consumer.machine, FakeConnection(*channels))
    succeeded: set[int] = set()
    for tag in range(1, 31):
        first.deliver(tag)
    order = list(pending)
    rng.shuffle(order)
    lose_at = rng.randrange(5, 25) if lose_the_channel else -1
    for step, tag in enumerate(order):
        if step == lose_at:
            first.is_open = False
            consumer.detach()
        if rng.random() < 0.3:
            pending[tag].errback(RuntimeError("boom"))
            for confirm in publisher.confirms:
                if not confirm.called:
                    confirm.errback(NackError([]))
            clock.advance(1.0)  # the hand-back pause
        else:
            pending[tag].callback(None)
            if first.is_open:
                succeeded.add(tag)
        if rng.random() < 0.5:
            clock.advance(0)
    clock.advance(0)
    assert first.acked <= succeeded
    assert not first.acked & first.handed_back
    if not lose_the_channel:
        assert first.acked == succeeded
        assert first.acked | first.handed_back == set(range(1, 31))
