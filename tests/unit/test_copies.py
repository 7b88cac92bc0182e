"""What a copy of a failed message may carry: pure rules, tested by value."""

from __future__ import annotations

from pika.spec import BasicProperties

from consumer_svc._copies import copy_properties, note_stripped, safe_headers, without_ours


def test_routing_and_broker_reserved_headers_never_reach_a_copy() -> None:
    """CC/BCC (any case) and the broker's death history are taken off and named; the rest stays."""
    headers = {
        "tenant": "a",
        "CC": ["payments"],
        "bcc": ["audit"],
        "x-death": [[None]],
        "x-first-death-queue": "q",
        "x-last-death-reason": "expired",
        "x-delivery-count": 3,
        "x-match": "all",
        b"\xff": "non-UTF-8 key",
    }
    kept, stripped = safe_headers(headers)
    assert kept == {"tenant": "a", "x-match": "all", b"\xff": "non-UTF-8 key"}
    assert stripped == sorted(
        [
            "CC",
            "bcc",
            "x-death",
            "x-first-death-queue",
            "x-last-death-reason",
            "x-delivery-count",
        ]
    )


def test_a_copy_is_persistent_and_never_expires() -> None:
    """A transient message parked in a durable queue must survive a broker restart."""
    properties, stripped = copy_properties(
        BasicProperties(delivery_mode=1, expiration="1000", message_id="m1"), {}, username="svc"
    )
    assert properties.delivery_mode == 2
    assert properties.expiration is None
    assert properties.message_id == "m1"
    assert stripped == []


def test_a_user_id_the_service_cannot_claim_moves_to_a_header() -> None:
    """The broker refuses a publish whose user_id is not the publishing user's: keep it as a header."""
    properties, stripped = copy_properties(
        BasicProperties(user_id="producer"), {"a": 1}, username="svc"
    )
    assert properties.user_id is None
    assert properties.headers == {"a": 1, "consumer-svc-original-user-id": "producer"}
    assert stripped == ["user_id"]
    own, stripped = copy_properties(BasicProperties(user_id="svc"), {}, username="svc")
    assert own.user_id == "svc"
    assert stripped == []


def test_the_original_properties_are_left_alone() -> None:
    """The copy is a copy: the handler's message keeps what it had."""
    original = BasicProperties(delivery_mode=1, headers={"CC": ["x"]}, user_id="p")
    copy_properties(original, {}, username="svc")
    assert (original.delivery_mode, original.headers, original.user_id) == (1, {"CC": ["x"]}, "p")


def test_what_was_stripped_is_said_in_one_header() -> None:
    """The operator sees on the copy what it lost."""
    assert note_stripped({"a": 1}, ["CC", "user_id"]) == {
        "a": 1,
        "consumer-svc-stripped": "CC, user_id",
    }
    assert note_stripped({"a": 1}, []) == {"a": 1}
    # A second copy adds to what the first one lost.
    assert note_stripped({"consumer-svc-stripped": "CC, user_id"}, ["x-death", "CC"]) == {
        "consumer-svc-stripped": "CC, user_id, x-death"
    }


def test_a_replay_starts_afresh() -> None:
    """Our own headers go on replay; a non-UTF-8 key does not trip the filter."""
    assert without_ours({"consumer-svc-failure": "x", b"\xfe": 1, "k": 2}) == {b"\xfe": 1, "k": 2}
