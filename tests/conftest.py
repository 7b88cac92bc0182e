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
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import amqp_tools
from support.rabbitmq import DEFAULT_VERSION, VERSIONS, RabbitCluster, RabbitNode, RabbitNodeError

RabbitFactory = Callable[..., RabbitNode]
ClusterFactory = Callable[..., RabbitCluster]

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


class _SharedNodes:
    """The session's shared nodes, one per version, each started on first use."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._nodes: dict[str, RabbitNode] = {}
        self._failed: dict[str, RabbitNodeError] = {}

    def get(self, version: str) -> RabbitNode:
        if version in self._failed:  # do not wait a start timeout again for every test
            raise RabbitNodeError(f"the shared {version} node failed to start earlier") from (
                self._failed[version]
            )
        if version not in self._nodes:
            node = RabbitNode(self._tmp.mktemp(f"rabbit-{version}-"), version=version)
            try:
                node.start()
            except RabbitNodeError as e:
                self._failed[version] = e
                raise
            self._nodes[version] = node
        return self._nodes[version]

    def stop(self) -> None:
        errors = []
        for node in self._nodes.values():
            try:
                node.stop()
            except Exception as e:  # stop the others before reporting
                errors.append(e)
        if errors:
            raise errors[0]


@pytest.fixture(scope="session")
def _shared_rabbits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_SharedNodes]:
    nodes = _SharedNodes(tmp_path_factory)
    yield nodes
    nodes.stop()


@pytest.fixture
def rabbit(_shared_rabbits: _SharedNodes, rabbit_version: str) -> RabbitNode:
    """The run's private node of this test's version, shared by all tests; keep it healthy."""
    return _shared_rabbits.get(rabbit_version)


def _stop_all(things: list[RabbitNode] | list[RabbitCluster]) -> None:
    errors = []
    for thing in reversed(things):
        try:
            thing.stop()
        except Exception as e:  # stop the others before reporting
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def rabbit_factory(
    tmp_path_factory: pytest.TempPathFactory, rabbit_version: str
) -> Iterator[RabbitFactory]:
    """Start extra nodes, e.g. ``rabbit_factory("consumer_timeout = 5000")``; all stop after.

    Nodes are of the test's version unless ``version=`` says otherwise.
    """
    nodes: list[RabbitNode] = []

    def make(*config: str, start: bool = True, **kwargs: Any) -> RabbitNode:
        kwargs.setdefault("version", rabbit_version)
        node = RabbitNode(tmp_path_factory.mktemp("rabbit"), config=config, **kwargs)
        nodes.append(node)
        if start:
            node.start()
        return node

    yield make
    _stop_all(nodes)


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
    _stop_all(clusters)


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
