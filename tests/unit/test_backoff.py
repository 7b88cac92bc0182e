"""The reconnect schedule is a pure function: tested by value."""

import pytest

from consumer_svc._backoff import Backoff


def test_without_jitter_the_delay_doubles_until_the_cap() -> None:
    """With no randomness the delays are 1, 2, 4 … and never pass the 30 s cap."""
    backoff = Backoff(initial=1.0, maximum=30.0)
    delays = [backoff.delay(n, random=lambda: 0.0) for n in range(1, 9)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_jitter_only_shortens_a_delay() -> None:
    """The largest random draw halves the delay; the cap is never exceeded."""
    backoff = Backoff(initial=1.0, maximum=30.0, jitter=0.5)
    assert backoff.delay(1, random=lambda: 0.999999) == pytest.approx(0.5, rel=1e-5)
    assert backoff.delay(100, random=lambda: 0.0) == 30.0
    assert backoff.delay(100, random=lambda: 0.5) == 22.5


def test_a_service_failing_for_months_does_not_overflow() -> None:
    """Attempt one million still gives the capped delay, not an OverflowError."""
    assert Backoff().delay(1_000_000, random=lambda: 0.0) == 30.0


@pytest.mark.parametrize(
    ("kwargs", "attempt"),
    [({"initial": 0}, 1), ({"initial": 5, "maximum": 1}, 1), ({"jitter": 2}, 1), ({}, 0)],
)
def test_nonsense_is_refused(kwargs: dict[str, float], attempt: int) -> None:
    """A non-positive initial delay, a cap below it, jitter over 1 or attempt 0 raise ValueError."""
    with pytest.raises(ValueError):  # noqa: PT011
        Backoff(**kwargs).delay(attempt, random=lambda: 0.0)
