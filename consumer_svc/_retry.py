"""What happens to a message whose handler failed: retry later, or park it for a person.

Pure functions of the failure, the retries so far and the settings; the
consumer carries the decisions out with confirmed publishes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from twisted.internet.defer import CancelledError

from ._errors import Reject, Retry
from ._secrets import redact

#: Header names: ours, so not "x-" (RabbitMQ 4 drops client-set x- headers).
RETRIES = "consumer-svc-retries"
FAILURE = "consumer-svc-failure"
ATTEMPTS = "consumer-svc-attempts"
FAILED_AT = "consumer-svc-failed-at"
ORIGINAL_EXCHANGE = "consumer-svc-original-exchange"
ORIGINAL_ROUTING_KEY = "consumer-svc-original-routing-key"
QUEUE = "consumer-svc-queue"

#: No retry waits longer than this, whatever the schedule says.
DELAY_CAP = 3600.0
#: The retry queues' delays, in seconds: a wanted delay is rounded up to the next rung,
#: so a work queue has at most this many retry queues whatever its handlers ask for.
#: Each rung is at most twice the one below (or, from 2 to 5, within 2x + 1 s).
LADDER = (1, 2, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600)
#: An unused retry queue (no declare for this long) deletes itself; the service
#: declares a queue again before it publishes to it if its last declare is older
#: than `REDECLARE_AFTER`, so a queue in use never expires under its messages.
EXPIRES_AFTER = 24 * 3600.0
REDECLARE_AFTER = 3600.0
#: A retry count beyond this is not one we wrote: read as "give up now".
RETRIES_LIMIT = 1000


class Action(enum.Enum):
    RETRY = "retry"
    DEAD_LETTER = "dead-letter"


@dataclass(frozen=True)
class Decision:
    """Retry after ``delay`` seconds, or dead-letter; ``reason`` says why, in one line."""

    action: Action
    reason: str
    delay: float = 0.0


def describe_failure(error: BaseException, *, timeout: float | None = None) -> str:
    """The failure in one line, passwords masked: for the log and the parked copy's header."""
    if isinstance(error, CancelledError) and timeout is not None:
        return f"HandlerTimeout: cancelled after {timeout:g}s (--handler-timeout)"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return redact(f"{type(error).__name__}: {text}" if text else type(error).__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """``max_retries`` retries after the first attempt, waiting ``delay``, then twice, four times as long ... (capped)."""

    max_retries: int = 5
    delay: float = 5.0

    def schedule(self, retry: int) -> float:
        """The wait before retry number ``retry`` (from 1)."""
        return min(DELAY_CAP, self.delay * 2.0 ** min(retry - 1, 32))

    def decide(self, error: BaseException, retries: int, reason: str) -> Decision:
        """What to do with a message that failed after ``retries`` earlier retries."""
        if isinstance(error, Reject):
            return Decision(Action.DEAD_LETTER, reason)
        if retries >= self.max_retries:
            attempts = retries + 1
            return Decision(Action.DEAD_LETTER, f"{reason} (gave up after {attempts} attempts)")
        if isinstance(error, Retry) and error.delay is not None:
            return Decision(Action.RETRY, reason, min(DELAY_CAP, error.delay))
        return Decision(Action.RETRY, reason, self.schedule(retries + 1))


def retries_of(headers: Mapping[Any, Any] | None, limit: int = RETRIES_LIMIT) -> int:
    """The retry count a message carries, read defensively.

    0 for a first delivery and for anything that is not a whole number
    (a string, a float, a forged negative count); ``limit`` for an absurdly
    large one, so that a forged count parks the message instead of looping.
    """
    value = (headers or {}).get(RETRIES, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return min(value, limit)


def rung(delay: float) -> int:
    """The ladder's delay (seconds) that a wanted ``delay`` is rounded up to."""
    for seconds in LADDER:
        if delay <= seconds:
            return seconds
    return LADDER[-1]


def retry_queue(queue: str, delay: float) -> tuple[str, dict[str, Any]]:
    """The queue that holds retries of ``queue`` for about ``delay`` seconds, and its arguments.

    One queue per rung of the ladder: a queue-wide TTL expires every message
    on time, where per-message TTLs would wait behind a longer one at the
    head. Always a quorum queue with at-least-once dead-lettering: a message
    waiting in it survives a broker restart, a kill -9 or a node down
    (dead-lettering out of a classic queue is at-most-once), and it is never
    pinned to one node of a cluster.
    """
    seconds = rung(delay)
    return f"{queue}.retry.{seconds}s", {
        "x-queue-type": "quorum",
        "x-message-ttl": seconds * 1000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        "x-dead-letter-strategy": "at-least-once",
        # at-least-once dead-lettering needs it: a full queue refuses, never drops.
        "x-overflow": "reject-publish",
        "x-expires": int((seconds + EXPIRES_AFTER) * 1000),
    }


def dead_letter_arguments(queue_arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The dead-letter queue's arguments: a quorum queue when the work queue is one.

    A classic queue lives on one node; with a quorum work queue, a
    dead-letter queue on one node would stop parking when that node is down.
    """
    if queue_arguments.get("x-queue-type") == "quorum":
        return {"x-queue-type": "quorum"}
    return {}


def retry_headers(headers: Mapping[Any, Any], retries: int) -> dict[Any, Any]:
    copy = dict(headers)
    copy[RETRIES] = retries
    return copy


def dead_letter_headers(
    headers: Mapping[Any, Any],
    *,
    reason: str,
    attempts: int,
    exchange: str,
    routing_key: str,
    queue: str,
    now: datetime | None = None,
) -> dict[Any, Any]:
    when = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    copy = dict(headers)
    copy.pop(RETRIES, None)
    copy.update(
        {
            FAILURE: reason,
            ATTEMPTS: attempts,
            FAILED_AT: when,
            ORIGINAL_EXCHANGE: exchange,
            ORIGINAL_ROUTING_KEY: routing_key,
            QUEUE: queue,
        }
    )
    return copy
