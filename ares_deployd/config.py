"""The configuration file: its keys, how each is checked, and the loaded result.

One table of :class:`Option` per TOML table describes every key, its type, its
default and its meaning. Loading, validation and the reference in the README all
read from these tables, so the three cannot drift apart.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ares_deployd.errors import DeploydError

try:
    import tomllib
except ModuleNotFoundError:  # Python before 3.11
    import tomli as tomllib  # type: ignore[no-redef]

DEFAULT_PATH = "/etc/ares-deployd/config.toml"
CONFIG_ENV = "ARES_DEPLOYD_CONFIG"
CREDENTIAL_NAME = "admin-secret"

REQUIRED: Any = object()
# The revision of a git checkout, where a target names no command of its own.
GIT_REVISION = "git rev-parse HEAD"


class Invalid(ValueError):
    """A value that does not fit its key; the message says what would."""


class ConfigError(DeploydError):
    """The configuration cannot be used; ``problems`` lists every reason, one a line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(
            500, "bad_config", "\n".join(problems), problems=list(problems)
        )
        self.problems = problems


@dataclass(frozen=True)
class Option:
    key: str
    parse: Callable[[Any], Any]
    default: Any
    doc: str
    example: str = ""
    # What the reference shows as the default, where the value alone would mislead.
    shown_default: str = ""


def _show(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return str(value)


def _type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "a table"})
    return names.get(type(value), type(value).__name__)


def _expect(value: Any, kind: type, what: str) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Invalid(f"expected {what}, got {_type_name(value)} {_show(value)}")


def text(value: Any) -> str:
    _expect(value, str, "a string")
    return value


def name(value: Any) -> str:
    _expect(value, str, "a string")
    if not value or any(c.isspace() or c in ":/" for c in value):
        raise Invalid(f"{_show(value)} is not a user or group name")
    return value


def positive_int(value: Any) -> int:
    _expect(value, int, "an integer")
    if value < 1:
        raise Invalid(f"{value} is not a positive number")
    return value


def cpu_weight(value: Any) -> int:
    _expect(value, int, "an integer")
    if not 1 <= value <= 10000:
        raise Invalid(f"{value} is not a CPU weight (1 to 10000, systemd's is 100)")
    return value


def port(value: Any) -> int:
    _expect(value, int, "an integer")
    if not 1 <= value <= 65535:
        raise Invalid(f"{value} is not a TCP port (1 to 65535)")
    return value


def absolute_path(value: Any) -> Path:
    _expect(value, str, "a string")
    if not value.startswith("/"):
        raise Invalid(
            f"{_show(value)} is not an absolute path (try {_show('/' + value)})"
        )
    return Path(value)


_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def duration(value: Any) -> int:
    """A duration such as ``"90s"``, ``"30m"`` or ``"1h30m"``, in seconds."""
    _expect(value, str, 'a duration string such as "30m"')
    match = _DURATION.fullmatch(value.strip())
    if not value.strip() or match is None:
        number = re.search(r"\d+", value)
        unit = re.search(r"[hms]", value.lower().replace("sec", "s"))
        hint = f"{number.group() if number else 30}{unit.group() if unit else 'm'}"
        raise Invalid(f"{_show(value)} is not a duration (try {_show(hint)})")
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total == 0:
        raise Invalid(f"{_show(value)} is not a positive duration")
    return total


