"""The project's throwaway RabbitMQ nodes: a thin re-export of `consumer_svc.testing.rabbitmq`.

Kept so that the tests (``from rabbitmq import RabbitNode``) and ``scripts/run-local.sh``
(``python tests/rabbitmq.py serve --port 5672``) go on working; the harness itself is public
now, for handler authors' integration tests. In a checkout, 4.0 nodes find the Debian 13 root
under this checkout's ``.tmp/`` (unless ``$RABBITMQ4_ROOT`` names another).
"""

from __future__ import annotations

import sys

from consumer_svc.testing import rabbitmq as _harness
from consumer_svc.testing.rabbitmq import (
    DEFAULT_VERSION,
    VERSIONS,
    ClusterQueue,
    ConnectionInfo,
    CtlError,
    QueueStats,
    RabbitCluster,
    RabbitNode,
    RabbitNodeError,
    _pids_with_marker,
    _port_is_free,
    find_rabbitmq_scripts,
    free_port,
    main,
    rabbitmq4_root,
)

from . import CHECKOUT

__all__ = [
    "DEFAULT_VERSION",
    "VERSIONS",
    "ClusterQueue",
    "ConnectionInfo",
    "CtlError",
    "QueueStats",
    "RabbitCluster",
    "RabbitNode",
    "RabbitNodeError",
    "_pids_with_marker",
    "_port_is_free",
    "find_rabbitmq_scripts",
    "free_port",
    "main",
    "rabbitmq4_root",
]

_harness.DEFAULT_RABBITMQ4_ROOT = CHECKOUT / ".tmp" / "debian13-root"

if __name__ == "__main__":
    sys.exit(main())
