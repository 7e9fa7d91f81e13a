"""Deployments against a real systemd: trigger, poll, list, cancel, restart, recover."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.deployd import ROOT, STATE, Deployd, free_port
from tests.integration.conftest import WORK

pytestmark = pytest.mark.integration

WEB_PORT = free_port()
SICK_PORT = free_port()
API_DOC = ROOT.parent / "shared" / "seed" / "deployment-api.md"
# CI always has shared/ beside the checkout; a developer's clone may not.
needs_api_doc = pytest.mark.skipif(
    not API_DOC.exists() and os.environ.get("CI") != "true",
    reason="the API document is not beside the checkout",
)

TARGETS = f"""
[targets.multi]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo first; echo to-stderr >&2", "echo second", "echo third"]

[targets.failing]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo before", "echo dying; exit 7", "touch {WORK}/never-ran"]

[targets.slow]
working_directory = "{WORK}"
user = "root"
timeout = "2s"
steps = ["echo starting", "sleep 300 & sleep 300; echo never"]

[targets.long]
working_directory = "{WORK}"
user = "root"
steps = ["for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo tick $i; sleep 0.25; done"]

[targets.endless]
working_directory = "{WORK}"
user = "root"
steps = ["echo running; sleep 300"]

[targets.web]
working_directory = "{WORK}"
user = "root"
steps = ["echo building web"]
restart = "web.service"
health_url = "http://127.0.0.1:{WEB_PORT}/health"

[targets.sick]
working_directory = "{WORK}"
user = "root"
steps = ["echo building sick"]
restart = "sick.service"
health_url = "http://127.0.0.1:{SICK_PORT}/health"
health_timeout = "2s"

[targets.nounit]
working_directory = "{WORK}"
user = "root"
steps = ["true"]
restart = "does-not-exist.service"

# Prints a byte that is not UTF-8.
[targets.binary]
working_directory = "{WORK}"
user = "nobody"
steps = ["echo first", "printf 'caf\\\\351\\\\n'"]

[targets.nouser]
working_directory = "{WORK}"
user = "no-such-user"
steps = ["true"]

