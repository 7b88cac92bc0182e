"""The files in contrib/ for operators: checked as far as this machine allows."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent / "contrib" / "systemd" / "consumer@.service"


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
    """RestartPreventExitStatus lists the documented configuration exit statuses."""
    from consumer_svc import ExitStatus

    [line] = [
        line
        for line in UNIT.read_text().splitlines()
        if line.startswith("RestartPreventExitStatus=")
    ]
    statuses = {int(value) for value in line.split("=", 1)[1].split()}
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
