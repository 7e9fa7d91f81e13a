from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sandbox import Sandbox, can_boot

# --- Sandbox: a real systemd for integration tests ---------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: runs against a real systemd in a sandbox (root)"
    )


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    """One booted sandbox for the whole session, powered off at its end."""
    reason = can_boot()
    if reason is not None:
        # CI must run these tests: a machine that cannot is misconfigured.
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot boot a sandbox: {reason}")

        pytest.skip(f"cannot boot a sandbox: {reason}")

    # The daemon inside runs from this checkout and its virtual environment.
    checkout = Path(__file__).resolve().parents[1]
    with Sandbox.boot(share=[checkout, sys.prefix]) as booted:
        yield booted


# --- End of sandbox section ---------------------------------------------------
