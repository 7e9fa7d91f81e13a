"""The deployment runner: each build a transient systemd unit, then the restart.

A deployment goes through two phases. In ``build`` its steps run in a transient
``Type=oneshot`` unit whose ``ExecStopPost`` writes the unit's result to a file,
so the outcome survives a restart of the daemon. In ``restart`` the daemon
restarts the target's service and checks its health. The end of a build is seen
from systemd's signals, never by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbus_next import Variant
from dbus_next.errors import DBusError

from ares_deployd import buildlog
from ares_deployd.config import Config, Target, format_duration
from ares_deployd.errors import DeploydError, bad_request, conflict, not_found
from ares_deployd.store import CANCELLED, FAILED, SUCCESS, Busy, Deployment, Store
from ares_deployd.systemd import SERVICE, UNIT, LoopThread, Systemd, unit_path

log = logging.getLogger(__name__)

# Runs one step: says which, runs it in a shell of its own, says how it ended.
STEP_SCRIPT = """\
printf '==> Step %s/%s: %s\\n' "$1" "$2" "$3"
/bin/sh -c "$3"
status=$?
if [ "$status" -eq 0 ]; then
    printf '==> Step %s/%s done\\n' "$1" "$2"
else
    printf '==> Step %s/%s exited with status %s\\n' "$1" "$2" "$status"
fi
exit "$status"
"""

# Records how the unit ended where the daemon can read it after its own restart.
RESULT_SCRIPT = """\
printf '%s %s %s\\n' "$SERVICE_RESULT" "$EXIT_CODE" "$EXIT_STATUS" > "$1.tmp"
mv "$1.tmp" "$1"
"""

# Prints the revision a command reports, or "unknown" (nothing at all when told
# to be quiet); never fails the build.
REVISION_SCRIPT = """\
revision=$(/bin/sh -c "$2" 2>/dev/null | head -n 1)
[ -z "$revision" ] && [ "$3" = quiet ] && exit 0
printf '==> Revision %s: %s\\n' "$1" "${revision:-unknown}"
"""

REF_LIMIT = 200

# The kernel's settings, modules and log, and the control groups: only root can
# change them, so only a root build gets these. Each costs systemd remounts in
# the build's namespace, together about 30 ms a step on systemd 252, which an
# unprivileged build would pay for nothing.
ROOT_BUILD_PROTECTIONS = (
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
)

RESTART_JOB_TIMEOUT = 120.0
# Free bytes below which a failure is put down to a full state directory.
LOW_SPACE = 256 * 1024
# How often a build in progress is checked for having vanished unseen.
SAFETY_CHECK = 30.0

# Exit statuses systemd itself uses when it cannot set up a step.
SETUP_FAILURES = {
    200: "the working directory {target.working_directory} cannot be entered",
    216: "the group {target.group} does not exist",
    217: "the user {target.user} does not exist",
    203: "/bin/sh cannot be executed",
}


def unit_for(target: str, deployment_id: str) -> str:
    return f"ares-deploy-{target}-{deployment_id}.service"


def _shell(script: str, *args: str, flags: tuple[str, ...] = ()) -> list[object]:
    """One ``ExecStartEx`` entry: ``script`` run by /bin/sh with ``args``.

    ``no-env-expand`` leaves every ``$`` to the shell, as a step's author expects.
    """
    return ["/bin/sh", ["/bin/sh", "-c", script, *args], [*flags, "no-env-expand"]]


def build_commands(target: Target) -> list[list[object]]:
    """The unit's commands: each step, between the revision markers if any."""
    total = str(len(target.steps))
    commands = [
        _shell(STEP_SCRIPT, "step", str(number), total, step)
        for number, step in enumerate(target.steps, start=1)
    ]
    revision = target.revision_command()
    if revision:
        command, say_unknown = revision
        mode = "say" if say_unknown else "quiet"
        before, after = (
            _shell(REVISION_SCRIPT, "revision", when, command, mode)
            for when in ("before", "after")
        )
        commands = [before, *commands, after]
    return commands


