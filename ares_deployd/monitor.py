"""What the configured services are doing: their units' state, health and ports.

The state lives in memory and follows systemd's ``PropertiesChanged`` signals.
systemd is asked directly only when the daemon starts, after systemd reloads,
after the configuration changes and after a job this module ran; health URLs
are checked and listening ports looked up in the background. A request reads
only what is already here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, replace
from typing import Any

from dbus_next.errors import DBusError

from ares_deployd import sockets
from ares_deployd.config import Config, Service
from ares_deployd.errors import DeploydError
from ares_deployd.runner import probe
from ares_deployd.store import rfc3339
from ares_deployd.systemd import (
    SERVICE,
    UNIT,
    LoopThread,
    Systemd,
    dbus_failure,
    unit_path,
)

log = logging.getLogger(__name__)

RUNNING = "running"
DEGRADED = "degraded"
STOPPED = "stopped"

PASSING = "passing"
FAILING = "failing"
UNKNOWN = "unknown"

JOB_TIMEOUT = 120.0
# Longest a health URL may take to answer, whatever the check interval.
PROBE_TIMEOUT = 5.0
# After a unit becomes active, the pauses between looks for its listening
# ports while it has none: a daemon often binds a moment after it started.
# Then it is looked at once every health interval.
PORT_RETRIES = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)
# A service may not answer its health URL the moment its unit is active: in
# this many seconds after that, a failed check leaves its health unknown, and
# checks come at these offsets rather than at the interval.
STARTUP_GRACE = 5.0
STARTUP_CHECKS = (0.0, 0.5, 1.0, 2.0, 4.0, 6.0)

# Property reads in flight on the bus at once.
CALLS_AT_ONCE = 4

VERBS = {"start": "Start", "stop": "Stop", "restart": "Restart"}

# How systemd says a job ended, as a clause after "restart of ares.service".
JOB_RESULTS = {
    "failed": "failed",
    "timeout": "timed out",
    "canceled": "was cancelled by another job",
    "dependency": "failed because a unit it needs failed",
    "skipped": "was skipped",
}


def derive_status(active_state: str, health: str | None) -> str:
    """``running``, ``degraded`` or ``stopped`` from a unit's state and health.

    Inactive and failed units are stopped; active ones run unless their last
    health check failed; every state in between (activating, automatic
    restarts, reloading, deactivating) is degraded.
    """
    if active_state in ("inactive", "failed"):
        return STOPPED
    if active_state == "active":
        return DEGRADED if health == FAILING else RUNNING
    return DEGRADED


@dataclass(frozen=True)
class UnitState:
    load_state: str = "unknown"
    active_state: str = "inactive"
    sub_state: str = "dead"
    # StateChangeTimestamp, microseconds since the epoch; 0 when never.
    since: int = 0
    main_pid: int = 0
    control_group: str = ""
    result: str = ""


@dataclass(frozen=True)
class Health:
    state: str
    detail: str = ""
    checked: float | None = None


@dataclass(frozen=True)
class ServiceView:
    """One service as the API shows it, at one moment."""

    service: Service
    unit: UnitState
    health: Health | None
    ports: tuple[int, ...]

    @property
    def status(self) -> str:
        return derive_status(
            self.unit.active_state, self.health.state if self.health else None
        )

    @property
    def pid(self) -> int | None:
        return self.unit.main_pid or None

    @property
    def port(self) -> int | None:
        if self.service.port is not None:
            return self.service.port
        return self.ports[0] if self.ports else None

    def summary(self) -> dict[str, Any]:
        """The fields ``GET /api/admin/services`` shows for each service."""
        return {
            "status": self.status,
            "pid": self.pid,
            "port": self.port,
            "unit": self.service.unit,
            "load_state": self.unit.load_state,
            "active_state": self.unit.active_state,
            "sub_state": self.unit.sub_state,
            "since": rfc3339(self.unit.since / 1e6) if self.unit.since else None,
            "health": self.health.state if self.health else None,
        }

    def detail(self) -> dict[str, Any]:
        """The summary and what else is known, for one service."""
        health = self.health
        return {
            "name": self.service.name,
            **self.summary(),
            "result": self.unit.result or None,
            "listening": list(self.ports),
            "health_url": self.service.health_url,
            "health_detail": health.detail if health else None,
            "health_checked_at": rfc3339(health.checked)
            if health and health.checked
            else None,
        }


class Monitor:
    """Keeps the state of every configured service current; see the module."""

    def __init__(
        self, config: Callable[[], Config], systemd: Systemd, loop: LoopThread
    ) -> None:
        self._config = config
        self.systemd = systemd
        self.loop = loop
        # All below belongs to the loop thread, except _views: HTTP threads
        # read it, and it is only ever replaced whole.
        self._services: dict[str, Service] = {}
        self._units: dict[str, UnitState] = {}
        self._unit_by_path: dict[str, set[str]] = {}
        self._path_of: dict[str, str] = {}
        # Signals seen per unit: a batch read from before a signal is stale.
        self._signals: dict[str, int] = {}
        # Activations per unit: a health check from before one is stale.
        self._epochs: dict[str, int] = {}
        self._health: dict[str, Health] = {}
        self._ports: dict[str, tuple[int, ...]] = {}
        # When each unit's ports are next looked for, and how many looks found
        # none since it became active.
        self._port_due: dict[str, tuple[float, int]] = {}
        self._port_wake: asyncio.Event | None = None
        self._checking: set[tuple[str, int]] = set()
        self._started_at: dict[str, float] = {}
        self._calls: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._views: dict[str, ServiceView] = {}
        systemd.on_properties(self._on_properties)
        systemd.on_reload(self._on_reload)

    # Called from HTTP threads.

    def views(self) -> dict[str, ServiceView]:
        """Every configured service, in the order of the configuration."""
        return self._views

    def view(self, name: str) -> ServiceView | None:
        return self._views.get(name)

    def control(self, name: str, verb: str) -> ServiceView:
        """Start, stop or restart a service's unit; its state once the job ended.

        Raises:
            DeploydError: ``systemd_error`` (502) when systemd refuses the job,
                ``job_failed`` (502) when it ends other than done,
                ``job_timeout`` (504) when it has not ended in time.
        """
        return self.loop.run(self._control(name, verb), timeout=JOB_TIMEOUT + 30)

    def reconfigure(self) -> None:
        """Follow the services of a configuration loaded again."""
        self.loop.submit(self._reconfigure())

    def stop(self) -> None:
        """End the background checks."""
        self.loop.run(self._stop(), timeout=10)

    # On the loop.

    async def _get(self, path: str, interface: str, name: str) -> Any:
        # dbus-next drops the connection when a burst of calls fills the
        # socket's send buffer: a few at a time.
        if self._calls is None:
            self._calls = asyncio.Semaphore(CALLS_AT_ONCE)
        async with self._calls:
            return await self.systemd.get(path, interface, name)

    async def start(self) -> None:
        """Read every unit's state and start the background checks."""
        self._port_wake = asyncio.Event()
        self._configure()
        await self.refresh()
        self._spawn(self._watch())
        self._spawn(self._watch_ports())

    async def _stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _reconfigure(self) -> None:
        self._configure()
        await self.refresh()
        for name in self._services:
            self._spawn(self._check(name))

    def _configure(self) -> None:
        self._services = dict(self._config().services)
        units = {service.unit for service in self._services.values()}
        for unit in units - set(self._units):
            self._units[unit] = UnitState()
            self._track(unit, unit_path(unit))
        for unit in set(self._units) - units:
            del self._units[unit]
            self._ports.pop(unit, None)
            self._port_due.pop(unit, None)
        self._health = {
            name: self._health.get(name, Health(UNKNOWN))
            for name, service in self._services.items()
            if service.health_url
        }
        for unit, state in self._units.items():
            if state.active_state == "active":
                self._want_ports(unit)
        self._publish()

    def _track(self, unit: str, path: str) -> None:
        """Map ``path`` to ``unit``; an alias shares the path of its unit."""
        old = self._path_of.get(unit)
        if old == path:
            return
        if old is not None:
            self._unit_by_path.get(old, set()).discard(unit)
        self._path_of[unit] = path
        self._unit_by_path.setdefault(path, set()).add(unit)

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _publish(self) -> None:
        self._views = {
            name: ServiceView(
                service,
                self._units.get(service.unit, UnitState()),
                self._health.get(name) if service.health_url else None,
                self._ports.get(service.unit, ()),
            )
            for name, service in self._services.items()
        }

    def _on_properties(self, path: str, interface: str, changed: dict) -> None:
        units = self._unit_by_path.get(path)
        if not units:
            return
        for unit in list(units):
            old = self._units.get(unit)
            if old is None:
                continue
            self._signals[unit] = self._signals.get(unit, 0) + 1
            if interface == UNIT:
                new = replace(
                    old,
                    # A unit that sends signals exists, even if it did not before.
                    load_state=changed.get(
                        "LoadState",
                        "loaded" if old.load_state == "not-found" else old.load_state,
                    ),
                    active_state=changed.get("ActiveState", old.active_state),
                    sub_state=changed.get("SubState", old.sub_state),
                    since=changed.get("StateChangeTimestamp", old.since),
                )
            elif interface == SERVICE:
                new = replace(
                    old,
                    main_pid=changed.get("MainPID", old.main_pid),
                    result=changed.get("Result", old.result),
                )
            else:
                continue
            self._apply(unit, old, new)

    def _on_reload(self) -> None:
        # A reload may move a unit to another slice, and so another group.
        for unit, state in self._units.items():
            self._units[unit] = replace(state, control_group="")
        self._spawn(self.refresh())

    def _apply(self, unit: str, old: UnitState, new: UnitState) -> None:
        if new == old:
            return
        self._units[unit] = new
        started = new.active_state == "active" and old.active_state != "active"
        if started:
            self._epochs[unit] = self._epochs.get(unit, 0) + 1
            self._started_at[unit] = asyncio.get_running_loop().time()
            for name, service in self._services.items():
                if service.unit == unit and service.health_url:
                    self._health[name] = Health(UNKNOWN)
                    self._spawn(self._check_while_starting(name))
        elif old.active_state == "active" and new.active_state != "active":
            for name in self._health:
                if self._services[name].unit == unit:
                    self._health[name] = Health(UNKNOWN)
        if new.active_state != "active":
            self._ports.pop(unit, None)
            self._port_due.pop(unit, None)
        elif started or new.main_pid != old.main_pid:
            self._want_ports(unit)
        self._publish()

    async def refresh(self, units: Iterable[str] | None = None) -> None:
        """Read the state of ``units`` (default: all) from systemd in one batch."""
        names = sorted(self._units if units is None else set(units) & set(self._units))
        if not names:
            return
        before = {unit: self._signals.get(unit, 0) for unit in names}
        try:
            rows = await self.systemd.list_units_by_names(names)
        except (DBusError, DeploydError) as error:
            log.warning("cannot read the state of the services' units: %s", error)
            return

        loaded = []
        for row in rows:
            unit, load_state, active_state, sub_state, path = (
                row[0],
                row[2],
                row[3],
                row[4],
                row[6],
            )
            if unit not in self._units:
                continue
            self._track(unit, path)
            if self._signals.get(unit, 0) != before.get(unit):
                continue
            old = self._units[unit]
            self._apply(
                unit,
                old,
                replace(
                    old,
                    load_state=load_state,
                    active_state=active_state,
                    sub_state=sub_state,
                    main_pid=0
                    if active_state in ("inactive", "failed")
                    else old.main_pid,
                ),
            )
            if load_state != "not-found":
                loaded.append((unit, path))
        await asyncio.gather(
            *(self._read_details(unit, path, before[unit]) for unit, path in loaded)
        )

    async def _read_details(self, unit: str, path: str, signals: int) -> None:
        """What ListUnitsByNames leaves out, one Get per property."""
        wanted = [(UNIT, "StateChangeTimestamp")]
        state = self._units[unit]
        if unit.endswith(".service"):
            wanted += [(SERVICE, "MainPID"), (SERVICE, "Result")]
            if state.active_state != "inactive" and not state.control_group:
                wanted.append((SERVICE, "ControlGroup"))
        try:
            values = await asyncio.gather(
                *(self._get(path, interface, name) for interface, name in wanted)
            )
        except (DBusError, DeploydError) as error:
            log.debug("cannot read the properties of %s: %s", unit, error)
            return
        found = {name: value for (_, name), value in zip(wanted, values, strict=True)}

        old = self._units.get(unit)
        if old is None:
            return
        new = replace(old, control_group=found.get("ControlGroup", old.control_group))
        if self._signals.get(unit, 0) == signals:
            new = replace(
                new,
                since=found["StateChangeTimestamp"],
                main_pid=found.get("MainPID", old.main_pid),
                result=found.get("Result", old.result),
            )
        self._apply(unit, old, new)

    # Ports.

    def _want_ports(self, unit: str) -> None:
        """Look for the ports of ``unit`` soon, if a service needs them."""
        if not unit.endswith(".service") or not any(
            service.unit == unit and service.port is None
            for service in self._services.values()
        ):
            return
        self._port_due[unit] = (self.loop.loop.time(), 0)
        if self._port_wake is not None:
            self._port_wake.set()

    async def _watch_ports(self) -> None:
        """Look for the listening ports of the units that are due, all at once."""
        assert self._port_wake is not None
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            due = {unit: at for unit, at in self._port_due.items() if at[0] <= now}
            for unit in due:
                state = self._units.get(unit)
                if state is not None and not state.control_group:
                    await self._read_control_group(unit)
            looked = {
                unit: state.control_group
                for unit in due
                if (state := self._units.get(unit)) and state.active_state == "active"
            }
            found = (
                await asyncio.to_thread(sockets.unit_ports, looked) if looked else {}
            )

            interval = float(self._config().server.health_interval)
            changed = False
            for unit, at in due.items():
                # Asked for again meanwhile, or gone: that request stands.
                if self._port_due.get(unit) != at:
                    continue
                if unit not in found:
                    del self._port_due[unit]
                    continue
                ports = found[unit]
                misses = 0 if ports else at[1] + 1
                pause = (
                    PORT_RETRIES[misses - 1]
                    if 0 < misses <= len(PORT_RETRIES)
                    else interval
                )
                self._port_due[unit] = (loop.time() + pause, misses)
                if tuple(ports) != self._ports.get(unit, ()):
                    self._ports[unit] = tuple(ports)
                    changed = True
            if changed:
                self._publish()

            self._port_wake.clear()
            upcoming = [when for when, _ in self._port_due.values()]
            timeout = max(0.0, min(upcoming) - loop.time()) if upcoming else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._port_wake.wait(), timeout)

    async def _read_control_group(self, unit: str) -> None:
        path = self._path_of.get(unit, unit_path(unit))
        try:
            group = await self._get(path, SERVICE, "ControlGroup")
        except (DBusError, DeploydError) as error:
            log.debug("cannot read the control group of %s: %s", unit, error)
            return
        old = self._units.get(unit)
        if old is not None:
            self._apply(unit, old, replace(old, control_group=group))

    # Health.

    async def _watch(self) -> None:
        """Check each health URL, every health interval."""
        while True:
            await asyncio.gather(*(self._check(name) for name in self._services))
            await asyncio.sleep(self._config().server.health_interval)

    async def _check_while_starting(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for offset in STARTUP_CHECKS:
            await asyncio.sleep(max(0.0, started + offset - loop.time()))
            health = self._health.get(name)
            if health is None or health.state == PASSING:
                return
            await self._check(name)

    async def _check(self, name: str) -> None:
        service = self._services.get(name)
        if service is None or service.health_url is None:
            return
        state = self._units.get(service.unit)
        if state is None or state.active_state != "active":
            return
        epoch = self._epochs.get(service.unit, 0)
        if (name, epoch) in self._checking:
            return
        timeout = min(PROBE_TIMEOUT, float(self._config().server.health_interval))

        self._checking.add((name, epoch))
        try:
            code, detail = await asyncio.to_thread(probe, service.health_url, timeout)
        finally:
            self._checking.discard((name, epoch))

        if (
            self._services.get(name) is not service
            or self._epochs.get(service.unit, 0) != epoch
        ):
            return
        passing = code is not None and 200 <= code < 300
        previous = self._health.get(name)
        starting = (
            asyncio.get_running_loop().time() - self._started_at.get(service.unit, 0.0)
            < STARTUP_GRACE
        )
        if not passing and starting and previous and previous.state == UNKNOWN:
            self._health[name] = Health(UNKNOWN, f"starting: {detail}", time.time())
            self._publish()
            return
        self._health[name] = Health(
            PASSING if passing else FAILING, detail, time.time()
        )
        if not passing and (previous is None or previous.state != FAILING):
            log.warning(
                "service %s is degraded: health check %s %s",
                name,
                service.health_url,
                detail,
            )
        elif passing and previous is not None and previous.state == FAILING:
            log.info("service %s passes its health check again", name)
        self._publish()

    # Jobs.

    async def _control(self, name: str, verb: str) -> ServiceView:
        service = self._services.get(name)
        if service is None:
            raise DeploydError(404, "not_found", f"No service named {name!r}")
        try:
            job = await self.systemd.unit_job(VERBS[verb], service.unit)
        except DBusError as error:
            raise dbus_failure(error, f"{verb} {service.unit}") from None
        try:
            result = await self.systemd.wait_job(job, JOB_TIMEOUT)
        except TimeoutError:
            raise DeploydError(
                504,
                "job_timeout",
                f"The {verb} of {service.unit} has not ended within "
                f"{JOB_TIMEOUT:.0f}s; it goes on",
            ) from None

        await self.refresh([service.unit])
        view = self._views[name]
        if result != "done":
            reason = view.unit.result if view.unit.result not in ("", "success") else ""
            happened = JOB_RESULTS.get(result, f"ended: {result}")
            raise DeploydError(
                502,
                "job_failed",
                f"The {verb} of {service.unit} {happened}"
                + (f" ({reason})" if reason else ""),
                result=result,
                reason=reason or None,
                service=view.detail(),
            )
        log.info("%s of %s done on request", verb, service.unit)
        return view
