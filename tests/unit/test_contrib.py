"""The systemd unit in contrib/, without a broker: systemd-analyze verifies it, and it says what
the service needs (the init script runs against a broker: tests/broker/test_contrib.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import CHECKOUT

UNIT = CHECKOUT / "contrib" / "systemd" / "consumer@.service"


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the template unit, with its ExecStart pointed at this venv's twistd."""
    twistd = Path(sys.executable).with_name("twistd")
    unit = tmp_path / "consumer@task_queue.service"
    unit.write_text(UNIT.read_text().replace("/opt/consumer_svc/bin/twistd", str(twistd)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_the_unit_does_not_restart_on_configuration_errors() -> None:
    """RestartPreventExitStatus lists the documented configuration exit statuses, a taken health port's included."""
    from consumer_svc import ExitStatus
    from consumer_svc._errors import ListenFailed

    [line] = [
        line
        for line in UNIT.read_text().splitlines()
        if line.startswith("RestartPreventExitStatus=")
    ]
    statuses = {int(value) for value in line.split("=", 1)[1].split()}
    assert ListenFailed.status in statuses
    assert statuses == {
        ExitStatus.CONFIG,
        ExitStatus.HANDLER,
        ExitStatus.ACCESS_REFUSED,
        ExitStatus.TOPOLOGY_MISMATCH,
    }


def test_the_unit_waits_longer_than_the_drain() -> None:
    """TimeoutStopSec leaves room for the default shutdown timeout plus the close."""
    text = UNIT.read_text()
    [line] = [line for line in text.splitlines() if line.startswith("TimeoutStopSec=")]
    assert int(line.split("=")[1]) > 30 + 5
    assert "Type=notify" in text


def test_the_unit_fits_a_broker_down_at_boot_and_says_how_to_install() -> None:
    """The start waits for the broker however long (READY comes once consuming), and the
    install line puts the service and the handler's package into one virtualenv."""
    text = UNIT.read_text()
    [line] = [line for line in text.splitlines() if line.startswith("TimeoutStartSec=")]
    assert line == "TimeoutStartSec=infinity"
    assert "pip install consumer_svc" not in text
    assert "/opt/consumer_svc/bin/pip install /path/to/consumer_svc /path/to/myapp" in text
    assert "CONSUMER_HANDLER=" in text


#: README's "Scaling out": a copy of the template for one queue, its instances numbered.
REPLICAS = "sed 's/%i/task_queue/g' /etc/systemd/system/consumer@.service"


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_the_copy_for_several_instances_of_one_queue_verifies(tmp_path: Path) -> None:
    """README's copy of the unit for one queue consumes that queue from each numbered
    instance, with that queue's secrets, and systemd-analyze accepts it."""
    readme = (CHECKOUT / "README.md").read_text()
    assert f"{REPLICAS} \\\n    > /etc/systemd/system/consumer-task_queue@.service" in readme
    twistd = Path(sys.executable).with_name("twistd")
    copy = UNIT.read_text().replace("%i", "task_queue")  # what the sed line does
    lines = copy.splitlines()
    [exec_start] = [line for line in lines if line.startswith("ExecStart=")]
    assert " consumer --queue task_queue " in exec_start
    assert "EnvironmentFile=-/etc/consumer_svc/task_queue.env" in lines
    unit = tmp_path / "consumer-task_queue@2.service"
    unit.write_text(copy.replace("/opt/consumer_svc/bin/twistd", str(twistd)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""
