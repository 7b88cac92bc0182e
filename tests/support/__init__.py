"""What the tests share: broker tools, the service and twistd runners, waits, handlers for twistd,
the unit tests' settings.

The tests import it as ``support`` (``from support.waiting import eventually``): tests/ has no
``__init__.py``, so pytest puts it on ``sys.path`` (and never the repository root: ``consumer_svc``
is always the installed package). The modules that are pytest plugins (service_support,
twistd_support, certs, spans) are loaded by tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

#: tests/, the folder on ``sys.path`` (a twistd subprocess gets it as PYTHONPATH too).
TESTS = Path(__file__).resolve().parent.parent
#: The checkout: README.md, tap.conf, contrib/, examples/.
CHECKOUT = TESTS.parent
