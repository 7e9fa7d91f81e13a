"""A throwaway systemd for integration tests.

Boots the host's own systemd as PID 1 of fresh PID, mount, cgroup, UTS and IPC
namespaces, on an overlay of the host's root file system that lives in memory,
so tests can run a daemon against a real service manager, D-Bus and journald.
The network namespace is the host's: a service listening on 127.0.0.1 inside is
reachable from the tests. Needs root.

Run ``python3 tests/sandbox.py boot`` to keep one running until interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from types import TracebackType

logger = logging.getLogger(__name__)

SYSTEMD = "/usr/lib/systemd/systemd"
_TOOLS = ("unshare", "nsenter", "setpriv", "mount", "umount", "pivot_root", "sh")

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PR_SET_PDEATHSIG = 1

# Runs as PID 1 of the new PID namespace, still in the host's cgroup namespace.
# Entering the sandbox cgroup here, and only then creating the cgroup namespace,
# roots that namespace at the sandbox cgroup while the unshare parent waiting
# outside stays in its own cgroup; on a unified host the sandbox cgroup then
# holds no process but the sandbox's, as systemd needs to enable controllers.
_ENTER_CGROUP = 'echo 0 > "$1/cgroup.procs" && shift && exec unshare --cgroup -- "$@"'

# Prepares the new root and execs systemd. Every write of the sandbox goes to
# tmpfs: the root is an overlay on the host's with its upper layer in memory,
# and /dev, /run and /tmp are fresh. The network namespace is the host's, so
# /proc/sys stays read-only; /sys is read-only so nothing inside acts on the
# host's devices. Dropping CAP_SYS_MODULE and the audit capabilities keeps
# systemd-modules-load and journald's audit socket off the host's kernel.
# systemd gets container= so it behaves as in a container: no hardware setup,
# no time sync, and its shutdown leaves the host's mounts and swap alone.
_BOOT = r"""
set -eu
machine_id=$1 systemd=$2 stage=$3
shift 3
# $stage is any directory that holds none of the shared paths: the mounts of
# this namespace are private, so covering it hides it only here.

mount --make-rprivate /
mount -t tmpfs -o mode=0700 ares-sandbox "$stage"
mkdir "$stage/upper" "$stage/work" "$stage/root"
mount -t overlay overlay \
    -o "lowerdir=/,upperdir=$stage/upper,workdir=$stage/work" "$stage/root"
root=$stage/root

mount -t proc proc "$root/proc"
mount --bind "$root/proc/sys" "$root/proc/sys"
mount -o remount,bind,ro "$root/proc/sys"
mount -t sysfs -o ro sysfs "$root/sys"
mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"

mount -t tmpfs -o mode=0755,nosuid dev "$root/dev"
for node in null zero full random urandom tty; do
    touch "$root/dev/$node"
    mount --bind "/dev/$node" "$root/dev/$node"
done
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$root/dev/shm"
ln -s pts/ptmx "$root/dev/ptmx"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"

mount -t tmpfs -o mode=0755,nosuid,nodev run "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$root/tmp"

# Shared host paths (the checkout and its virtual environment), read-only at
# the same place inside; the overlay alone would miss them under a fresh /tmp
# or on another filesystem.
for path in "$@"; do
    mkdir -p "$root$path"
    mount --bind "$path" "$root$path"
    mount -o remount,bind,ro "$root$path"
done

# systemd prints its status to /dev/console; keep it readable from the host
# instead of letting it reach the host's console.
mkdir "$root/run/ares-sandbox"
touch "$root/run/ares-sandbox/console" "$root/dev/console"
mount --bind "$root/run/ares-sandbox/console" "$root/dev/console"

# Its own machine ID, so journals and D-Bus do not pose as the host.
printf '%s\n' "$machine_id" > "$root/etc/machine-id"

# The host's timers (package updates, fstrim, ...) would reach out to the
# network and the host's disks; the sandbox starts only what tests ask for.
mkdir -p "$root/run/systemd/system"
ln -s /dev/null "$root/run/systemd/system/timers.target"

