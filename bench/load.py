"""Bounded HTTP load on loopback: wrk when it is installed, else a Python client.

Both stop after a fixed time; both report requests per second and latency
percentiles, so the figures can use either.
"""

from __future__ import annotations

import http.client
import re
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Load:
    requests: int
    errors: int
    seconds: float
    p50: float
    p99: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def _wrk_seconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    assert match is not None, text
    number, unit = match.groups()
    return float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def wrk(url: str, headers: dict[str, str], seconds: float, connections: int) -> Load:
    duration = f"{max(1, round(seconds))}s"
    argv = ["wrk", "-t", "2", "-c", str(connections), "-d", duration]
    argv += ["--latency", "--timeout", "10s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    out = subprocess.run(
        [*argv, url], capture_output=True, text=True, check=True, timeout=seconds + 30
    ).stdout
    done = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    assert done is not None, out
    total = int(done.group(1))
    errors = sum(
        int(count)
        for count in re.findall(r"(?:Non-2xx or 3xx responses:|connect|read|write|"
                                r"timeout) (\d+)", out)
    )  # fmt: skip
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, flags=re.MULTILINE))
    return Load(
        requests=total,
        errors=errors,
        seconds=_wrk_seconds(done.group(2) + done.group(3)),
        p50=_wrk_seconds(percentiles["50"]),
        p99=_wrk_seconds(percentiles["99"]),
    )


def _drive(
    url: str,
    headers: dict[str, str],
    connections: int,
    next_due: Callable[[], float | None],
) -> Load:
    """GET ``url`` from ``connections`` threads, each request when ``next_due``
    says (a ``perf_counter`` time; None to stop), its latency counted from then."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def connect() -> http.client.HTTPConnection:
        return http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)

    def worker() -> None:
        mine, failed = [], 0
        connection = connect()
        while (when := next_due()) is not None:
            time.sleep(max(0.0, when - time.perf_counter()))
            try:
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
                response.read()
                failed += response.status >= 300
            except (OSError, http.client.HTTPException):
                failed += 1
                connection.close()
                connection = connect()
            mine.append(time.perf_counter() - when)
        connection.close()
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return Load(
        requests=len(latencies),
        errors=errors[0],
        seconds=elapsed,
        p50=statistics.median(latencies),
        p99=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    )


def python_client(
    url: str, headers: dict[str, str], seconds: float, connections: int
) -> Load:
    """As many requests as the clients can make, one after another each."""
    deadline = time.perf_counter() + seconds

    def now_until_the_deadline() -> float | None:
        now = time.perf_counter()
        return now if now < deadline else None

    return _drive(url, headers, connections, now_until_the_deadline)


def paced(
    url: str, headers: dict[str, str], seconds: float, rate: float, connections: int = 4
) -> Load:
    """GET ``url`` at a steady ``rate`` a second for ``seconds``.

    Each request's latency counts from when it was due, not from when a client
    got round to sending it, so a server that falls behind shows it.
    """
    started = time.perf_counter() + 0.05
    numbers = iter(range(int(seconds * rate)))
    lock = threading.Lock()

    def next_slot() -> float | None:
        with lock:
            number = next(numbers, None)
        return None if number is None else started + number / rate

    return _drive(url, headers, connections, next_slot)


def load(
    url: str, headers: dict[str, str], seconds: float, connections: int = 8
) -> Load:
    """GET ``url`` as fast as ``connections`` clients can for ``seconds``."""
    if shutil.which("wrk"):
        return wrk(url, headers, seconds, connections)
    return python_client(url, headers, seconds, connections)


def client_name() -> str:
    return "wrk" if shutil.which("wrk") else "a Python client (wrk not installed)"
