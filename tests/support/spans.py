"""OpenTelemetry spans in tests: a tracer provider of the test's own, and a producer's trace.

The ``spans`` fixture (this module is a pytest plugin, loaded by tests/conftest.py) gives a
`Spans` whose SDK provider keeps every finished span in memory; `TRACEPARENT` is the W3C trace
context a test's producer sends, naming `TRACE_ID` and its span `PARENT_ID`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

__all__ = ["PARENT_ID", "TRACEPARENT", "TRACE_ID", "Spans", "spans", "traceparent_ids"]

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"


class Spans:
    """A tracer provider of the test's own that keeps every finished span."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def finished(self) -> tuple[ReadableSpan, ...]:
        return tuple(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.finished() if s.name == name]


@pytest.fixture
def spans() -> Iterator[Spans]:
    """A `Spans` for this test; its provider shuts down afterwards."""
    recorded = Spans()
    yield recorded
    recorded.provider.shutdown()


def traceparent_ids(headers: dict[str, Any]) -> tuple[int, int]:
    """The trace id and span id that the ``traceparent`` header of a publish names."""
    value = headers["traceparent"]
    value = value.decode() if isinstance(value, bytes) else value
    _, trace_id, span_id, _ = value.split("-")
    return int(trace_id, 16), int(span_id, 16)
