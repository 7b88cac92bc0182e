"""Fixtures for every test: throwaway RabbitMQ nodes and unique queue names.

Nothing here imports the reactor or ``pika.adapters.twisted_connection`` at module level:
either would install the default reactor before pytest-twisted installs the one chosen with
``--reactor`` (see the shared notes on sharp edges). Import them inside tests or fixtures.

Tests that break a broker (kill -9, stop_app, alarms, closed connections) take their own node
from ``fresh_rabbit`` or ``rabbit_factory``, never the shared ``rabbit``.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import amqp_tools
import pytest
from rabbitmq import RabbitNode

RabbitFactory = Callable[..., RabbitNode]

# Fixtures for running the service in-process (logs, services, figures) and as twistd,
# and a TLS broker node (tls_broker, one per test module that uses it).
pytest_plugins = ["service_support", "twistd_support", "certs"]


@pytest.fixture(scope="session")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """One private RabbitMQ node for the whole run; keep it healthy."""
    node = RabbitNode(tmp_path_factory.mktemp("rabbit"))
    node.start()
    yield node
    node.stop()


@pytest.fixture
def rabbit_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitFactory]:
    """Start extra nodes, e.g. ``rabbit_factory("consumer_timeout = 5000")``; all stop after."""
    nodes: list[RabbitNode] = []

    def make(*config: str, start: bool = True, **kwargs: Any) -> RabbitNode:
        node = RabbitNode(tmp_path_factory.mktemp("rabbit"), config=config, **kwargs)
        nodes.append(node)
        if start:
            node.start()
        return node

    yield make
    errors = []
    for node in reversed(nodes):
        try:
            node.stop()
        except Exception as e:  # stop the others before reporting
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def fresh_rabbit(rabbit_factory: RabbitFactory) -> RabbitNode:
    """A node of this test's own, free to be broken."""
    return rabbit_factory()


@pytest.fixture
def queue_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """A queue name no other test uses; deleted afterwards from ``rabbit`` if the test used it."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")[:100]
    name = f"test-{slug}-{secrets.token_hex(3)}"
    node = request.getfixturevalue("rabbit") if "rabbit" in request.fixturenames else None
    yield name
    if node is not None and node.is_running():
        # Best effort: the test may have stopped the app or deleted the queue itself.
        with contextlib.suppress(Exception):
            amqp_tools.delete(node.url(), name)
