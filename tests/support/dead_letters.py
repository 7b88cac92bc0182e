"""Running ``python -m consumer_svc dead-letters`` as a command, as an operator would.

It runs from the directory given (an empty one: it is the installed package that runs) with a
clean environment: no AMQP_* or CONSUMER_* of ours, only what the test adds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["dead_letters", "tool"]


def tool(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the command with ``args``, and only ``env`` added to a clean environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AMQP_", "CONSUMER_"))}
    return subprocess.run(
        [sys.executable, "-m", "consumer_svc", "dead-letters", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd, env={**clean, **(env or {})},
        check=False,
    )  # fmt: skip


def dead_letters(cwd: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the command against ``url`` (``--url url args``)."""
    return tool(cwd, "--url", url, *args)
