"""Acks, coalesced: one ``multiple=True`` ack for a contiguous run of finished deliveries.

A multiple-ack covers every delivery up to its tag that the broker still
counts as unacknowledged. So it is sent only up to the first delivery still
in flight; deliveries that finished beyond that gap are acked one by one in
the same flush, so that a slow handler never holds back the acks of others.

A flush waits for the end of the socket read that brought the deliveries
(synchronous handlers) or for the next reactor turn (handlers that finished
on a timer, a thread or other I/O), so one frame carries what finished together.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol


class _AckTarget(Protocol):
    @property
    def is_open(self) -> bool: ...

    def ack(self, delivery_tag: int, multiple: bool = False) -> None: ...

    def nack(self, delivery_tag: int, requeue: bool = True) -> None: ...

    def reject(self, delivery_tag: int, requeue: bool = False) -> None: ...

    def soon(self, call: Callable[[], None]) -> None: ...


class Acks:
    """Settles the deliveries of one channel; acks wait for the end of the current read or turn."""

    def __init__(self, channel: _AckTarget) -> None:
        self.channel = channel
        #: Delivered and not yet settled on the wire, in delivery (= tag) order.
        self._outstanding: deque[int] = deque()
        #: Finished with an ack that is not sent yet.
        self._done: set[int] = set()
        #: Settled on the wire out of order: skipped when they reach the front.
        self._gone: set[int] = set()
        self._flush_scheduled = False

    def delivered(self, tag: int) -> None:
        self._outstanding.append(tag)

    def ack(self, tag: int) -> None:
        self._done.add(tag)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.channel.soon(self.flush)

    def nack(self, tag: int) -> None:
        """Hand back, requeued: sent at once (a nack, so a quorum queue's delivery-limit does not count it)."""
        self.channel.nack(tag, requeue=True)
        self._gone.add(tag)

    def reject(self, tag: int) -> None:
        """Hand back after a failure, requeued: sent at once (a reject, which delivery-limit counts)."""
        self.channel.reject(tag, requeue=True)
        self._gone.add(tag)

    def flush(self) -> None:
        """Send the acks that wait; a no-op if the channel closed meanwhile."""
        self._flush_scheduled = False
        done = self._done
        if not done or not self.channel.is_open:
            return
        outstanding, gone = self._outstanding, self._gone
        upto, count = 0, 0
        while outstanding:
            tag = outstanding[0]
            if tag in done:
                done.discard(tag)
                upto, count = tag, count + 1
            elif tag in gone:
                gone.discard(tag)
            else:
                break  # still in flight: a multiple-ack must stop short of it
            outstanding.popleft()
        if count:
            self.channel.ack(upto, count > 1)
        for tag in sorted(done):
            self.channel.ack(tag, False)
        gone.update(done)
        done.clear()
