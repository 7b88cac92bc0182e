"""How a message left the service: the vocabulary the consumer, the metrics and the kit share."""

from __future__ import annotations

import enum


class Outcome(enum.Enum):
    """How a message left us (the names are the metrics' outcome labels)."""

    ACKED = "acked"  # the handler succeeded
    RETRIED = "retried"  # acked once a confirmed copy waits in a retry queue
    DEAD_LETTERED = "dead_lettered"  # acked once a confirmed copy is in the dead-letter queue
    REJECTED = "rejected"  # basic.reject + requeue: it failed and could not be parked
    REQUEUED = "requeued"  # basic.nack + requeue: not processed (stopping, deadline)
