"""The configuration file: loading, every kind of mistake, and the secret."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ares_deployd import config
from ares_deployd.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "etc" / "ares-deployd" / "config.toml"

GOOD_TARGET = """
[targets.app]
working_directory = "/srv/app"
user = "app"
steps = ["make"]
"""


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config.load(str(path))
    prefix = f"{path}: "
    assert all(line.startswith(prefix) for line in caught.value.problems)
    return [line.removeprefix(prefix) for line in caught.value.problems]


def test_example_config_loads() -> None:
    loaded = config.load(str(EXAMPLE))

    assert set(loaded.targets) == {"ares", "admin", "eruka"}
    assert set(loaded.services) == {"ares", "eruka", "admin"}
    assert loaded.targets["ares"].timeout == 30 * 60
    assert loaded.targets["ares"].steps[1] == "cargo build --release"
    assert "DEPLOY_REF" in loaded.targets["ares"].steps[0]
    assert loaded.targets["ares"].rollback_on_failure is True
    assert loaded.services["ares"].port == 3000
    assert str(loaded.server.listen) == "127.0.0.1:3001"


def test_empty_config_uses_defaults(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    path = tmp_path / "config.toml"
    path.write_text("")

    loaded = config.load(str(path))

    assert loaded.targets == {}
    assert str(loaded.server.listen) == "127.0.0.1:3001"
    assert loaded.server.state_dir == Path("/var/lib/ares-deployd")
    assert loaded.server.history == 1000


def test_state_dir_defaults_to_state_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/elsewhere")
    path = tmp_path / "config.toml"
    path.write_text("")

    assert config.load(str(path)).server.state_dir == Path("/var/lib/elsewhere")


def test_listen_ipv6_parses(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[server]\nlisten = "[::1]:3001"\n')

    listen = config.load(str(path)).server.listen

    assert (listen.host, listen.port, str(listen)) == ("::1", 3001, "[::1]:3001")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GOOD_TARGET + 'timeout = "30 minutes"\n',
            'targets.app.timeout: "30 minutes" is not a duration (try "30m")',
        ),
        (
            GOOD_TARGET + 'timeout = "1 hour"\n',
            'targets.app.timeout: "1 hour" is not a duration (try "1h")',
        ),
        (
            GOOD_TARGET + "timeout = 30\n",
            'targets.app.timeout: expected a duration string such as "30m", '
            "got an integer 30",
        ),
        (
            GOOD_TARGET + 'stpes = ["make"]\n',
            'targets.app.stpes: unknown key (did you mean "steps"?)',
        ),
        (
            '[server]\nhistory = "1000"\n',
            'server.history: expected an integer, got a string "1000"',
        ),
        (
            '[server]\nlisten = "localhost"\n',
            'server.listen: "localhost" is not host:port '
            '(try "127.0.0.1:3001" or "[::1]:3001")',
        ),
        (
            '[server]\nlisten = "127.0.0.1:99999"\n',
            'server.listen: "127.0.0.1:99999" is not host:port '
            '(try "127.0.0.1:3001" or "[::1]:3001")',
        ),
        (
            '[server]\nstate_dir = "var/lib/ares"\n',
            'server.state_dir: "var/lib/ares" is not an absolute path '
            '(try "/var/lib/ares")',
        ),
        (
            GOOD_TARGET.replace('"/srv/app"', '"srv/app"'),
            'targets.app.working_directory: "srv/app" is not an absolute path '
            '(try "/srv/app")',
        ),
        (
            GOOD_TARGET + 'restart = "app"\n',
            'targets.app.restart: "app" has no unit type suffix (try "app.service")',
        ),
        (
            '[services.app]\nunit = "app"\n',
            'services.app.unit: "app" has no unit type suffix (try "app.service")',
        ),
        (
            GOOD_TARGET.replace('steps = ["make"]', "steps = []"),
            "targets.app.steps: must list at least one command",
        ),
        (
            GOOD_TARGET.replace('steps = ["make"]\n', ""),
            "targets.app.steps: missing (Shell commands, each run with /bin/sh -c, "
            "in order; the first that fails ends the deployment.)",
        ),
        (
            GOOD_TARGET + 'health_url = "127.0.0.1:3000/health"\n',
            'targets.app.health_url: "127.0.0.1:3000/health" is not an http:// '
            "or https:// URL",
        ),
        (
            GOOD_TARGET + "cpu_weight = 0\n",
            "targets.app.cpu_weight: 0 is not a CPU weight (1 to 10000, systemd's "
            "is 100)",
        ),
        (
            '[services.app]\nunit = "app.service"\nport = 70000\n',
            "services.app.port: 70000 is not a TCP port (1 to 65535)",
        ),
        (
            GOOD_TARGET + "environment = { RUST_LOG = 1 }\n",
            "targets.app.environment: RUST_LOG: expected a string, got an integer",
        ),
        (
            '[deploy]\ntarget = "x"\n',
            "deploy: unknown table (known: server, targets, services, notify)",
        ),
        (
            GOOD_TARGET.replace("[targets.app]", '[targets."../app"]'),
            "targets.../app: a name may hold letters, digits, '-' and '_' "
            "(at most 64, starting with a letter or digit)",
        ),
        (
            "[server\nlisten = 1\n",
            "not valid TOML: Expected ']' at the end of a table declaration "
            "(at line 1, column 8)",
        ),
    ],
)
def test_broken_config_names_the_problem(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert problems(tmp_path, text) == [expected]


def test_broken_config_reports_every_problem_at_once(tmp_path: Path) -> None:
    text = """
