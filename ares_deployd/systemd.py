"""The systemd client: calls and signals on the system bus, through dbus-next.

All D-Bus work happens on one asyncio loop in a thread of its own
(:class:`LoopThread`); the HTTP threads hand it coroutines and wait for the answer
with a bound. A single match rule per signal family serves every unit, since the
bus caps the match rules of one connection.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from dbus_next import BusType, Message, MessageType, Variant
from dbus_next.aio import MessageBus
from dbus_next.errors import DBusError

from ares_deployd.errors import DeploydError

log = logging.getLogger(__name__)

T = TypeVar("T")

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
PROPERTIES = "org.freedesktop.DBus.Properties"
UNIT_PREFIX = "/org/freedesktop/systemd1/unit/"

CALL_TIMEOUT = 10.0

# Called on the loop thread with (unit object path, interface, changed properties).
PropertiesListener = Callable[[str, str, dict[str, Any]], None]


def unit_path(name: str) -> str:
    """The object path systemd gives a unit: every byte not alphanumeric as _xx."""
    escaped = "".join(
        chr(byte) if chr(byte).isascii() and chr(byte).isalnum() else f"_{byte:02x}"
        for byte in name.encode()
    )
    return UNIT_PREFIX + (escaped or "_")


def unwrap(value: Any) -> Any:
    """Plain Python values from dbus-next's Variants, however deep."""
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, dict):
        return {key: unwrap(item) for key, item in value.items()}
    if isinstance(value, list):
        return [unwrap(item) for item in value]
    return value


