"""The pure parts of a deployment: the build unit's commands, refs, log markers."""

from __future__ import annotations

from pathlib import Path

import pytest
from dbus_next import Variant

from ares_deployd import buildlog
from ares_deployd.config import Target
from ares_deployd.errors import DeploydError
from ares_deployd.runner import Runner, build_commands, build_properties, check_ref
from ares_deployd.store import Deployment


def target(tmp_path: Path, **changes: object) -> Target:
    values: dict[str, object] = {
        "name": "app",
        "description": "",
        "working_directory": tmp_path,
        "user": "app",
        "group": None,
        "steps": ("make", "make install"),
        "environment": {"A": "1"},
        "timeout": None,
        "restart": None,
        "health_url": None,
        "health_timeout": 30,
        "revision": None,
        "cpu_weight": 20,
        "rollback_on_failure": False,
    }
    values.update(changes)
    return Target(**values)  # type: ignore[arg-type]


def test_build_commands_run_each_step_in_order(tmp_path: Path) -> None:
    commands = build_commands(target(tmp_path))

    assert [command[1][-1] for command in commands] == ["make", "make install"]
    assert [command[1][4:6] for command in commands] == [["1", "2"], ["2", "2"]]
    assert all(command[2] == ["no-env-expand"] for command in commands)


def test_build_commands_mark_revisions_in_a_git_checkout(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()

    commands = build_commands(target(tmp_path))

    assert commands[0][1][-3:] == ["before", "git rev-parse HEAD", "say"]
    assert commands[-1][1][-3:] == ["after", "git rev-parse HEAD", "say"]
    assert len(commands) == 4


def test_build_commands_mark_no_revision_outside_a_git_checkout(
    tmp_path: Path,
) -> None:
    assert len(build_commands(target(tmp_path))) == 2


def test_build_commands_try_git_quietly_where_the_daemon_cannot_look(
    tmp_path: Path,
) -> None:
    # As under ProtectHome=tmpfs: the working directory is not there at all.
    commands = build_commands(target(tmp_path / "home" / "app"))

    assert commands[0][1][-3:] == ["before", "git rev-parse HEAD", "quiet"]
    assert len(commands) == 4


def test_build_commands_use_the_configured_revision_command(tmp_path: Path) -> None:
    commands = build_commands(target(tmp_path, revision="cat REVISION"))

    assert commands[0][1][-2:] == ["cat REVISION", "say"]


def test_build_properties_pass_the_ref_only_in_the_environment(tmp_path: Path) -> None:
    ref = "$(reboot)"

    properties = dict(build_properties(target(tmp_path), "id-1", tmp_path, ref))

    environment = properties["Environment"].value
    assert f"DEPLOY_REF={ref}" in environment
    assert {"A=1", "DEPLOY_ID=id-1", "DEPLOY_TARGET=app"} <= set(environment)
    commands = repr(properties["ExecStartEx"].value)
    assert ref not in commands


def test_build_properties_protect_the_kernel_only_from_root_builds(
    tmp_path: Path,
) -> None:
    kernel = {"ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups"}

    as_app = dict(build_properties(target(tmp_path), "id", tmp_path))
    as_root = dict(build_properties(target(tmp_path, user="root"), "id", tmp_path))

    assert not kernel & set(as_app)
    assert all(as_root[name].value is True for name in kernel)
    for properties in (as_app, as_root):
        assert properties["NoNewPrivileges"].value is True
        assert properties["PrivateTmp"].value is True


def test_build_properties_bound_a_timeout_as_a_start_timeout(tmp_path: Path) -> None:
    properties = dict(build_properties(target(tmp_path, timeout=90), "id", tmp_path))

    assert properties["TimeoutStartUSec"].value == 90_000_000
    assert properties["StandardOutputFileToAppend"].value == str(
        tmp_path / "logs" / "id.log"
    )
    assert properties["KillMode"].value == "control-group"


def test_build_properties_weigh_the_build_below_services(tmp_path: Path) -> None:
    default = dict(build_properties(target(tmp_path), "id", tmp_path))
    heavier = dict(build_properties(target(tmp_path, cpu_weight=300), "id", tmp_path))

    assert default["CPUWeight"] == Variant("t", 20)
    assert heavier["CPUWeight"].value == 300


@pytest.mark.parametrize("ref", ["main", "v1.2.3", "origin/feature-x", "a" * 200])
def test_check_ref_accepts_printable_refs(ref: str) -> None:
    check_ref(ref)


@pytest.mark.parametrize("ref", ["", "a b", "a\tb", "a\nb", "a\x00b", "a" * 201])
def test_check_ref_refuses_whitespace_control_and_length(ref: str) -> None:
    with pytest.raises(DeploydError) as caught:
        check_ref(ref)

    assert (caught.value.status, caught.value.code) == (400, "bad_ref")


def test_revisions_read_from_the_markers(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text(
        "==> Deploying\n==> Revision before: aaa\n"
        + "noise\n" * 50000
        + "==> Revision after: bbb\n==> Deployment succeeded\n"
    )

    assert buildlog.revisions(log) == ("aaa", "bbb")


def test_revisions_unknown_are_none(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("==> Revision before: unknown\n")

    assert buildlog.revisions(log) == (None, None)
    assert buildlog.revisions(tmp_path / "missing.log") == (None, None)


def test_last_step_is_the_last_marker(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("==> Step 1/3: a\nout\n==> Step 2/3: b\n  ==> Step 9/9: fake\n")

    assert buildlog.last_step(log) == 2


def test_tail_cuts_at_a_line_and_says_so(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {n}\n" for n in range(1000)))

    text = buildlog.tail(log, "id", limit=100)

    note, rest = text.split("\n", 1)
    assert note.startswith("[output cut: the last ")
    assert "GET /api/admin/deploy/id/log" in note
    assert rest.startswith("line ") and rest.endswith("line 999\n")
    assert len(rest) <= 100


def test_listeners_after_a_failing_one_are_still_told(
    caplog: pytest.LogCaptureFixture,
) -> None:
    deployment = Deployment(
        1, "id", "app", "success", "unit", 0.0, 1.0, "done",
        *(None,) * 3, 0, *(None,) * 5,
    )  # fmt: skip
    told: list[str] = []

    def broken(ended: Deployment) -> None:
        raise OSError("No space left on device")

    Runner._tell([broken, lambda ended: told.append(ended.id)], deployment)

    assert told == ["id"]
    assert "deployment id:" in caplog.text and "No space left" in caplog.text
