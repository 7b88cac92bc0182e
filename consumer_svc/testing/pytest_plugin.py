"""A pytest plugin (entry point ``consumer_svc``): throwaway RabbitMQ nodes for handler tests.

Installed with consumer_svc, so any test run in that environment has these fixtures:

- ``rabbitmq_node``: a private node of the host's ``rabbitmq-server`` (started once per test
  session on free ports, stopped at its end; never the system broker on 5672). Keep it healthy:
  tests that break a broker take their own from ``rabbitmq_factory``.
- ``rabbitmq_url``: ``rabbitmq_node``'s ``amqp://guest:guest@127.0.0.1:PORT/%2F``.
- ``rabbitmq_factory``: starts nodes of the test's own, e.g.
  ``rabbitmq_factory("consumer_timeout = 5000")`` (rabbitmq.conf lines); all stop after the test.

Nothing here imports the reactor or pika, so the plugin never installs a reactor before
pytest-twisted does. The node harness itself is `consumer_svc.testing.rabbitmq`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .rabbitmq import RabbitNode

__all__ = ["rabbitmq_factory", "rabbitmq_node", "rabbitmq_url"]

RabbitFactory = Callable[..., RabbitNode]


@pytest.fixture(scope="session")
def rabbitmq_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A private RabbitMQ node shared by the whole test session."""
    node = RabbitNode(tmp_path_factory.mktemp("rabbitmq"))
    node.start()
    yield node
    node.stop()


@pytest.fixture
def rabbitmq_url(rabbitmq_node: RabbitNode) -> str:
    """The shared node's AMQP URL, as ``--url`` takes it."""
    return rabbitmq_node.url()


@pytest.fixture
def rabbitmq_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitFactory]:
    """Start nodes of this test's own (extra rabbitmq.conf lines as arguments); all stop after."""
    nodes: list[RabbitNode] = []

    def make(*config: str, start: bool = True, **kwargs: Any) -> RabbitNode:
        node = RabbitNode(tmp_path_factory.mktemp("rabbitmq"), config=config, **kwargs)
        nodes.append(node)
        if start:
            node.start()
        return node

    yield make
    errors: list[Exception] = []
    for node in reversed(nodes):
        try:
            node.stop()
        except Exception as e:  # stop the others before reporting
            errors.append(e)
    if errors:
        raise errors[0]
