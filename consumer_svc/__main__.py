"""``python -m consumer_svc``: commands around the service (the service itself runs under twistd).

Nothing here installs a reactor: the commands are short-lived and use pika's
``BlockingConnection``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from ._deadletters import add_arguments as add_dead_letter_arguments
from ._deadletters import run as run_dead_letters
from ._errors import ExitStatus


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit status 64."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitStatus.CONFIG, f"{self.prog}: error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    """The command line: ``python -m consumer_svc dead-letters ...``."""
    top = _Parser(
        prog="python -m consumer_svc",
        description="Tools around the consumer service. The service itself runs with "
        "`twistd [-n] consumer --queue NAME --handler package.module:function`.",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dead_letters = commands.add_parser(
        "dead-letters",
        help="list or replay the messages parked in the dead-letter queue",
        description=(
            "List (list) or replay (replay) the messages the service parked in the\n"
            "dead-letter queue: <queue>.dead unless --dead-letter-queue names another.\n"
            "The options below may also come from the environment (CONSUMER_<OPTION>,\n"
            "AMQP_URL) or the --config file, with the service's precedence.\n\n"
            "exit statuses: 0 done, 64 bad arguments, URL or TLS file, 66 no such queue,\n"
            "69 broker unreachable or lost, 77 access refused"
        ),
        epilog=(
            "examples:\n"
            "  python -m consumer_svc dead-letters --queue task_queue list\n"
            "  python -m consumer_svc dead-letters --queue task_queue replay --count 10\n"
            "  python -m consumer_svc dead-letters --config tap.conf list"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dead_letter_arguments(dead_letters)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit status."""
    args = parser().parse_args(argv)
    return run_dead_letters(args)


if __name__ == "__main__":
    sys.exit(main())
