"""Fixtures for every test: throwaway RabbitMQ nodes and unique queue names.

Nothing here imports the reactor or ``pika.adapters.twisted_connection`` at module level:
either would install the default reactor before pytest-twisted installs the one chosen with
``--reactor`` (see the shared notes on sharp edges). Import them inside tests or fixtures.

Tests that break a broker (kill -9, stop_app, alarms, closed connections) take their own node
from ``fresh_rabbit`` or ``rabbit_factory``, never the shared ``rabbit``.

RabbitMQ versions: a test runs against 3.10 (the host's package) unless its module or itself
is marked ``pytest.mark.brokers("3.10", "4.0")``; then each test that uses a broker fixture
(``rabbit``, ``fresh_rabbit``, ``rabbit_factory``, ``rabbit_cluster``, ``cluster_factory`` or
``rabbit_version``) runs once per version, with ids like ``test_x[rabbitmq-4.0]``.

The nodes come from the pytest plugin that ships with consumer_svc
(`consumer_svc.testing.pytest_plugin`): ``rabbit`` is its session-wide ``rabbitmq_node`` on 3.10
(and ``rabbitmq_4_0_node``, defined here alike, on 4.0), ``rabbit_factory`` its
``rabbitmq_factory`` making nodes of the test's version. Clusters are this file's own.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import CHECKOUT, amqp_tools

from consumer_svc.testing import rabbitmq as harness
from consumer_svc.testing.pytest_plugin import RabbitFactory
from consumer_svc.testing.rabbitmq import DEFAULT_VERSION, VERSIONS, RabbitCluster, RabbitNode

ClusterFactory = Callable[..., RabbitCluster]

# 4.0 nodes use this checkout's Debian 13 root, wherever pytest runs from ($RABBITMQ4_ROOT wins).
harness.DEFAULT_RABBITMQ4_ROOT = CHECKOUT / ".tmp" / "debian13-root"

# The fixtures that give a test a broker ("rabbit_version" too, for a test that makes its
# own nodes of the version); "brokers" parametrizes tests that use one.
BROKER_FIXTURES = frozenset(
    {
        "rabbit",
        "fresh_rabbit",
        "rabbit_factory",
        "rabbit_cluster",
        "cluster_factory",
        "rabbit_version",
    }
)

#: Every fixture that starts a RabbitMQ node: no test under tests/unit/ may use one.
NODE_FIXTURES = BROKER_FIXTURES - {"rabbit_version"} | {
    "rabbitmq_node",
    "rabbitmq_url",
    "rabbitmq_factory",
    "rabbitmq_4_0_node",
    "tls_broker",
}
UNIT = Path(__file__).parent / "unit"

# Fixtures for running the service in-process (logs, services, figures) and as twistd,
# a TLS broker node (tls_broker, one per test module that uses it) and recorded spans.
pytest_plugins = [
    "support.service_support",
    "support.twistd_support",
    "support.certs",
    "support.spans",
]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run a ``brokers``-marked test once per version it names, if it uses a broker."""
    marker = metafunc.definition.get_closest_marker("brokers")
    if marker is None or not BROKER_FIXTURES & set(metafunc.fixturenames):
        return
    versions = tuple(marker.args)
    unknown = [v for v in versions if v not in VERSIONS]
    if not versions or unknown:
        raise pytest.UsageError(
            f"{metafunc.definition.nodeid}: brokers() takes versions from {VERSIONS}, "
            f"not {versions!r}"
        )
    metafunc.parametrize(
        "rabbit_version", versions, ids=[f"rabbitmq-{v}" for v in versions], indirect=True
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse the run if a unit test asks for a broker: the folder says what a test needs."""
    misplaced = [
        item.nodeid
        for item in items
        if UNIT in item.path.parents and NODE_FIXTURES & set(getattr(item, "fixturenames", ()))
    ]
    if misplaced:
        raise pytest.UsageError(
            "these unit tests use a broker; move them to tests/broker/: " + ", ".join(misplaced)
        )


@pytest.fixture
def rabbit_version(request: pytest.FixtureRequest) -> str:
    """The RabbitMQ series this test runs against: its ``brokers`` parameter, else 3.10."""
    return str(getattr(request, "param", DEFAULT_VERSION))


@pytest.fixture(scope="session")
def rabbitmq_4_0_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """The session's shared 4.0 node, started on first use: the plugin's ``rabbitmq_node`` is 3.10's.

    A node that fails to start fails every test that asks for it, at once: pytest keeps a
    session fixture's error rather than waiting out the start again for each test.
    """
    node = RabbitNode(tmp_path_factory.mktemp("rabbitmq-4.0"), version="4.0")
    node.start()
    yield node
    node.stop()


#: The fixture of each version's shared node.
SHARED_NODES = {"3.10": "rabbitmq_node", "4.0": "rabbitmq_4_0_node"}
assert set(SHARED_NODES) == set(VERSIONS), "a shared node fixture for each version"


@pytest.fixture
def rabbit(request: pytest.FixtureRequest, rabbit_version: str) -> RabbitNode:
    """The run's private node of this test's version, shared by all tests; keep it healthy."""
    node = request.getfixturevalue(SHARED_NODES[rabbit_version])
    assert isinstance(node, RabbitNode)
    return node


@pytest.fixture
def rabbit_factory(rabbitmq_factory: RabbitFactory, rabbit_version: str) -> RabbitFactory:
    """Start extra nodes, e.g. ``rabbit_factory("consumer_timeout = 5000")``; all stop after.

    The plugin's ``rabbitmq_factory``, making nodes of the test's version unless ``version=``
    says otherwise.
    """

    def make(*config: str, **kwargs: Any) -> RabbitNode:
        kwargs.setdefault("version", rabbit_version)
        return rabbitmq_factory(*config, **kwargs)

    return make


@pytest.fixture
def cluster_factory(
    tmp_path_factory: pytest.TempPathFactory, rabbit_version: str
) -> Iterator[ClusterFactory]:
    """Start clusters, e.g. ``cluster_factory(size=3)``, of the test's version; all stop after.

    Extra positional arguments are rabbitmq.conf lines for every node; ``version=`` and other
    keywords go to :class:`rabbitmq.RabbitCluster`.
    """
    clusters: list[RabbitCluster] = []

    def make(*config: str, size: int = 3, start: bool = True, **kwargs: Any) -> RabbitCluster:
        kwargs.setdefault("version", rabbit_version)
        cluster = RabbitCluster(tmp_path_factory.mktemp("cluster"), size, config=config, **kwargs)
        clusters.append(cluster)
        if start:
            cluster.start()
        return cluster

    yield make
    errors: list[Exception] = []
    for cluster in reversed(clusters):
        try:
            cluster.stop()
        except Exception as e:  # stop the others before reporting
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def rabbit_cluster(cluster_factory: ClusterFactory) -> RabbitCluster:
    """A three-node cluster of this test's own, free to be broken."""
    return cluster_factory()


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
