"""The reconnect backoff schedule: a pure function of the attempt number."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with proportional jitter.

    The n-th consecutive failed attempt (n >= 1) waits
    ``min(maximum, initial * factor ** (n - 1))`` scaled down by a random
    fraction of at most ``jitter``: with the defaults 1 s, 2 s, 4 s … capped at
    30 s, each shortened by up to half so that many consumers restarted by the
    same broker outage do not reconnect in lockstep. The jitter only ever
    shortens a delay, so ``maximum`` is a true cap (Twisted's own jitter can
    exceed it).
    """

    initial: float = 1.0
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial:
            raise ValueError("backoff needs 0 < initial <= maximum")
        if self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("backoff needs factor >= 1 and 0 <= jitter <= 1")

    def delay(self, attempt: int, random: Callable[[], float]) -> float:
        """Seconds to wait before attempt number ``attempt + 1``.

        ``random`` returns a float in [0, 1); tests pass a constant.
        """
        if attempt < 1:
            raise ValueError("attempt counts from 1")
        # Cap the exponent first: factor ** attempt overflows a float after
        # about a thousand failures, and a service runs for months.
        exponent = min(attempt - 1, 64)
        base = min(self.maximum, self.initial * self.factor**exponent)
        return base * (1.0 - self.jitter * random())
