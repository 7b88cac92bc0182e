# What the tests use of pytest-twisted, typed: it ships no type information (no py.typed), so
# without this every @pytest_twisted.ensureDeferred test would be untyped to mypy.
# ensureDeferred and the async fixtures only mark the function for pytest-twisted's runner.

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")

def ensureDeferred(f: _F) -> _F: ...
def async_fixture(f: _F) -> _F: ...
def async_yield_fixture(f: _F) -> _F: ...
def blockon(d: Deferred[_T]) -> _T: ...
