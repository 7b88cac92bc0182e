"""What a copy of a message may carry: the rules for retry, dead-letter and replayed copies.

The service republishes a failed message with its own permissions, so a copy
must never do more than the original publisher could: no ``CC``/``BCC``
(which route to every queue they name), no broker-reserved death headers
(a forged ``x-death`` crashes RabbitMQ 3.x's dead-lettering), no ``user_id``
the service cannot claim (the broker refuses it), and nothing that cannot be
encoded again. Copies are persistent: a copy parked in a durable queue must
survive a broker restart. Pure functions of the properties; no pika I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from pika.spec import BasicProperties

#: Header names are ours, not "x-" (RabbitMQ 4 drops client-set x- headers).
PREFIX = "consumer-svc-"
#: The names of what was taken off a copy, comma-separated (for the operator).
STRIPPED = "consumer-svc-stripped"
#: The original ``user_id``, kept as a plain header where the property had to go.
ORIGINAL_USER_ID = "consumer-svc-original-user-id"

#: Headers the broker routes by: a copy would reach every queue they name.
_ROUTING = frozenset({"cc", "bcc"})
#: Headers only the broker may write (dead-lettering history, delivery counts, origins).
_RESERVED = frozenset({"x-death", "x-delivery-count", "x-received-from"})
_RESERVED_PREFIXES = ("x-first-death-", "x-last-death-")

PERSISTENT = 2


def _is_stripped(key: Any) -> bool:
    if not isinstance(key, str):
        return False  # a non-UTF-8 key: not one the broker reads
    lowered = key.lower()
    return lowered in _ROUTING or lowered in _RESERVED or lowered.startswith(_RESERVED_PREFIXES)


def safe_headers(headers: Mapping[Any, Any] | None) -> tuple[dict[Any, Any], list[str]]:
    """The headers a copy may carry, and the names of those taken off (sorted)."""
    kept: dict[Any, Any] = {}
    stripped: list[str] = []
    for key, value in (headers or {}).items():
        if _is_stripped(key):
            stripped.append(str(key))
        else:
            kept[key] = value
    return kept, sorted(stripped)


def copy_properties(
    properties: BasicProperties, headers: dict[Any, Any], *, username: str | None
) -> tuple[BasicProperties, list[str]]:
    """Properties for a copy: persistent, no expiration, ``headers`` as given.

    ``user_id`` is kept only when it names ``username`` (the user the
    service publishes as); otherwise it moves to a header. Returns the
    properties and the names of what was taken off.
    """
    result = copy.copy(properties)
    stripped: list[str] = []
    result.delivery_mode = PERSISTENT
    # A per-message TTL would expire the copy where it waits.
    result.expiration = None
    if result.user_id is not None and result.user_id != username:
        headers = {**headers, ORIGINAL_USER_ID: str(result.user_id)}
        result.user_id = None
        stripped.append("user_id")
    result.headers = headers or None
    return result, stripped


def note_stripped(headers: dict[Any, Any], stripped: list[str]) -> dict[Any, Any]:
    """``headers`` with the list of what was taken off, added to what earlier copies lost."""
    if not stripped:
        return headers
    earlier = headers.get(STRIPPED)
    names = earlier.split(", ") if isinstance(earlier, str) and earlier else []
    names += [name for name in stripped if name not in names]
    return {**headers, STRIPPED: ", ".join(names)}


def without_ours(headers: Mapping[Any, Any]) -> dict[Any, Any]:
    """The headers without any ``consumer-svc-*`` one: a replayed message starts afresh."""
    return {
        key: value
        for key, value in headers.items()
        if not (isinstance(key, str) and key.startswith(PREFIX))
    }
