"""Fixtures for tests against ares-deployd running in the sandbox."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deployd import Deployd
from tests.sandbox import Sandbox

WORK = "/srv/work"


@pytest.fixture(scope="session")
def deployd(sandbox: Sandbox) -> Iterator[Deployd]:
    """The daemon installed in the session's sandbox; each module configures it."""
    sandbox.run("install", "-d", "-m", "1777", WORK)
    daemon = Deployd(sandbox)
    daemon.install()
    yield daemon
    daemon.stop()