cd "$root"
mkdir -p .oldroot
pivot_root . .oldroot
cd /
umount -l /.oldroot
rmdir /.oldroot

export container=ares-sandbox
exec setpriv --bounding-set -sys_module,-audit_control,-audit_read,-audit_write \
    "$systemd" --system --unit=basic.target
"""


class SandboxError(Exception):
    """A sandbox could not be booted, reached or run a command."""


def _stage_for(shared: list[str]) -> str:
    # The staging tmpfs covers its directory while booting: never a shared one's.
    for stage in ("/tmp", "/mnt", "/media", "/var/tmp", "/srv"):
        inside = any(path == stage or path.startswith(stage + "/") for path in shared)
        if os.path.isdir(stage) and not inside:
            return stage
    raise SandboxError(f"no directory to stage a sandbox in, apart from {shared}")


def _cgroup2_root() -> pathlib.Path | None:
    # /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a hybrid one.
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields, _, tail = line.partition(" - ")
            parts = fields.split(" ")
            # A mount whose root is not "/" shows only a subtree.
            if tail.startswith("cgroup2 ") and parts[3] == "/":
                mounts.append(parts[4])

    for candidate in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", *mounts):
        if candidate in mounts:
            return pathlib.Path(candidate)

    return None


def can_boot() -> str | None:
    """None if this machine can boot a sandbox, else the reason it cannot."""
    if not sys.platform.startswith("linux"):
        return f"sandboxes need Linux, this is {sys.platform}"

    if os.geteuid() != 0:
        return "sandboxes need root"

    missing = [tool for tool in _TOOLS if shutil.which(tool, path=_PATH) is None]
    if missing:
        return f"missing commands: {', '.join(missing)}"

    if not os.access(SYSTEMD, os.X_OK):
        return f"no systemd at {SYSTEMD}"

    if _cgroup2_root() is None:
        return "no cgroup2 hierarchy mounted"

    return None


class Sandbox:
    """A running systemd in namespaces of its own; see the module docstring."""

    def __init__(
        self,
        name: str,
        cgroup: pathlib.Path,
        launcher: subprocess.Popen[bytes],
        pid: int,
    ) -> None:
        self.name = name
        self.cgroup = cgroup
        self.pid = pid
        # Units that had failed when boot finished; empty when it was clean.
        self.failed_units: list[str] = []
        self._launcher = launcher
        self._off = False

    @classmethod
    def boot(
        cls,
        name: str | None = None,
        timeout: float = 60,
        share: Sequence[str | os.PathLike[str]] = (),
    ) -> Sandbox:
        """Boot a sandbox and wait until its systemd has finished starting up.

        ``share`` names host directories seen read-only at the same path inside.
        Raises SandboxError, with what the failing step printed, if it does not.
        """
        shared = sorted({str(pathlib.Path(path).resolve()) for path in share})
        stage = _stage_for(shared)
        reason = can_boot()
        if reason is not None:
            raise SandboxError(f"cannot boot a sandbox: {reason}")

        name = name or f"ares-sandbox-{uuid.uuid4().hex[:8]}"
        if not _NAME.fullmatch(name):
            raise SandboxError(f"bad sandbox name {name!r}: use [A-Za-z0-9_.-]")

        root = _cgroup2_root()
        assert root is not None
        cgroup = root / name
        try:
            cgroup.mkdir()
        except OSError as e:
            raise SandboxError(f"cannot create cgroup {cgroup}: {e}") from e

        started = time.monotonic()
        argv = [
            "unshare",
            "--pid",
            "--mount",
            "--uts",
            "--ipc",
            "--kill-child=SIGKILL",
            "--",
            "sh",
            "-c",
            _ENTER_CGROUP,
            "enter-cgroup",
            str(cgroup),
            "sh",
            "-c",
            _BOOT,
            "boot",
            uuid.uuid4().hex,
            SYSTEMD,
            stage,
            *shared,
        ]
        try:
            launcher = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={"PATH": _PATH},
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as e:
            _remove_cgroup(cgroup)
            raise SandboxError(f"cannot start unshare: {e}") from e

        sandbox: Sandbox | None = None
        try:
            pid = _wait_for_systemd(launcher, started + timeout)
            sandbox = cls(name, cgroup, launcher, pid)
            sandbox._wait_until_running(started + timeout)
        except BaseException:
            if sandbox is not None:
                sandbox.poweroff()
            else:
                _stop_launcher(launcher)
                _remove_cgroup(cgroup)
            raise

        logger.info(
            "sandbox %s booted in %.2fs, PID 1 is host pid %s",
            name,
            time.monotonic() - started,
            pid,
        )
        return sandbox

    def run(
        self,
        *argv: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside, as root, and capture its output as text.

        It gets a minimal environment (PATH, LANG, HOME) updated with env, not
        the caller's. With check, a non-zero exit raises SandboxError.
        """
        environ = {"PATH": _PATH, "LANG": "C.UTF-8", "HOME": "/root"}
        environ.update(env or {})
        command = ["nsenter", "--target", str(self.pid), "--all", "--", *argv]
        try:
            result = subprocess.run(
                command,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=environ,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise SandboxError(
                f"{' '.join(argv)} did not finish within {timeout:.1f}s in "
                f"sandbox {self.name}"
            ) from e

        if check and result.returncode != 0:
            output = result.stderr.strip() or result.stdout.strip() or "no output"
            raise SandboxError(
                f"{' '.join(argv)} exited with {result.returncode} in sandbox "
                f"{self.name}: {output}"
            )

        return result

    def systemctl(
        self, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run systemctl inside with the given arguments."""
        return self.run("systemctl", *args, check=check)

    def path(self, p: str) -> pathlib.Path:
        """The host path of p inside the sandbox, while it runs.

        Writes there land in the sandbox, not on the host. An absolute symlink
        met on the way is resolved on the host, so pass resolved paths.
        """
        return pathlib.Path(f"/proc/{self.pid}/root") / p.lstrip("/")

    def write(self, p: str, text: str, mode: int = 0o644) -> None:
        """Write text to the file p inside, creating its parent directories."""
        target = self.path(p)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        target.chmod(mode)

    def poweroff(self, timeout: float = 30) -> None:
        """Shut the sandbox down, end all its processes and remove its cgroup.

        Calling it again does nothing.
        """
        if self._off:
            return

        self._off = True
        deadline = time.monotonic() + timeout
        if self._launcher.poll() is None:
            try:
                self.run(
                    "systemctl",
                    "--no-block",
                    "poweroff",
                    check=False,
                    timeout=max(1.0, deadline - time.monotonic()),
                )
            except SandboxError as e:
                logger.warning("sandbox %s: %s", self.name, e)

            try:
                self._launcher.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning(
                    "sandbox %s did not power off within %ss, killing it",
                    self.name,
                    timeout,
                )

        _stop_launcher(self._launcher)
        _remove_cgroup(self.cgroup)
        logger.info("sandbox %s powered off", self.name)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.poweroff()

    def _console(self) -> str:
        try:
            return self.path("/run/ares-sandbox/console").read_text(errors="replace")
        except OSError:
            return ""

    def _wait_until_running(self, deadline: float) -> None:
        state = ""
        while time.monotonic() < deadline:
            if self._launcher.poll() is not None:
                raise SandboxError(
                    f"sandbox {self.name} stopped while booting: "
                    f"{_output(self._launcher)}"
                )

            try:
                result = self.run(
                    "systemctl",
                    "is-system-running",
                    "--wait",
                    check=False,
                    timeout=max(0.1, deadline - time.monotonic()),
                )
            except SandboxError:
                break

            # Before systemd listens on its socket this fails and says why.
            state = result.stdout.strip() or result.stderr.strip()
            if state == "running":
                return

            if state == "degraded":
                failed = self.systemctl("--failed", "--plain", "--no-legend")
                self.failed_units = [
                    line.split()[0] for line in failed.stdout.splitlines() if line
                ]
                logger.warning(
                    "sandbox %s booted degraded, failed units: %s",
                    self.name,
                    " ".join(self.failed_units),
                )
                return

            if state in ("maintenance", "stopping"):
                break

            time.sleep(0.05)

        raise SandboxError(
            f"sandbox {self.name} did not reach running (last state: {state!r}); "
            f"console: {self._console()[-2000:]}"
        )


def _die_with_parent() -> None:
    # The signal fires when the thread that started the sandbox exits; unshare
    # then kills the sandbox's PID 1, which ends every process inside.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _wait_for_systemd(launcher: subprocess.Popen[bytes], deadline: float) -> int:
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            raise SandboxError(f"sandbox setup failed: {_output(launcher)}")

        for pid in _children(launcher.pid):
            try:
                comm = pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue

            if comm == "systemd":
                return pid

        time.sleep(0.01)

    raise SandboxError("sandbox setup did not exec systemd in time")


def _children(parent: int) -> list[int]:
    children = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue

        try:
            stat = pathlib.Path(entry.path, "stat").read_text()
        except OSError:
            continue

        # The command name may hold spaces and parentheses; fields follow it.
        if int(stat.rpartition(")")[2].split()[1]) == parent:
            children.append(int(entry.name))

    return children


def _output(launcher: subprocess.Popen[bytes]) -> str:
    assert launcher.stdout is not None
    if launcher.poll() is None:
        return ""

    return launcher.stdout.read().decode(errors="replace").strip()


def _stop_launcher(launcher: subprocess.Popen[bytes]) -> None:
    if launcher.poll() is None:
        # unshare was started with --kill-child: its PID 1 goes with it, and
        # with PID 1 every process of the PID namespace.
        launcher.kill()

    launcher.wait()
    if launcher.stdout is not None:
        launcher.stdout.close()


def _remove_cgroup(cgroup: pathlib.Path, timeout: float = 10) -> None:
    started = time.monotonic()
    while True:
        try:
            _rmdir_tree(cgroup)
            return
        except OSError as e:
            waited = time.monotonic() - started
            if e.errno != errno.EBUSY or waited > timeout:
                logger.warning("cannot remove cgroup %s: %s", cgroup, e)
                return

        # Processes may take a moment to leave once PID 1 is gone; any still
        # here after that belongs to this sandbox and nothing else.
        if waited > 1:
            _kill_cgroup_members(cgroup)

        time.sleep(0.05)


def _rmdir_tree(cgroup: pathlib.Path) -> None:
    # Bottom-up: a cgroup with children cannot be removed.
    for directory, _, _ in os.walk(cgroup, topdown=False):
        os.rmdir(directory)


def _kill_cgroup_members(cgroup: pathlib.Path) -> None:
    for procs in cgroup.rglob("cgroup.procs"):
        try:
            pids = procs.read_text().split()
        except OSError:
            continue

        for pid in pids:
            logger.warning("killing leftover pid %s in %s", pid, procs.parent)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sandbox.py",
        description="Boot a throwaway systemd in namespaces of its own (as root).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    boot = commands.add_parser(
        "boot",
        help="boot, print the host pid of PID 1, power off on SIGINT or SIGTERM",
        description="Boot a sandbox and print the host pid of its PID 1. Enter it "
        "with `nsenter -t PID -a`. Runs until SIGINT or SIGTERM, then powers off.",
    )
    boot.add_argument("--name", help="sandbox and cgroup name (default: random)")
    boot.add_argument(
        "--share",
        action="append",
        default=[],
        metavar="DIR",
        help="a host directory to see read-only at the same path inside (repeatable)",
    )
    boot.add_argument("--timeout", type=float, default=60, help="seconds to boot")
    boot.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(message)s",
    )
    stop = {signal.SIGINT, signal.SIGTERM}
    # SIGTERM while booting interrupts like SIGINT does, so boot cleans up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        sandbox = Sandbox.boot(args.name, timeout=args.timeout, share=args.share)
    except SandboxError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

    with sandbox:
        print(sandbox.pid, flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signal.sigwait(stop)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop)

    return 0


if __name__ == "__main__":
    sys.exit(main())