def format_duration(seconds: float) -> str:
    """The short form that :func:`duration` reads, e.g. ``"1h30m"``."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{n}{u}" for n, u in ((hours, "h"), (minutes, "m"), (secs, "s")) if n]
    return "".join(parts) or "0s"


UNIT_SUFFIXES = (
    ".service",
    ".socket",
    ".target",
    ".timer",
    ".path",
    ".mount",
    ".slice",
    ".scope",
)
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.@\\-]+")


def unit_name(value: Any) -> str:
    _expect(value, str, "a string")
    if not _UNIT_NAME.fullmatch(value):
        raise Invalid(f"{_show(value)} is not a systemd unit name")
    if not value.endswith(UNIT_SUFFIXES):
        raise Invalid(
            f"{_show(value)} has no unit type suffix (try {_show(value + '.service')})"
        )
    return value


def url(value: Any) -> str:
    _expect(value, str, "a string")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid(f"{_show(value)} is not an http:// or https:// URL")
    return value


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def listen(value: Any) -> Listen:
    _expect(value, str, 'a string such as "127.0.0.1:3001"')
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", value)
    problem = Invalid(
        f'{_show(value)} is not host:port (try "127.0.0.1:3001" or "[::1]:3001")'
    )
    if match is None:
        raise problem
    host = match.group(1) or match.group(3)
    number = int(match.group(2) or match.group(4))
    if not 1 <= number <= 65535:
        raise problem
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise problem from None
    return Listen(host, number)


def commands(value: Any) -> tuple[str, ...]:
    _expect(value, list, "a list of shell commands")
    if not value:
        raise Invalid("must list at least one command")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise Invalid(f"{_show(item)} is not a shell command (expected a string)")
    return tuple(value)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def environment(value: Any) -> dict[str, str]:
    _expect(value, dict, 'a table such as { CARGO_TERM_COLOR = "never" }')
    for key, item in value.items():
        if not _ENV_NAME.fullmatch(key):
            raise Invalid(f"{_show(key)} is not an environment variable name")
        if not isinstance(item, str):
            raise Invalid(f"{key}: expected a string, got {_type_name(item)}")
    return dict(value)


def boolean(value: Any) -> bool:
    _expect(value, bool, "true or false")
    return value


def optional_listen(value: Any) -> Listen | None:
    return None if value == "" else listen(value)


def names(value: Any) -> tuple[str, ...]:
    _expect(value, list, "a list of names")
    for item in value:
        if not isinstance(item, str) or not _ENTRY_NAME.fullmatch(item):
            raise Invalid(f"{_show(item)} is not a name")
    return tuple(value)


EVENTS = ("started", "succeeded", "failed", "cancelled", "rolled_back")


def events(value: Any) -> tuple[str, ...]:
    _expect(value, list, "a list of event names")
    for item in value:
        if item not in EVENTS:
            raise Invalid(f"{_show(item)} is not an event (known: {', '.join(EVENTS)})")
    return tuple(value)


def notify_format(value: Any) -> str:
    if value not in ("json", "slack"):
        raise Invalid(f'{_show(value)} is not a format (try "json" or "slack")')
    return value


DEFAULT_MAX_STREAMS = 32

SERVER_OPTIONS = (
    Option(
        "listen",
        listen,
        Listen("127.0.0.1", 3001),
        'Address of the HTTP API, host:port ("[::1]:3001" for IPv6).',
        '"127.0.0.1:3001"',
    ),
    Option(
        "admin_secret_file",
        absolute_path,
        Path("/etc/ares-deployd/admin-secret"),
        "File holding the X-Admin-Secret value. A systemd credential named "
        "admin-secret ($CREDENTIALS_DIRECTORY/admin-secret) wins when present.",
        '"/etc/ares-deployd/admin-secret"',
    ),
    Option(
        "state_dir",
        absolute_path,
        None,
        "Where history and build logs live.",
        '"/var/lib/ares-deployd"',
        "`$STATE_DIRECTORY`, else `/var/lib/ares-deployd`",
    ),
    Option(
        "history",
        positive_int,
        1000,
        "Deployments kept; older ones and their logs are pruned.",
        "1000",
    ),
    Option(
        "max_streams",
        positive_int,
        DEFAULT_MAX_STREAMS,
        "Event streams open at once; each holds a thread while it lasts, and "
        "more are refused with 503 so that streams never starve the rest of "
        "the API.",
        "32",
    ),
    Option(
        "health_interval",
        duration,
        10,
        "How often the health URLs of services are checked.",
        '"10s"',
    ),
    Option(
        "metrics_listen",
        optional_listen,
        None,
        "Address of the Prometheus metrics listener, which needs no secret; keep "
        "it on loopback. Off when omitted.",
        '"127.0.0.1:9101"',
    ),
)

TARGET_OPTIONS = (
    Option("description", text, "", "A line that says what the target is.", '"ARES"'),
    Option(
        "working_directory",
        absolute_path,
        REQUIRED,
        "Directory the steps run in.",
        '"/opt/ares"',
    ),
    Option(
        "user",
        name,
        REQUIRED,
        'User the steps run as; builds run as root only if this says "root".',
        '"ares"',
    ),
    Option("group", name, None, "Group the steps run as.", '"ares"'),
    Option(
        "steps",
        commands,
        REQUIRED,
        "Shell commands, each run with /bin/sh -c, in order; the first that fails "
        "ends the deployment.",
        '["git pull --ff-only", "cargo build --release"]',
    ),
    Option(
        "environment",
        environment,
        {},
        "Extra environment variables for the steps.",
        '{ CARGO_TERM_COLOR = "never" }',
    ),
    Option(
        "timeout",
        duration,
        None,
        'Longest a build may run (s, m, h, e.g. "30m"); none when omitted.',
        '"30m"',
    ),
    Option(
        "restart",
        unit_name,
        None,
        "Unit restarted after the steps succeed.",
        '"ares.service"',
    ),
    Option(
        "health_url",
        url,
        None,
        "URL that must answer 2xx after the restart.",
        '"http://127.0.0.1:3000/health"',
    ),
    Option(
        "health_timeout",
        duration,
        30,
        "How long the health URL may take to answer 2xx after the restart.",
        '"30s"',
    ),
    Option(
        "revision",
        text,
        None,
        "Command that prints the deployed revision, run in working_directory as "
        "user before the first step and after the last.",
        '"git rev-parse HEAD"',
        "`git rev-parse HEAD` in a git checkout, else none",
    ),
    Option(
        "cpu_weight",
        cpu_weight,
        20,
        "The build's share of the CPU against other units when it is short "
        "(systemd's CPUWeight=, 100 for services): a build does not slow the "
        "services or the API.",
        "100",
    ),
    Option(
        "rollback_on_failure",
        boolean,
        False,
        "When the restart or the health check fails, deploy the last revision "
        "that succeeded.",
        "true",
    ),
)

SERVICE_OPTIONS = (
    Option("unit", unit_name, REQUIRED, "The systemd unit.", '"ares.service"'),
    Option(
        "port",
        port,
        None,
        "TCP port it serves on; found from the unit's processes when omitted.",
        "3000",
    ),
    Option(
        "health_url",
        url,
        None,
        "URL checked in the background; failing means degraded.",
        '"http://127.0.0.1:3000/health"',
    ),
)

NOTIFY_OPTIONS = (
    Option("url", url, REQUIRED, "Where each event is POSTed.", '"https://..."'),
    Option(
        "events",
        events,
        EVENTS,
        "Events to send: " + ", ".join(EVENTS) + ".",
        '["failed", "rolled_back"]',
        "all",
    ),
    Option("targets", names, None, "Targets whose events to send.", '["ares"]', "all"),
    Option(
        "secret_file",
        absolute_path,
        None,
        "File holding the key that signs each body (X-Ares-Signature); unsigned "
        "when omitted.",
        '"/etc/ares-deployd/webhook-secret"',
    ),
    Option(
        "format",
        notify_format,
        "json",
        'The body: "json" (the deployment and the event) or "slack" ({"text": ...}).',
        '"slack"',
    ),
    Option(
        "retry_for",
        duration,
        600,
        "How long to retry a delivery that fails before it is dropped.",
        '"10m"',
    ),
)

TABLES: dict[str, tuple[Option, ...]] = {
    "server": SERVER_OPTIONS,
    "targets.<name>": TARGET_OPTIONS,
    "services.<name>": SERVICE_OPTIONS,
    "[notify]": NOTIFY_OPTIONS,
}


@dataclass(frozen=True)
class ServerConfig:
    listen: Listen
    admin_secret_file: Path
    state_dir: Path
    history: int
    max_streams: int
    health_interval: int
    metrics_listen: Listen | None


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    working_directory: Path
    user: str
    group: str | None
    steps: tuple[str, ...]
    environment: dict[str, str]
    timeout: int | None
    restart: str | None
    health_url: str | None
    health_timeout: int
    revision: str | None
    cpu_weight: int
    rollback_on_failure: bool

    def revision_command(self) -> tuple[str, bool] | None:
        """The command that prints the revision, and whether a build in which it
        prints nothing should say so; None when no revision is to be had."""
        if self.revision is not None:
            return (self.revision, True) if self.revision else None
        try:
            if (self.working_directory / ".git").exists():
                return GIT_REVISION, True
            if self.working_directory.is_dir():
                return None
        except OSError:
            pass
        # Hidden from the daemon (ProtectHome=, or a directory only the target's
        # user may enter): the build, which sees it, tries git, quiet without it.
        return GIT_REVISION, False


@dataclass(frozen=True)
class Service:
    name: str
    unit: str
    port: int | None
    health_url: str | None


@dataclass(frozen=True)
class Notify:
    url: str
    events: tuple[str, ...]
    targets: tuple[str, ...] | None
    secret_file: Path | None
    format: str
    retry_for: int

    def wants(self, event: str, target: str) -> bool:
        return event in self.events and (self.targets is None or target in self.targets)


@dataclass(frozen=True)
class Config:
    path: str
    server: ServerConfig
    targets: dict[str, Target] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    notify: tuple[Notify, ...] = ()


_ENTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def _unknown(where: str, key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f'did you mean "{close[0]}"?' if close else "known: " + ", ".join(known)
    return f"{where}: unknown key ({hint})"


def _read_table(
    where: str,
    raw: Any,
    options: tuple[Option, ...],
    problems: list[str],
) -> dict[str, Any] | None:
    """Check one TOML table against its options; add each problem to ``problems``."""
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a table, got {_type_name(raw)}")
        return None
    known = [option.key for option in options]
    for key in raw:
        if key not in known:
            problems.append(_unknown(f"{where}.{key}", key, known))

    values: dict[str, Any] = {}
    complete = True
    for option in options:
        if option.key not in raw:
            if option.default is REQUIRED:
                problems.append(f"{where}.{option.key}: missing ({option.doc})")
                complete = False
            values[option.key] = option.default
            continue
        try:
            values[option.key] = option.parse(raw[option.key])
        except Invalid as problem:
            problems.append(f"{where}.{option.key}: {problem}")
            complete = False
    return values if complete else None


def _read_entries(
    prefix: str,
    raw: Any,
    options: tuple[Option, ...],
    problems: list[str],
) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict):
        problems.append(f"{prefix}: expected a table of tables, got {_type_name(raw)}")
        return {}
    entries = {}
    for entry, table in raw.items():
        where = f"{prefix}.{entry}"
        if not _ENTRY_NAME.fullmatch(entry):
            problems.append(
                f"{where}: a name may hold letters, digits, '-' and '_' "
                "(at most 64, starting with a letter or digit)"
            )
            continue
        values = _read_table(where, table, options, problems)
        if values is not None:
            entries[entry] = values
    return entries


def _read_list(
    prefix: str,
    raw: Any,
    options: tuple[Option, ...],
    problems: list[str],
) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        problems.append(
            f"{prefix}: expected a list of tables ([[{prefix}]]), got {_type_name(raw)}"
        )
        return []
    tables = [_read_table(f"{prefix}[{n}]", item, options, problems) for n, item in
              enumerate(raw)]  # fmt: skip
    return [table for table in tables if table is not None]


def parse(document: dict[str, Any], path: str) -> Config:
    """Check a parsed TOML document and build the :class:`Config`.

    Raises:
        ConfigError: listing every problem, each as ``path: table.key: reason``.
    """
    problems: list[str] = []
    for table in document:
        if table not in ("server", "targets", "services", "notify"):
            problems.append(
                f"{table}: unknown table (known: server, targets, services, notify)"
            )

    server = _read_table("server", document.get("server", {}), SERVER_OPTIONS, problems)
    targets = _read_entries(
        "targets", document.get("targets", {}), TARGET_OPTIONS, problems
    )
    services = _read_entries(
        "services", document.get("services", {}), SERVICE_OPTIONS, problems
    )
    notify = _read_list("notify", document.get("notify", []), NOTIFY_OPTIONS, problems)
    for index, hook in enumerate(notify):
        for unknown in sorted(set(hook["targets"] or ()) - set(targets)):
            problems.append(f'notify[{index}].targets: no target named "{unknown}"')
    if problems or server is None:
        raise ConfigError([f"{path}: {problem}" for problem in problems])

    if server["state_dir"] is None:
        state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        server["state_dir"] = Path(state or "/var/lib/ares-deployd")
    return Config(
        path=path,
        server=ServerConfig(**server),
        targets={key: Target(name=key, **value) for key, value in targets.items()},
        services={key: Service(name=key, **value) for key, value in services.items()},
        notify=tuple(Notify(**hook) for hook in notify),
    )


def resolve_path(explicit: str | None) -> str:
    """The file to read: ``--config``, else ``$ARES_DEPLOYD_CONFIG``, else default."""
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_PATH


def load(path: str) -> Config:
    """Read and check the configuration file at ``path``.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or has bad values.
    """
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror}"]) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"{path}: not valid TOML: {error}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not valid TOML: not UTF-8 text"]) from None
    return parse(document, path)


def load_secret(config: Config) -> str:
    """The admin secret, from the systemd credential or ``admin_secret_file``.

    Raises:
        DeploydError: ``no_secret`` when there is none, it is empty or unreadable.
    """
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    path = config.server.admin_secret_file
    # os.path.exists: a credential this process may not see counts as absent.
    if credentials and os.path.exists(Path(credentials) / CREDENTIAL_NAME):
        path = Path(credentials) / CREDENTIAL_NAME
    return read_secret_file(
        path, missing="no admin secret file; create one (mode 0600)"
    )


def read_secret_file(path: Path, missing: str | None = None) -> str:
    """The secret a file holds, without surrounding whitespace.

    Raises:
        DeploydError: ``no_secret`` when the file is unreadable or empty; for a
            file that does not exist, ``missing`` says what to do when given.
    """
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError as error:
        if missing is None:
            raise _unreadable(path, error) from None
        raise DeploydError(500, "no_secret", f"{path}: {missing}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise _unreadable(path, error) from None
    if not secret:
        raise DeploydError(500, "no_secret", f"{path}: the admin secret is empty")
    return secret


def _unreadable(path: Path, error: Exception) -> DeploydError:
    reason = getattr(error, "strerror", None) or "not UTF-8 text"
    return DeploydError(
        500, "no_secret", f"{path}: cannot read the admin secret: {reason}"
    )


def _on_loopback(address: str) -> bool:
    host = urlsplit(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def unreachable(config: Config) -> list[str]:
    """The URLs the packaged unit cannot reach: it lets the daemon talk to
    loopback only, and anything else needs IPAddressAllow= in a drop-in."""
    urls = [
        (f"targets.{name}.health_url", target.health_url)
        for name, target in config.targets.items()
    ]
    urls += [
        (f"services.{name}.health_url", service.health_url)
        for name, service in config.services.items()
    ]
    urls += [(f"notify[{n}].url", hook.url) for n, hook in enumerate(config.notify)]
    return [
        f"{where}: {url} is not on loopback, which is all ares-deployd.service "
        "may reach; allow its address with IPAddressAllow= in a drop-in "
        "(systemctl edit ares-deployd)"
        for where, url in urls
        if url is not None and not _on_loopback(url)
    ]


def reference_markdown() -> str:
    """The configuration reference as Markdown tables, one per TOML table."""
    lines = []
    for table, options in TABLES.items():
        lines += [f"`[{table}]`", "", "| key | example | default | meaning |"]
        lines.append("|---|---|---|---|")
        for option in options:
            if option.shown_default:
                default = option.shown_default
            elif option.default is REQUIRED:
                default = "required"
            elif option.default in (None, {}, ""):
                default = "none"
            elif isinstance(option.default, (Path, Listen)):
                default = f'`"{option.default}"`'
            elif option.parse is duration:
                default = f'`"{format_duration(option.default)}"`'
            else:
                default = f"`{_show(option.default)}`"
            lines.append(
                f"| `{option.key}` | `{option.example}` | {default} | {option.doc} |"
            )
        lines.append("")
    return "\n".join(lines)