class LoopThread:
    """An asyncio loop on a daemon thread, fed from other threads."""

    def __init__(self, name: str = "dbus") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result from this thread."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def submit(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Start ``coro`` on the loop without waiting for it."""
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class Systemd:
    """A connection to systemd's manager on the system bus.

    Lives on the loop of a :class:`LoopThread`; every method is a coroutine that
    must run there.
    """

    def __init__(self, bus_address: str | None = None) -> None:
        self._address = bus_address
        self._bus: MessageBus | None = None
        self._listeners: list[PropertiesListener] = []
        self._job_waiters: dict[str, asyncio.Future[str]] = {}
        # JobRemoved can arrive before the call that made the job returns.
        self._job_results: OrderedDict[str, str] = OrderedDict()
        self._reload_listeners: list[Callable[[], Awaitable[None] | None]] = []
        self._removed_listeners: list[Callable[[str], None]] = []

    @property
    def connected(self) -> bool:
        return self._bus is not None and self._bus.connected

    async def connect(self) -> None:
        """Connect, add the match rules and subscribe to the manager's signals."""
        if self._address:
            bus = MessageBus(bus_address=self._address)
        else:
            bus = MessageBus(bus_type=BusType.SYSTEM)
        self._bus = await asyncio.wait_for(bus.connect(), CALL_TIMEOUT)
        self._bus.add_message_handler(self._on_message)
        for rule in (
            f"type='signal',sender='{SYSTEMD}',interface='{PROPERTIES}',"
            f"member='PropertiesChanged',path_namespace='{MANAGER_PATH}/unit'",
            f"type='signal',sender='{SYSTEMD}',interface='{MANAGER}'",
        ):
            await self._call(
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "AddMatch",
                "s",
                [rule],
            )
        await self.manager("Subscribe", "", [])
        log.debug("connected to systemd on the system bus")

    async def wait_for_disconnect(self) -> None:
        if self._bus is not None:
            await self._bus.wait_for_disconnect()

    def disconnect(self) -> None:
        if self._bus is not None:
            self._bus.disconnect()

    def on_properties(self, listener: PropertiesListener) -> None:
        self._listeners.append(listener)

    def on_reload(self, listener: Callable[[], Awaitable[None] | None]) -> None:
        """Call ``listener`` after systemd has reloaded its units."""
        self._reload_listeners.append(listener)

    def on_unit_removed(self, listener: Callable[[str], None]) -> None:
        self._removed_listeners.append(listener)

    def _on_message(self, message: Message) -> bool:
        if message.message_type != MessageType.SIGNAL:
            return False
        if message.member == "PropertiesChanged" and message.path.startswith(
            UNIT_PREFIX
        ):
            interface, changed, _invalidated = message.body
            values = unwrap(changed)
            for listener in self._listeners:
                try:
                    listener(message.path, interface, values)
                except Exception:
                    log.exception("a unit properties listener failed")
        elif message.member == "JobRemoved":
            _job_id, job, _unit, result = message.body
            waiter = self._job_waiters.pop(job, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(result)
            else:
                self._job_results[job] = result
                while len(self._job_results) > 1000:
                    self._job_results.popitem(last=False)
        elif message.member == "UnitRemoved":
            _name, path = message.body
            for removed in self._removed_listeners:
                removed(path)
        elif message.member == "Reloading" and message.body == [False]:
            for reloaded in self._reload_listeners:
                outcome = reloaded()
                if asyncio.iscoroutine(outcome):
                    asyncio.ensure_future(outcome)
        return False

    async def _call(
        self,
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str,
        body: list[Any],
        timeout: float = CALL_TIMEOUT,
    ) -> list[Any]:
        if self._bus is None or not self._bus.connected:
            raise DeploydError(503, "bus_unavailable", "Not connected to systemd")
        message = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body,
        )
        try:
            reply = await asyncio.wait_for(self._bus.call(message), timeout)
        except TimeoutError:
            raise DeploydError(
                504, "systemd_timeout", f"systemd did not answer {member} in time"
            ) from None
        if reply.message_type == MessageType.ERROR:
            raise DBusError(reply.error_name, (reply.body or [""])[0], reply)
        return reply.body

    async def manager(self, member: str, signature: str, body: list[Any]) -> list[Any]:
        return await self._call(SYSTEMD, MANAGER_PATH, MANAGER, member, signature, body)

    async def properties(self, path: str, interface: str) -> dict[str, Any]:
        """Every property of one interface of a unit (slow: keep off hot paths)."""
        (values,) = await self._call(
            SYSTEMD, path, PROPERTIES, "GetAll", "s", [interface]
        )
        return unwrap(values)

    async def get(self, path: str, interface: str, name: str) -> Any:
        (value,) = await self._call(
            SYSTEMD, path, PROPERTIES, "Get", "ss", [interface, name]
        )
        return unwrap(value)

    async def start_transient(
        self, name: str, properties: list[tuple[str, Variant]]
    ) -> str:
        """Start a transient unit; the answer is its start job's object path."""
        (job,) = await self.manager(
            "StartTransientUnit",
            "ssa(sv)a(sa(sv))",
            [name, "fail", [list(pair) for pair in properties], []],
        )
        return job

    async def unit_job(self, verb: str, name: str, mode: str = "replace") -> str:
        """``StartUnit``, ``StopUnit`` or ``RestartUnit``; returns the job path."""
        (job,) = await self.manager(f"{verb}Unit", "ss", [name, mode])
        return job

    async def wait_job(self, job: str, timeout: float) -> str:
        """The result of a job ("done", "failed", "canceled", ...) once it ends."""
        if job in self._job_results:
            return self._job_results.pop(job)
        waiter = self._job_waiters.get(job)
        if waiter is None:
            waiter = asyncio.get_running_loop().create_future()
            self._job_waiters[job] = waiter
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            self._job_waiters.pop(job, None)
            raise

    async def loaded_path(self, name: str) -> str | None:
        """The object path of a unit systemd has loaded, or None when it has not."""
        try:
            (path,) = await self.manager("GetUnit", "s", [name])
        except DBusError as error:
            if error.type == "org.freedesktop.systemd1.NoSuchUnit":
                return None
            raise
        return path

    async def list_units_by_names(self, names: list[str]) -> list[tuple[Any, ...]]:
        """The summary rows systemd keeps for ``names``, loaded or not."""
        (rows,) = await self.manager("ListUnitsByNames", "as", [names])
        return [tuple(row) for row in rows]


def dbus_failure(error: DBusError, doing: str) -> DeploydError:
    """A D-Bus error as the API reports it."""
    return DeploydError(
        502, "systemd_error", f"systemd refused to {doing}: {error.text or error.type}"
    )
