"""The hostile-message helper itself: where it puts the raw table, and what RabbitMQ refuses."""

from __future__ import annotations

import math

import pytest
from pika import exceptions as pika_errors
from pika import spec
from support import hostile

from consumer_svc import _codec
from consumer_svc.testing.rabbitmq import RabbitNode


def test_the_raw_table_goes_where_the_wire_format_puts_it() -> None:
    """Every other property survives the splice: content type and encoding before the table, the rest after."""
    _codec.install()
    raw = hostile.encode_table({"at": hostile.timestamp(2**63), "n": 1})
    properties = hostile._RawHeaders(
        raw,
        content_type="application/json",
        content_encoding="gzip",
        delivery_mode=2,
        message_id="m-1",
        user_id="guest",
        app_id="tests",
    )
    decoded = spec.BasicProperties().decode(b"".join(properties.encode()))
    assert decoded.headers == {"at": _codec.LATEST, "n": 1}
    assert (decoded.content_type, decoded.content_encoding) == ("application/json", "gzip")
    assert (decoded.delivery_mode, decoded.message_id) == (2, "m-1")
    assert (decoded.user_id, decoded.app_id) == ("guest", "tests")


@pytest.mark.parametrize("value", [math.nan, math.inf, hostile.Float32(math.nan)])
def test_rabbitmq_closes_the_connection_on_a_float_that_is_not_finite(
    rabbit: RabbitNode, queue_name: str, value: object
) -> None:
    """RabbitMQ 3.10 answers a NaN or infinite float header with 541 on the whole connection: why the codec refuses to encode one."""
    with hostile.Publisher(rabbit.url()) as publisher:
        publisher.declare(queue_name)
        with pytest.raises(pika_errors.ConnectionClosedByBroker) as closed:
            publisher.publish(queue_name, b"nan", headers={"x": value})
    assert closed.value.reply_code == 541
    with pytest.raises(_codec.UnencodableValue, match="not finite"):
        _codec.encode_table([], {"x": math.nan})
