"""What handler authors run: the README's example test file, and the pytest plugin's node fixtures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from support import CHECKOUT

ROOT = CHECKOUT


def test_the_example_test_file_passes() -> None:
    """pytest on examples/test_tasks.py, in a process of its own, passes every test in it."""
    pytest = Path(sys.executable).with_name("pytest")
    done = subprocess.run(
        [str(pytest), "-q", "-p", "no:cacheprovider", "examples/test_tasks.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b8 passed\b", done.stdout), done.stdout


PLUGIN_TEST = """
import os
from pathlib import Path


def test_a_node_of_its_own(rabbitmq_factory, rabbitmq_url):
    node = rabbitmq_factory("consumer_timeout = 5000")
    assert node.is_running()
    assert node.url() != rabbitmq_url
    Path(os.environ["PORTS"]).write_text(f"{node.amqp_port} {rabbitmq_url.rsplit(':', 1)[1]}")
"""


def test_the_plugin_s_nodes_serve_a_test_and_are_gone_after_it(tmp_path: Path) -> None:
    """rabbitmq_factory and rabbitmq_url give running nodes to a user's test; both are stopped when the run ends."""
    from consumer_svc.testing.rabbitmq import _port_is_free

    (tmp_path / "test_user.py").write_text(PLUGIN_TEST)
    ports = tmp_path / "ports"
    done = subprocess.run(
        [str(Path(sys.executable).with_name("pytest")), "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env={**os.environ, "PORTS": str(ports)},
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    own, shared = ports.read_text().split()
    assert _port_is_free(int(own))
    assert _port_is_free(int(shared.split("/")[0]))
