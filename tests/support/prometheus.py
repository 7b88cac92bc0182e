"""Reading the service's /metrics (Prometheus's text exposition) in tests."""

from __future__ import annotations

__all__ = ["metric"]


def metric(text: str, name: str) -> float:
    """The value of the sample ``name`` (labels included, as written) in ``text``."""
    for line in text.splitlines():
        if line.startswith(name + " ") or (
            line.startswith(name + "{") and line.split(" ")[0] == name
        ):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")
