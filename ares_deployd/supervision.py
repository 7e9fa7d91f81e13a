"""What systemd is told while the daemon runs: its status line and watchdog pings.

``systemctl status ares-deployd`` shows the one line in ``STATUS=``: what is being
deployed and for how long, or the last deployment when idle. With ``WatchdogSec=``
the daemon pings from its asyncio loop, and only while that loop, the HTTP loop
and the bus connection are all alive, so that a daemon stuck in any of them is
restarted by systemd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from ares_deployd import sdnotify
from ares_deployd.config import format_duration
from ares_deployd.store import Deployment, Store
from ares_deployd.systemd import LoopThread

log = logging.getLogger(__name__)

# How often the status line is brought up to date while nothing else changes it.
STATUS_EVERY = 5.0


def ago(seconds: float) -> str:
    """How long ago, as a person says it: ``"40s ago"``, ``"3 min ago"``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} days ago"


def status_line(
    listening: str,
    running: list[Deployment],
    latest: Deployment | None,
    now: float,
) -> str:
    """The line for ``STATUS=``, e.g. ``Listening on 127.0.0.1:3001; 1 running:
    ares (1m12s)`` or ``Idle; last: eruka success 3 min ago``."""
    if running:
        each = ", ".join(
            f"{d.target} ({format_duration(now - d.started)})" for d in running
        )
        return f"Listening on {listening}; {len(running)} running: {each}"
    if latest is None:
        return f"Idle; listening on {listening}; no deployments yet"
    return (
        f"Idle; last: {latest.target} {latest.status} "
        f"{ago(now - (latest.finished or latest.started))}"
    )


def watchdog_interval() -> float | None:
    """Seconds between pings when systemd wants them (half of ``WatchdogSec=``)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2_000_000


class Supervisor:
    """Keeps ``STATUS=`` current and pings the watchdog from the asyncio loop.

    ``serving_since`` tells when the HTTP loop last turned and ``bus_alive``
    whether the connection to systemd stands; the watchdog is pinged only while
    both are well.
    """

    def __init__(
        self,
        store: Store,
        loop: LoopThread,
        listening: str,
        serving_since: Callable[[], float],
        bus_alive: Callable[[], bool],
    ) -> None:
        self.store = store
        self.loop = loop
        self.listening = listening
        self._serving_since = serving_since
        self._bus_alive = bus_alive
        self._watchdog = watchdog_interval()
        self._last = ""
        self._stopped = False
        self._task: asyncio.Task[None] | None = None
        self._unwell = ""

    def line(self) -> str:
        return status_line(
            self.listening, self.store.running(), self.store.latest(), time.time()
        )

    def refresh(self, _deployment: Deployment | None = None) -> None:
        """Send the status line if it changed; a listener of the runner."""
        if self._stopped:
            return
        line = self.line()
        if line != self._last:
            self._last = line
            sdnotify.notify(f"STATUS={line}")

    def start(self) -> None:
        async def begin() -> None:
            self._task = asyncio.ensure_future(self._run())

        self.loop.run(begin(), timeout=10)

    def stop_reporting(self) -> None:
        """No more status lines or pings (safe to call from a signal handler)."""
        self._stopped = True

    def stop(self) -> None:
        self.stop_reporting()

        async def end() -> None:
            if self._task is not None:
                self._task.cancel()

        try:
            self.loop.run(end(), timeout=5)
        except (TimeoutError, RuntimeError):
            log.debug("the loop did not take the stop of the supervisor")

    async def _run(self) -> None:
        every = min(STATUS_EVERY, self._watchdog or STATUS_EVERY)
        while not self._stopped:
            self.refresh()
            if self._watchdog is not None:
                self._ping()
            await asyncio.sleep(every)

    def _ping(self) -> None:
        assert self._watchdog is not None
        stalled = time.monotonic() - self._serving_since()
        if not self._bus_alive():
            problem = "the connection to the system bus is lost"
        elif stalled > self._watchdog:
            problem = f"the HTTP loop has not turned for {stalled:.0f}s"
        else:
            self._unwell = ""
            sdnotify.notify("WATCHDOG=1")
            return
        if problem != self._unwell:
            self._unwell = problem
            log.error("not pinging the watchdog: %s; systemd will restart", problem)
