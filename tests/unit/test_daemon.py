"""The daemon's command line: what it refuses before it connects to anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ares_deployd import daemon


def write_config(tmp_path: Path, secret: str | None) -> Path:
    secret_file = tmp_path / "admin-secret"
    if secret is not None:
        secret_file.write_text(secret)
    path = tmp_path / "config.toml"
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:1"\nadmin_secret_file = "{secret_file}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
    )
    return path


@pytest.mark.parametrize("secret", [None, "", "  \n"])
def test_main_without_a_secret_refuses_to_start(
    tmp_path: Path,
    secret: str | None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = write_config(tmp_path, secret)

    status = daemon.main(["--config", str(path)])

    assert status == 1
    assert "not starting: " in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


def test_main_with_a_broken_config_names_each_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[server]\nlisten = "nowhere"\nhistory = 0\n')

    status = daemon.main(["--config", str(path)])

    err = capsys.readouterr().err
    assert status == 1
    assert f'{path}: server.listen: "nowhere" is not host:port' in err
    assert f"{path}: server.history: 0 is not a positive number" in err
    assert "not starting: the configuration has problems" in err


def test_check_config_prints_ok_and_warns_of_unreachable_urls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, "s3cret")
    with path.open("a") as config:
        config.write('[[notify]]\nurl = "https://chat.example.org/hook"\n')

    status = daemon.main(["--check-config", "--config", str(path)])

    out, err = capsys.readouterr()
    assert (status, out) == (0, "ok\n")
    assert "warning: notify[0].url: https://chat.example.org/hook" in err


def test_python_m_runs_the_daemon_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ares_deployd", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 0
    assert result.stdout.startswith("usage: ares-deployd")
    assert "--check-config" in result.stdout