[targets.noisy]
working_directory = "{WORK}"
user = "root"
steps = ["head -c 1300000 /dev/zero | tr '\\\\0' 'x' | fold -w 99"]
"""

SERVICE = """\
[Service]
ExecStart=/usr/bin/python3 {root}/examples/demo/server.py {port} {name}
Environment=UNHEALTHY_FILE=/run/{name}-unhealthy
"""


@pytest.fixture(scope="module")
def daemon(deployd: Deployd) -> Deployd:
    sandbox = deployd.sandbox
    for name, port in (("web", WEB_PORT), ("sick", SICK_PORT)):
        sandbox.write(
            f"/etc/systemd/system/{name}.service",
            SERVICE.format(root=ROOT, port=port, name=name),
        )
    sandbox.write("/run/sick-unhealthy", "")
    sandbox.systemctl("daemon-reload")
    sandbox.systemctl("start", "web.service", "sick.service")
    deployd.configure(TARGETS)
    deployd.restart()
    return deployd


def test_deploy_multi_step_succeeds_with_output_in_order(daemon: Deployd) -> None:
    answer = daemon.post("/api/admin/deploy", json={"target": "multi"})

    assert answer.status_code == 202
    started = answer.json()
    assert started["status"] == "running"
    assert started["message"] == "Deployment started for multi"
    done = daemon.wait(started["id"])
    assert done["status"] == "success"
    assert done["finished_at"] is not None
    for stamp in (done["started_at"], done["finished_at"]):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)
    lines = done["output"].splitlines()
    expected = ["first", "to-stderr", "second", "third", "==> Deployment succeeded"]
    assert [line for line in lines if line in expected] == expected
    assert lines.index("==> Step 2/3: echo second") < lines.index("second")


def test_deploy_failing_step_stops_the_rest(daemon: Deployd) -> None:
    done = daemon.wait(daemon.deploy("failing"))

    assert done["status"] == "failed"
    assert done["exit_status"] == 7
    assert done["failed_step"] == 2
    assert done["reason"] == "step 2 `echo dying; exit 7` exited with status 7"
    assert "dying" in done["output"]
    assert not daemon.sandbox.path(f"{WORK}/never-ran").exists()


def test_deploy_timeout_fails_and_leaves_no_process(daemon: Deployd) -> None:
    done = daemon.wait(daemon.deploy("slow"))

    assert done["status"] == "failed"
    assert done["reason"] == "timed out after 2s"
    assert daemon.processes_of(done["unit"]) == []
    leftover = daemon.sandbox.run("pgrep", "-f", "sleep 300", check=False)
    assert leftover.stdout == ""


def test_deploy_cancel_ends_cancelled_and_leaves_no_process(daemon: Deployd) -> None:
    deployment_id = daemon.deploy("endless")
    time.sleep(0.5)
    unit = daemon.get(f"/api/admin/deploy/{deployment_id}").json()["unit"]
    weight = daemon.sandbox.systemctl("show", "-P", "CPUWeight", unit).stdout

    answer = daemon.post(f"/api/admin/deploy/{deployment_id}/cancel")
    done = daemon.wait(deployment_id)

    assert weight.strip() == "20"
    assert answer.status_code == 200
    assert done["status"] == "cancelled"
    assert daemon.processes_of(done["unit"]) == []
    again = daemon.post(f"/api/admin/deploy/{deployment_id}/cancel")
    assert again.status_code == 409
    assert again.json()["error"] == "not_running"


def test_deploy_restart_replaces_the_service_process(daemon: Deployd) -> None:
    show = ("show", "-P", "MainPID", "web.service")
    before = daemon.sandbox.systemctl(*show).stdout.strip()

    done = daemon.wait(daemon.deploy("web"))

    after = daemon.sandbox.systemctl(*show).stdout.strip()
    assert done["status"] == "success", done["output"]
    assert before != after and after != "0"
    assert "Restarting web.service..." in done["output"]
    assert "Service started successfully." in done["output"]


def test_deploy_failing_health_check_fails(daemon: Deployd) -> None:
    done = daemon.wait(daemon.deploy("sick"))

    assert done["status"] == "failed"
    assert done["reason"] == (
        f"health check http://127.0.0.1:{SICK_PORT}/health answered 503"
    )


def test_deploy_missing_restart_unit_fails_with_reason(daemon: Deployd) -> None:
    done = daemon.wait(daemon.deploy("nounit"))

    assert done["status"] == "failed"
    assert done["reason"].startswith("does-not-exist.service could not be restarted")


def test_deploy_unknown_user_fails_with_reason(daemon: Deployd) -> None:
    done = daemon.wait(daemon.deploy("nouser"))

    assert done["status"] == "failed"
    assert done["reason"] == "the user no-such-user does not exist"


def test_deploy_twenty_posts_at_once_start_one(daemon: Deployd) -> None:
    def post(_: int) -> tuple[int, dict]:
        answer = daemon.post("/api/admin/deploy", json={"target": "long"})
        return answer.status_code, answer.json()

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(post, range(20)))

    accepted = [body for status, body in answers if status == 202]
    refused = [body for status, body in answers if status == 409]
    assert len(accepted) == 1 and len(refused) == 19
    assert {body["id"] for body in refused} == {accepted[0]["id"]}
    assert all(body["error"] == "target_busy" for body in refused)
    daemon.post(f"/api/admin/deploy/{accepted[0]['id']}/cancel")
    daemon.wait(accepted[0]["id"])


def test_deploy_survives_sigkill_of_the_daemon(daemon: Deployd) -> None:
    deployment_id = daemon.deploy("long")
    time.sleep(0.6)

    daemon.kill("SIGKILL")
    daemon.wait_ready()
    done = daemon.wait(deployment_id)

    assert done["status"] == "success"
    ticks = [line for line in done["output"].splitlines() if line.startswith("tick")]
    assert ticks == [f"tick {n}" for n in range(1, 13)]


def test_deploy_finished_while_daemon_was_down_is_recorded(daemon: Deployd) -> None:
    deployment_id = daemon.deploy("failing")
    daemon.stop()
    time.sleep(0.5)

    daemon.start()
    done = daemon.wait(deployment_id)

    assert done["status"] == "failed"
    assert done["exit_status"] == 7


def test_deploy_output_is_cut_to_the_last_mebibyte(daemon: Deployd) -> None:
    done = daemon.wait(daemon.deploy("noisy"))
    whole = daemon.get(f"/api/admin/deploy/{done['id']}/log")

    assert done["status"] == "success"
    first, rest = done["output"].split("\n", 1)
    assert first.startswith("[output cut: the last ")
    assert f"/api/admin/deploy/{done['id']}/log" in first
    assert len(rest.encode()) <= 1024 * 1024
    assert whole.headers["Content-Type"].startswith("text/plain")
    assert len(whole.content) > 1300000
    assert whole.text.endswith(rest)


def test_log_offset_returns_the_rest(daemon: Deployd) -> None:
    done = daemon.wait(daemon.deploy("binary"))
    whole = daemon.get(f"/api/admin/deploy/{done['id']}/log").content

    part = daemon.get(f"/api/admin/deploy/{done['id']}/log", params={"offset": 10})

    assert b"\ncaf\xe9\n" in whole
    assert part.content == whole[10:]
    assert int(part.headers["X-Log-Size"]) == len(whole)
    assert (
        daemon.get(
            f"/api/admin/deploy/{done['id']}/log", params={"offset": 10**9}
        ).content
        == b""
    )


def test_list_is_newest_first_with_filters_and_paging(daemon: Deployd) -> None:
    stored = len(
        daemon.get("/api/admin/deploys", params={"limit": 200}).json()["deploys"]
    )
    ids = [
        daemon.wait(daemon.deploy("multi"))["id"] for _ in range(max(3, 21 - stored))
    ]
    ids = ids[-3:]

    everything = daemon.get("/api/admin/deploys").json()["deploys"]
    newest = daemon.get("/api/admin/deploys", params={"limit": 200}).json()["deploys"]
    mine = daemon.get("/api/admin/deploys", params={"target": "multi"}).json()
    page = daemon.get(
        "/api/admin/deploys", params={"target": "multi", "limit": 1, "before": ids[2]}
    ).json()
    failed = daemon.get("/api/admin/deploys", params={"status": "failed"}).json()

    assert len(newest) > 20
    assert everything == newest[:20]
    assert [d["started_at"] for d in newest] == sorted(
        (d["started_at"] for d in newest), reverse=True
    )
    assert set(everything[0]) >= {"id", "target", "status", "started_at", "finished_at"}
    assert [d["id"] for d in mine["deploys"][:3]] == ids[::-1]
    assert [d["id"] for d in page["deploys"]] == [ids[1]]
    assert failed["deploys"] and {d["status"] for d in failed["deploys"]} == {"failed"}


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"data": "{", "headers": {"Content-Type": "application/json"}}, 400,
         "bad_json"),
        ({"json": ["ares"]}, 400, "not_an_object"),
        ({"json": {}}, 400, "missing_target"),
        ({"json": {"target": 5}}, 400, "bad_target"),
        ({"json": {"target": "nope\u0000"}}, 400, "unknown_target"),
        ({"json": {"target": "../multi"}}, 400, "unknown_target"),
        ({"data": "x" * 70000, "headers": {"Content-Type": "application/json"}}, 413,
         "body_too_large"),
        ({"data": "target=multi"}, 415, "unsupported_media_type"),
    ],
)  # fmt: skip
def test_deploy_bad_input_is_refused(daemon: Deployd, kwargs, status, code) -> None:
    answer = daemon.post("/api/admin/deploy", **kwargs)

    assert answer.status_code == status
    assert answer.json()["error"] == code


def test_deploy_unknown_target_lists_the_known_ones(daemon: Deployd) -> None:
    answer = daemon.post("/api/admin/deploy", json={"target": "nope"})

    assert answer.json()["message"].startswith("No target named 'nope' (known: ")
    assert "multi" in answer.json()["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/admin/deploy/00000000-0000-0000-0000-000000000000",
        "/api/admin/deploy/not-a-uuid",
        "/api/admin/deploy/..%2f..%2fetc",
        "/api/admin/deploy/00000000-0000-0000-0000-000000000000/log",
    ],
)
def test_deploy_unknown_id_is_404(daemon: Deployd, path: str) -> None:
    answer = daemon.get(path)

    assert answer.status_code == 404
    assert answer.json()["error"] == "not_found"


@pytest.mark.parametrize(
    "params", [{"limit": 0}, {"limit": 201}, {"limit": "x"}, {"status": "done"}]
)
def test_list_bad_parameters_are_400(daemon: Deployd, params) -> None:
    assert daemon.get("/api/admin/deploys", params=params).status_code == 400


def _api_doc_block(language: str, heading: str) -> str:
    text = API_DOC.read_text()
    section = text[text.index(heading) :]
    start = section.index(f"```{language}\n") + len(language) + 4
    return section[start : section.index("```", start)]


def reindent(flat: str) -> str:
    """Python whose indentation was lost, indented again as a reader would.

    The document prints its example flush left. Brackets and block colons say
    where each line belongs; a block ends after ``break``.
    """
    lines, blocks, brackets = [], 0, 0
    for raw in flat.splitlines():
        line = raw.strip()
        closing_first = line[:1] in ")]}"
        lines.append("    " * (blocks + brackets - closing_first) + line)
        brackets += sum(map(line.count, "([{")) - sum(map(line.count, ")]}"))
        if brackets == 0 and line.endswith(":"):
            blocks += 1
        elif line == "break":
            blocks -= 1
    return "\n".join(lines) + "\n"


@needs_api_doc
def test_api_doc_shell_polling_pattern_prints_the_output(daemon: Deployd) -> None:
    script = _api_doc_block("bash", "### Polling Pattern")
    # The document leaves out the body and the lines that read id and status.
    script = script.replace(
        '-H "Content-Type: application/json" \\\n',
        '-H "Content-Type: application/json" \\\n'
        "-d '{\"target\": \"multi\"}' | jq -r '.id')\n",
        1,
    ).replace(
        '-H "X-Admin-Secret: your-admin-secret")\n',
        '-H "X-Admin-Secret: your-admin-secret")\n'
        "STATUS=$(echo \"$RESULT\" | jq -r '.status')\n",
    )
    script = script.replace("http://localhost:3000", daemon.base_url)
    script = script.replace("your-admin-secret", daemon.secret)
    script = script.replace("sleep 3", "sleep 0.2")

    result = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert "Deployment started: " in result.stdout
    assert "second" in result.stdout
    assert "==> Deployment succeeded" in result.stdout


@needs_api_doc
def test_api_doc_python_example_prints_the_output(
    daemon: Deployd, tmp_path: Path
) -> None:
    script = reindent(_api_doc_block("python", "**Python Example:**"))
    script = script.replace("http://localhost:3000", daemon.base_url)
    script = script.replace("your-admin-secret", daemon.secret)
    script = script.replace('"target": "ares"', '"target": "multi"')
    script = script.replace("time.sleep(3)", "time.sleep(0.2)")
    (tmp_path / "example.py").write_text(script)

    result = subprocess.run(
        [sys.executable, str(tmp_path / "example.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NO_PROXY": "127.0.0.1"},
    )

    assert result.returncode == 0, result.stderr
    assert "Status: success" in result.stdout
    assert "third" in result.stdout


def test_history_beyond_its_bound_is_pruned_with_its_logs(daemon: Deployd) -> None:
    daemon.configure(TARGETS, server="history = 3\n")
    daemon.restart()
    try:
        ids = [daemon.wait(daemon.deploy("multi"))["id"] for _ in range(4)]
        kept = daemon.get("/api/admin/deploys", params={"limit": 200}).json()
        logs = daemon.sandbox.path(f"{STATE}/logs")
    finally:
        daemon.configure(TARGETS)
        daemon.restart()

    assert [d["id"] for d in kept["deploys"]] == ids[:0:-1]
    assert daemon.get(f"/api/admin/deploy/{ids[0]}").status_code == 404
    assert sorted(path.stem for path in logs.iterdir()) == sorted(ids[1:])