def build_properties(
    target: Target, deployment_id: str, state_dir: Path, ref: str | None = None
) -> list[tuple[str, Variant]]:
    """The properties of the transient unit that runs a target's steps."""
    output = str(buildlog.log_path(state_dir, deployment_id))
    result = str(buildlog.result_path(state_dir, deployment_id))
    stop_post = [_shell(RESULT_SCRIPT, "result", result, flags=("privileged",))]
    environment = {
        **target.environment,
        "DEPLOY_ID": deployment_id,
        "DEPLOY_TARGET": target.name,
    }
    if ref is not None:
        # The ref reaches the steps as data in the environment, never as a command.
        environment["DEPLOY_REF"] = ref
    properties = [
        ("Description", Variant("s", f"ares-deployd: deploy {target.name}")),
        ("Type", Variant("s", "oneshot")),
        ("ExecStartEx", Variant("a(sasas)", build_commands(target))),
        ("ExecStopPostEx", Variant("a(sasas)", stop_post)),
        ("User", Variant("s", target.user)),
        ("WorkingDirectory", Variant("s", str(target.working_directory))),
        ("Environment", Variant("as", [f"{k}={v}" for k, v in environment.items()])),
        ("StandardInput", Variant("s", "null")),
        ("StandardOutputFileToAppend", Variant("s", output)),
        ("StandardErrorFileToAppend", Variant("s", output)),
        ("KillMode", Variant("s", "control-group")),
        ("CollectMode", Variant("s", "inactive-or-failed")),
        ("NoNewPrivileges", Variant("b", True)),
        ("PrivateTmp", Variant("b", True)),
        # What no compiler or package manager needs: the host name, set-uid
        # files and a different execution domain.
        ("ProtectHostname", Variant("b", True)),
        ("RestrictSUIDSGID", Variant("b", True)),
        ("LockPersonality", Variant("b", True)),
        # Below the services' weight: when the CPU is short, a build waits.
        ("CPUWeight", Variant("t", target.cpu_weight)),
    ]
    if target.user == "root":
        properties += [(name, Variant("b", True)) for name in ROOT_BUILD_PROTECTIONS]
    if target.group:
        properties.append(("Group", Variant("s", target.group)))
    if target.timeout:
        # A oneshot unit's whole run is its start: RuntimeMaxSec= does not bound
        # it, TimeoutStartSec= does. Both are set so that either reading holds.
        limit = Variant("t", target.timeout * 1_000_000)
        properties += [("TimeoutStartUSec", limit), ("RuntimeMaxUSec", limit)]
    return properties


@dataclass
class BuildResult:
    service_result: str
    exit_code: str
    exit_status: str

    @classmethod
    def read(cls, path: Path) -> BuildResult | None:
        try:
            fields = path.read_text().split()
        except FileNotFoundError:
            return None
        fields += [""] * (3 - len(fields))
        return cls(*fields[:3])


# MESSAGE_ID of systemd's "Deactivated successfully" line.
DEACTIVATED_OK = "7ad2d189f7e94e70a38c781354912448"


