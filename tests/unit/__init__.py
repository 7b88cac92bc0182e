"""Unit tests: no broker. The real objects on `task.Clock`, `MemoryReactorClock`,
`StringTransport` and the testing kit's fakes, and the installed commands run briefly as
subprocesses (`twistd consumer` refusing bad options, say). tests/conftest.py refuses a run in
which a test here asks for a broker fixture.
"""
