"""``make run``: the demo boots, prints how to reach it, and answers as it says."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests

from tests.deployd import ROOT, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo() -> Iterator[dict[str, str]]:
    """The demo running in a sandbox of its own: what it printed, by label."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "demo" / "run.py"), "--port",
         str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    assert process.stdout is not None
    printed: list[str] = []
    deadline = time.monotonic() + 120
    try:
        for line in process.stdout:
            printed.append(line)
            if "Ctrl-C powers the sandbox off." in line:
                break
            assert time.monotonic() < deadline, "".join(printed)
        text = "".join(printed)
        found = dict(re.findall(r"^\s+(Base URL|Admin secret):\s+(\S+)$", text, re.M))
        assert set(found) == {"Base URL", "Admin secret"}, text
        yield found
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    assert process.returncode == 0


def test_demo_answers_401_without_the_secret_and_serves_with_it(
    demo: dict[str, str],
) -> None:
    url = demo["Base URL"] + "/api/admin/deploys"

    refused = requests.get(url, timeout=10)
    listed = requests.get(
        url, headers={"X-Admin-Secret": demo["Admin secret"]}, timeout=10
    )

    assert refused.status_code == 401
    assert refused.json()["error"] == "unauthorized"
    assert listed.status_code == 200
    assert listed.json() == {"deploys": []}


def test_demo_deploys_ares_for_real(demo: dict[str, str]) -> None:
    headers = {"X-Admin-Secret": demo["Admin secret"]}
    base = demo["Base URL"]

    started = requests.post(
        f"{base}/api/admin/deploy", json={"target": "ares"}, headers=headers, timeout=30
    ).json()
    deadline = time.monotonic() + 60
    while (
        done := requests.get(
            f"{base}/api/admin/deploy/{started['id']}", headers=headers
        ).json()
    )["status"] == "running":
        assert time.monotonic() < deadline, done
        time.sleep(0.2)

    assert done["status"] == "success", done["output"]
    assert "Service started successfully." in done["output"]