[server]
listen = "nowhere"
history = 0

[targets.app]
working_directory = "app"
steps = []
timeout = "soon"
"""
    assert problems(tmp_path, text) == [
        'server.listen: "nowhere" is not host:port '
        '(try "127.0.0.1:3001" or "[::1]:3001")',
        "server.history: 0 is not a positive number",
        'targets.app.working_directory: "app" is not an absolute path (try "/app")',
        "targets.app.user: missing (User the steps run as; builds run as root only "
        'if this says "root".)',
        "targets.app.steps: must list at least one command",
        'targets.app.timeout: "soon" is not a duration (try "30s")',
    ]


def test_unreachable_names_urls_off_loopback(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        GOOD_TARGET
        + 'health_url = "http://[::1]:3000/health"\n'
        + '[services.web]\nunit = "web.service"\n'
        + 'health_url = "http://192.0.2.10/health"\n'
        + '[[notify]]\nurl = "http://localhost:9000/hook"\n'
        + '[[notify]]\nurl = "https://chat.example.org/hook"\n'
    )

    warnings = config.unreachable(config.load(str(path)))

    assert [warning.split(" is not")[0] for warning in warnings] == [
        "services.web.health_url: http://192.0.2.10/health",
        "notify[1].url: https://chat.example.org/hook",
    ]
    assert "IPAddressAllow=" in warnings[0]


def test_missing_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"

    with pytest.raises(ConfigError) as caught:
        config.load(str(path))

    assert caught.value.problems == [f"{path}: cannot read: No such file or directory"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("1h", 3600), ("1h30m", 5400), ("2h5m10s", 7510)],
)
def test_duration_parses(text: str, seconds: int) -> None:
    assert config.duration(text) == seconds
    assert config.duration(config.format_duration(seconds)) == seconds


def test_resolve_path_prefers_flag_then_environment(monkeypatch) -> None:
    monkeypatch.setenv(config.CONFIG_ENV, "/from/env.toml")
    assert config.resolve_path("/from/flag.toml") == "/from/flag.toml"
    assert config.resolve_path(None) == "/from/env.toml"
    monkeypatch.delenv(config.CONFIG_ENV)
    assert config.resolve_path(None) == config.DEFAULT_PATH


def _with_secret_file(tmp_path: Path, content: str | None) -> config.Config:
    secret = tmp_path / "admin-secret"
    if content is not None:
        secret.write_text(content)
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\nadmin_secret_file = "{secret}"\n')
    return config.load(str(path))


def test_secret_is_read_and_stripped(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert config.load_secret(_with_secret_file(tmp_path, "hunter2\n")) == "hunter2"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no admin secret file; create one (mode 0600)"),
        ("  \n", "the admin secret is empty"),
    ],
)
def test_secret_missing_or_empty_is_refused(
    tmp_path: Path, monkeypatch, content: str | None, message: str
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    loaded = _with_secret_file(tmp_path, content)

    with pytest.raises(config.DeploydError) as caught:
        config.load_secret(loaded)

    assert caught.value.code == "no_secret"
    assert caught.value.message == f"{tmp_path / 'admin-secret'}: {message}"


def test_secret_unreadable_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    loaded = _with_secret_file(tmp_path, None)
    (tmp_path / "admin-secret").mkdir()

    with pytest.raises(config.DeploydError) as caught:
        config.load_secret(loaded)

    assert caught.value.message == (
        f"{tmp_path / 'admin-secret'}: cannot read the admin secret: Is a directory"
    )


def test_secret_credential_wins(tmp_path: Path, monkeypatch) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "admin-secret").write_text("from-credential")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))

    loaded = _with_secret_file(tmp_path, "from-file")

    assert config.load_secret(loaded) == "from-credential"


def test_readme_reference_matches_the_options() -> None:
    readme = (ROOT / "README.md").read_text()

    assert config.reference_markdown() in readme


def test_example_config_uses_only_documented_keys() -> None:
    text = EXAMPLE.read_text()
    keys = set(re.findall(r"^([a-z_]+) = ", text, flags=re.MULTILINE))
    documented = {
        option.key for options in config.TABLES.values() for option in options
    }

    assert keys <= documented