async def journal_result(unit: str, attempts: int = 5) -> BuildResult | None:
    """How a unit ended, from systemd's own journal lines about it.

    The fallback for units whose ExecStopPost never ran (a user that does not
    exist fails every command of the unit, that one included).
    """
    for attempt in range(attempts):
        if attempt:
            # journald may not have written PID 1's last lines yet.
            await asyncio.sleep(0.2)
        process = await asyncio.create_subprocess_exec(
            "journalctl", "--no-pager", "-o", "json", "_PID=1", f"UNIT={unit}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(process.communicate(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
            continue
        result = BuildResult("", "", "")
        for line in out.splitlines():
            entry = json.loads(line)
            if "EXIT_CODE" in entry:
                result.exit_code = str(entry["EXIT_CODE"])
                result.exit_status = str(entry.get("EXIT_STATUS", ""))
            if "UNIT_RESULT" in entry:
                result.service_result = str(entry["UNIT_RESULT"])
            elif entry.get("MESSAGE_ID") == DEACTIVATED_OK:
                result.service_result = "success"
        if result.service_result:
            return result
    return None


class Failure(Exception):
    """A deployment has failed; the message is its one-line reason."""

    def __init__(
        self, reason: str, exit_status: int | None = None, step: int | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_status = exit_status
        self.step = step


class Runner:
    """Starts deployments, follows them to their end and records the outcome."""

    def __init__(
        self,
        config: Callable[[], Config],
        store: Store,
        systemd: Systemd,
        loop: LoopThread,
    ) -> None:
        self._config = config
        self.store = store
        self.systemd = systemd
        self.loop = loop
        self._ends: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Called on the loop: listeners with each deployment that has ended,
        # start_listeners with each whose build unit has started.
        self.listeners: list[Callable[[Deployment], None]] = []
        self.start_listeners: list[Callable[[Deployment], None]] = []
        systemd.on_properties(self._on_properties)
        systemd.on_unit_removed(self._on_removed)

    @property
    def state_dir(self) -> Path:
        return self._config().server.state_dir

    def prepare(self) -> None:
        for sub in ("logs", "results"):
            (self.state_dir / sub).mkdir(mode=0o750, parents=True, exist_ok=True)

    # Called from HTTP threads.

    def trigger(
        self,
        target_name: str,
        ref: str | None = None,
        rollback_of: str | None = None,
    ) -> Deployment:
        """Record and start a deployment of ``target_name``, at ``ref`` if given.

        Raises:
            DeploydError: ``unknown_target`` or ``bad_ref`` (400), ``target_busy``
                (409).
        """
        if ref is not None:
            check_ref(ref)
        config = self._config()
        target = config.targets.get(target_name)
        if target is None:
            known = ", ".join(sorted(config.targets)) or "none configured"
            raise bad_request(
                "unknown_target", f"No target named {target_name!r} (known: {known})"
            )

        deployment_id = str(uuid.uuid4())
        try:
            deployment = self.store.create(
                deployment_id,
                target.name,
                unit_for(target.name, deployment_id),
                ref=ref,
                rollback_of=rollback_of,
            )
        except Busy as busy:
            raise conflict(
                "target_busy",
                f"{target.name} is being deployed already (deployment "
                f"{busy.running.id})",
                id=busy.running.id,
            ) from None
        self.loop.run(self._start(deployment, target), timeout=30)
        return self.store.get(deployment_id) or deployment

    def rollback(self, deployment_id: str) -> Deployment:
        """Deploy again the revision that was live before ``deployment_id``.

        Raises:
            DeploydError: ``not_found`` (404), ``no_revision`` or ``target_busy``
                (409).
        """
        deployment = self.store.get(deployment_id)
        if deployment is None:
            raise not_found("not_found", f"No deployment with id {deployment_id}")
        if deployment.revision_before is None:
            raise conflict(
                "no_revision",
                f"Deployment {deployment_id} recorded no revision before it ran, so "
                "there is nothing to roll back to",
            )
        return self.trigger(
            deployment.target, ref=deployment.revision_before, rollback_of=deployment.id
        )

    def cancel(self, deployment_id: str) -> Deployment:
        """Stop a running deployment; it ends ``cancelled``.

        Raises:
            DeploydError: ``not_found`` (404) or ``not_running`` (409).
        """
        deployment = self.store.get(deployment_id)
        if deployment is None:
            raise not_found("not_found", f"No deployment with id {deployment_id}")
        if deployment.status != "running":
            raise conflict(
                "not_running",
                f"Deployment {deployment_id} has ended already ({deployment.status})",
            )
        self.store.update(deployment_id, cancel_requested=1)
        self.loop.run(self._cancel(deployment), timeout=30)
        return self.store.get(deployment_id) or deployment

    # On the loop.

    def _on_properties(self, path: str, interface: str, changed: dict) -> None:
        if interface == UNIT and changed.get("ActiveState") in ("inactive", "failed"):
            event = self._ends.get(path)
            if event is not None:
                event.set()

    def _on_removed(self, path: str) -> None:
        event = self._ends.get(path)
        if event is not None:
            event.set()

    async def _start(self, deployment: Deployment, target: Target) -> None:
        output = buildlog.log_path(self.state_dir, deployment.id)
        buildlog.append(
            output,
            f"==> Deploying {target.name} ({len(target.steps)} steps), "
            f"deployment {deployment.id}\n",
        )
        path = unit_path(deployment.unit)
        # Listen before starting: a quick build can end before the call returns.
        self._ends[path] = asyncio.Event()
        try:
            await self.systemd.start_transient(
                deployment.unit,
                build_properties(target, deployment.id, self.state_dir, deployment.ref),
            )
        except Exception as error:
            self._ends.pop(path, None)
            if not isinstance(error, (DBusError, DeploydError)):
                log.exception("deployment %s: cannot start its unit", deployment.id)
            text = getattr(error, "text", None) or str(error)
            await self._finish(
                deployment, FAILED, f"could not start the build unit: {text}"
            )
            return
        log.info(
            "deployment %s of %s started in %s",
            deployment.id,
            target.name,
            deployment.unit,
        )
        self._tell(self.start_listeners, deployment)
        self._spawn(deployment, self._follow(deployment, target))

    @staticmethod
    def _tell(
        listeners: list[Callable[[Deployment], None]], deployment: Deployment
    ) -> None:
        # A listener that fails (a full disk under the outbox, say) costs its own
        # work, never the following of the build or the listeners after it.
        for listener in listeners:
            try:
                listener(deployment)
            except Exception:
                log.exception(
                    "deployment %s: %s failed",
                    deployment.id,
                    getattr(listener, "__qualname__", listener),
                )

    def _spawn(self, deployment: Deployment, work: object) -> None:
        task = asyncio.ensure_future(work)  # type: ignore[arg-type]
        self._tasks[deployment.id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(deployment.id, None))

    async def _cancel(self, deployment: Deployment) -> None:
        current = self.store.get(deployment.id)
        if current is None or current.status != "running":
            return
        if current.phase == "build":
            try:
                job = await self.systemd.unit_job("Stop", deployment.unit)
                await self.systemd.wait_job(job, timeout=20)
            except DBusError as error:
                # The unit ended on its own meanwhile; the follower records it.
                log.debug("stopping %s: %s", deployment.unit, error.text)
            except TimeoutError:
                # Its processes are slow to go; systemd's stop goes on, and the
                # follower records the end when it comes.
                log.info("deployment %s is still stopping", deployment.id)
            return
        task = self._tasks.get(deployment.id)
        if task is not None:
            task.cancel()
        else:
            await self._finish(current, CANCELLED, "cancelled by request")

    async def _wait_for_build(self, deployment: Deployment) -> BuildResult | None:
        """Wait until the build unit has ended; what its ExecStopPost recorded."""
        path = unit_path(deployment.unit)
        event = self._ends.setdefault(path, asyncio.Event())
        result_file = buildlog.result_path(self.state_dir, deployment.id)
        try:
            while True:
                result = BuildResult.read(result_file)
                if result is not None:
                    return result
                if not await self._unit_alive(deployment.unit):
                    return BuildResult.read(result_file) or await journal_result(
                        deployment.unit
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), SAFETY_CHECK)
                event.clear()
        finally:
            self._ends.pop(path, None)

    async def _unit_alive(self, unit: str) -> bool:
        path = await self.systemd.loaded_path(unit)
        if path is None:
            return False
        state = await self.systemd.get(path, UNIT, "ActiveState")
        return state not in ("inactive", "failed")

    async def _follow(self, deployment: Deployment, target: Target | None) -> None:
        """Take a deployment from its build to its end, whatever happens."""
        try:
            if deployment.phase == "build":
                result = await self._wait_for_build(deployment)
                self._record_revisions(deployment)
                self._judge_build(deployment, target, result)
                if target is None or target.restart is None:
                    await self._finish(deployment, SUCCESS)
                    return
                self.store.update(deployment.id, phase="restart")
            if target is None or target.restart is None:
                raise Failure(f"the target {deployment.target} is no longer configured")
            if deployment.phase == "health":
                # Picked up again after the restart was seen through: only the
                # health check is left, and the service is not restarted twice.
                await self._health(deployment, target)
            else:
                await self._restart(deployment, target)
            await self._finish(deployment, SUCCESS)
        except Failure as failure:
            if buildlog.space_left(self.state_dir) < LOW_SPACE:
                failure.reason += f" (the state directory {self.state_dir} is full)"
            current = self.store.get(deployment.id)
            if current is not None and current.cancel_requested:
                await self._finish(deployment, CANCELLED, "cancelled by request")
                return
            good = self._rollback_revision(current, target)
            rollback_id = str(uuid.uuid4()) if good else None
            if rollback_id:
                buildlog.append(
                    buildlog.log_path(self.state_dir, deployment.id),
                    f"==> Rolling back to {good} in deployment {rollback_id}\n",
                )
            await self._finish(
                deployment,
                FAILED,
                failure.reason,
                exit_status=failure.exit_status,
                failed_step=failure.step,
                rolled_back_by=rollback_id,
            )
            if target is not None and good and rollback_id:
                await self._start_rollback(deployment, target, good, rollback_id)
        except asyncio.CancelledError:
            await self._finish(deployment, CANCELLED, "cancelled by request")
        except Exception as error:
            log.exception("deployment %s: unexpected error", deployment.id)
            await self._finish(deployment, FAILED, f"internal error: {error}")

    def _record_revisions(self, deployment: Deployment) -> None:
        before, after = buildlog.revisions(
            buildlog.log_path(self.state_dir, deployment.id)
        )
        if before or after:
            self.store.update(deployment.id, revision_before=before, revision=after)

    def _rollback_revision(
        self, deployment: Deployment | None, target: Target | None
    ) -> str | None:
        """The revision to roll back to after this failure, or None for none."""
        if deployment is None or target is None or not target.rollback_on_failure:
            return None
        if deployment.rollback_of is not None or deployment.phase == "build":
            # Only a failed restart or health check is undone, and never a rollback.
            return None
        return self.store.last_good_revision(deployment.target, deployment.seq)

    async def _start_rollback(
        self, failed: Deployment, target: Target, revision: str, rollback_id: str
    ) -> None:
        try:
            rollback = self.store.create(
                rollback_id,
                target.name,
                unit_for(target.name, rollback_id),
                ref=revision,
                rollback_of=failed.id,
            )
        except Busy as busy:
            # A deployment asked for meanwhile took the target first: the failed
            # one names no rollback that never came to be.
            self.store.update(failed.id, rolled_back_by=None)
            buildlog.append(
                buildlog.log_path(self.state_dir, failed.id),
                f"==> Rollback not started: deployment {busy.running.id} started "
                "meanwhile\n",
            )
            log.warning(
                "cannot roll back %s after deployment %s failed: %s started meanwhile",
                target.name,
                failed.id,
                busy.running.id,
            )
            return
        log.warning(
            "rolling back %s to %s in deployment %s", target.name, revision, rollback_id
        )
        await self._start(rollback, target)

    def _judge_build(
        self, deployment: Deployment, target: Target | None, result: BuildResult | None
    ) -> None:
        """Raise :class:`Failure` unless the build unit succeeded."""
        current = self.store.get(deployment.id)
        if current is not None and current.cancel_requested:
            raise Failure("cancelled by request")
        if result is None:
            raise Failure(
                "the build unit ended and recorded no result (was it removed while "
                "ares-deployd was not running?)"
            )
        if result.service_result == "success":
            return

        output = buildlog.log_path(self.state_dir, deployment.id)
        step = buildlog.last_step(output)
        status = int(result.exit_status) if result.exit_status.isdigit() else None
        command = ""
        if target is not None and step is not None and step <= len(target.steps):
            command = f" `{target.steps[step - 1]}`"
        where = f"step {step}{command}" if step else "the build"
        if result.service_result == "timeout":
            limit = format_duration(target.timeout) if target and target.timeout else ""
            raise Failure(f"timed out after {limit}".strip(), None, step)
        if result.exit_code == "exited" and status in SETUP_FAILURES and target:
            raise Failure(SETUP_FAILURES[status].format(target=target), status, step)
        if result.exit_code == "exited":
            raise Failure(f"{where} exited with status {status}", status, step)
        if result.exit_code in ("killed", "dumped"):
            raise Failure(
                f"{where} was killed by signal {result.exit_status}", None, step
            )
        raise Failure(f"the build unit failed ({result.service_result})", None, step)

    async def _restart(self, deployment: Deployment, target: Target) -> None:
        unit = target.restart
        assert unit is not None
        output = buildlog.log_path(self.state_dir, deployment.id)
        buildlog.append(output, f"Restarting {unit}...\n")
        path = unit_path(unit)
        before = await self._invocation(unit)
        try:
            job = await self.systemd.unit_job("Restart", unit)
        except DBusError as error:
            raise Failure(f"{unit} could not be restarted: {error.text}") from None
        try:
            outcome = await self.systemd.wait_job(job, RESTART_JOB_TIMEOUT)
        except TimeoutError:
            raise Failure(f"{unit} did not restart within 2m") from None
        state = await self.systemd.get(path, UNIT, "ActiveState")
        if outcome != "done" or state != "active":
            raise Failure(f"{unit} did not become active (job {outcome}, {state})")
        if await self._invocation(unit) == before:
            raise Failure(f"{unit} was not restarted (same invocation)")
        pid = await self.systemd.get(path, SERVICE, "MainPID")
        buildlog.append(output, f"{unit} is active (PID {pid}).\n")

        if target.health_url:
            self.store.update(deployment.id, phase="health")
        await self._health(deployment, target)

    async def _health(self, deployment: Deployment, target: Target) -> None:
        output = buildlog.log_path(self.state_dir, deployment.id)
        if target.health_url:
            buildlog.append(output, f"Checking {target.health_url}...\n")
            await self._check_health(target.health_url, target.health_timeout)
        buildlog.append(output, "Service started successfully.\n")

    async def _invocation(self, unit: str) -> bytes | None:
        path = await self.systemd.loaded_path(unit)
        if path is None:
            return None
        value = await self.systemd.get(path, UNIT, "InvocationID")
        return bytes(value)

    async def _check_health(self, url: str, bound: int) -> None:
        deadline = time.monotonic() + bound
        last = "no answer"
        while True:
            status, last = await asyncio.to_thread(probe, url)
            if status is not None and 200 <= status < 300:
                return
            if time.monotonic() >= deadline:
                raise Failure(f"health check {url} {last}")
            await asyncio.sleep(0.5)

    async def _finish(
        self,
        deployment: Deployment,
        status: str,
        reason: str | None = None,
        exit_status: int | None = None,
        failed_step: int | None = None,
        rolled_back_by: str | None = None,
    ) -> None:
        output = buildlog.log_path(self.state_dir, deployment.id)
        if status == SUCCESS:
            buildlog.append(output, "==> Deployment succeeded\n")
        else:
            buildlog.append(output, f"==> Deployment {status}: {reason}\n")
        ended = await self._record_end(
            deployment, status, reason, exit_status, failed_step, rolled_back_by
        )
        if not ended:
            return
        finished = self.store.get(deployment.id)
        duration = (finished.finished or time.time()) - deployment.started
        level = logging.INFO if status == SUCCESS else logging.WARNING
        log.log(
            level,
            "deployment %s of %s ended: %s in %.1fs%s",
            deployment.id,
            deployment.target,
            status,
            duration,
            f" ({reason})" if reason else "",
        )
        buildlog.result_path(self.state_dir, deployment.id).unlink(missing_ok=True)
        for pruned in self.store.prune(self._config().server.history):
            buildlog.log_path(self.state_dir, pruned).unlink(missing_ok=True)
        if finished is not None:
            self._tell(self.listeners, finished)

    async def _record_end(self, deployment: Deployment, *outcome: Any) -> bool:
        """Commit the end of a deployment, waiting for disk space if it must."""
        delay = 1.0
        while True:
            try:
                return self.store.finish(deployment.id, *outcome)
            except DeploydError as error:
                log.error(
                    "cannot record the end of deployment %s yet: %s; retrying in %.0fs",
                    deployment.id,
                    error.message,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    async def reattach(self) -> int:
        """Follow the deployments a previous run left running; how many there were."""
        running = self.store.running()
        for deployment in running:
            target = self._config().targets.get(deployment.target)
            log.info(
                "re-attaching to deployment %s of %s (%s)",
                deployment.id,
                deployment.target,
                deployment.phase,
            )
            self._spawn(deployment, self._follow(deployment, target))
        return len(running)


def check_ref(ref: str) -> None:
    """Refuse a ref that is empty, too long, or holds whitespace or control codes.

    Raises:
        DeploydError: ``bad_ref`` (400).
    """
    if not isinstance(ref, str) or not ref:
        raise bad_request("bad_ref", '"ref" must be a non-empty string')
    if len(ref) > REF_LIMIT:
        raise bad_request("bad_ref", f'"ref" is longer than {REF_LIMIT} characters')
    if not ref.isprintable() or any(char.isspace() for char in ref):
        raise bad_request(
            "bad_ref", '"ref" may not hold whitespace or control characters'
        )


def probe(url: str, timeout: float = 5.0) -> tuple[int | None, str]:
    """GET ``url``: its status code and how to describe the answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, f"answered {response.status}"
    except urllib.error.HTTPError as error:
        return error.code, f"answered {error.code}"
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return None, f"failed: {reason}"
