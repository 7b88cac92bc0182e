"""The README's example test file, examples/test_tasks.py, passes as a handler author would run it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
