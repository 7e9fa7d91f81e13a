"""Revisions, deploying a given ref, and rollback, on a real git repository."""

from __future__ import annotations

import time

import pytest

from tests.deployd import ROOT, Deployd, free_port
from tests.integration.conftest import WORK

pytestmark = pytest.mark.integration

ORIGIN = "/srv/origin"
CHECKOUT = "/srv/checkout"
SITE = "/srv/site"
# Under /home, which the daemon's unit hides from it and the build's does not.
HIDDEN = "/home/deployer/app"
LIVE = "/srv/live"
APP_PORT = free_port()

# Honours DEPLOY_REF when it is set, and takes the newest commit otherwise.
CHECKOUT_STEP = (
    "git fetch --quiet origin && "
    'git checkout --quiet --detach "${DEPLOY_REF:-origin/main}"'
)
PUBLISH_STEP = (
    f"rm -rf {LIVE}.new && cp -r public {LIVE}.new && "
    f"rm -rf {LIVE} && mv {LIVE}.new {LIVE}"
)

TARGETS = f"""
[targets.code]
working_directory = "{CHECKOUT}"
user = "root"
steps = ['{CHECKOUT_STEP}', "cat VERSION"]

[targets.site]
working_directory = "{SITE}"
user = "root"
steps = [
    '{CHECKOUT_STEP}',
    "{PUBLISH_STEP}",
]
restart = "app.service"
health_url = "http://127.0.0.1:{APP_PORT}/health"
health_timeout = "2s"
rollback_on_failure = true

[targets.hidden]
working_directory = "{HIDDEN}"
user = "root"
steps = ["cat VERSION"]

[targets.echo]
working_directory = "{WORK}"
user = "nobody"
steps = ['printf "%s" "$DEPLOY_REF" > ref-seen']

[targets.plain]
working_directory = "{WORK}"
user = "nobody"
steps = ["true"]
"""

APP_UNIT = f"""\
[Service]
WorkingDirectory={LIVE}
ExecStart=/usr/bin/python3 {ROOT}/examples/demo/server.py {APP_PORT} app
Environment=UNHEALTHY_FILE={LIVE}/BROKEN
"""


class Repo:
    """The origin repository the targets pull from, changed by the tests."""

    def __init__(self, daemon: Deployd) -> None:
        self.sandbox = daemon.sandbox

    def git(self, *args: str, cwd: str = ORIGIN) -> str:
        result = self.sandbox.run(
            "git", "-C", cwd, "-c", "user.name=t", "-c", "user.email=t@example.org",
            *args,
        )  # fmt: skip
        return result.stdout.strip()

    def commit(self, files: dict[str, str | None], message: str) -> str:
        """Write (or, for None, delete) files in the origin and commit them."""
        for path, text in files.items():
            if text is None:
                self.git("rm", "--quiet", path)
            else:
                self.sandbox.write(f"{ORIGIN}/{path}", text)
                self.git("add", path)
        self.git("commit", "--quiet", "-m", message)
        return self.git("rev-parse", "HEAD")


@pytest.fixture(scope="module")
def repo(deployd: Deployd) -> Repo:
    sandbox = deployd.sandbox
    sandbox.run("git", "init", "--quiet", "--initial-branch=main", ORIGIN)
    origin = Repo(deployd)
    origin.commit({"VERSION": "one\n", "public/index.html": "one\n"}, "one")
    for clone in (CHECKOUT, SITE, HIDDEN):
        sandbox.run("git", "clone", "--quiet", ORIGIN, clone)
    sandbox.run("cp", "-r", f"{SITE}/public", LIVE)
    sandbox.write("/etc/systemd/system/app.service", APP_UNIT)
    sandbox.systemctl("daemon-reload")
    sandbox.systemctl("restart", "app.service")
    deployd.configure(TARGETS)
    deployd.restart()
    return origin


def _deploy(daemon: Deployd, target: str, **body: str) -> dict:
    answer = daemon.post("/api/admin/deploy", json={"target": target, **body})
    assert answer.status_code == 202, answer.text
    return daemon.wait(answer.json()["id"])


def test_revision_recorded_before_and_after(deployd: Deployd, repo: Repo) -> None:
    first = repo.git("rev-parse", "HEAD")
    settled = _deploy(deployd, "code")
    second = repo.commit({"VERSION": "two\n"}, "two")

    moved = _deploy(deployd, "code")
    back = _deploy(deployd, "code", ref=first)

    assert settled["status"] == "success"
    assert (settled["revision_before"], settled["revision"]) == (first, first)
    assert (moved["revision_before"], moved["revision"]) == (first, second)
    assert "two" in moved["output"].splitlines()
    assert (back["ref"], back["revision_before"], back["revision"]) == (
        first,
        second,
        first,
    )
    assert "one" in back["output"].splitlines()
    found = deployd.get("/api/admin/deploys", params={"revision": second}).json()
    assert [d["id"] for d in found["deploys"]] == [moved["id"]]
    listed = deployd.get("/api/admin/deploys", params={"limit": 1}).json()["deploys"]
    assert listed[0]["revision"] == first


def test_revision_of_a_checkout_the_daemon_cannot_see(
    deployd: Deployd, repo: Repo
) -> None:
    head = repo.git("rev-parse", "HEAD", cwd=HIDDEN)

    done = _deploy(deployd, "hidden")
    plain = _deploy(deployd, "plain")

    assert (done["revision_before"], done["revision"]) == (head, head)
    assert "==> Revision" not in plain["output"]


def test_rollback_endpoint_deploys_the_revision_before(
    deployd: Deployd, repo: Repo
) -> None:
    before = repo.git("rev-parse", "HEAD", cwd=CHECKOUT)
    newer = repo.commit({"VERSION": "three\n"}, "three")
    moved = _deploy(deployd, "code")

    answer = deployd.post(f"/api/admin/deploy/{moved['id']}/rollback")
    undone = deployd.wait(answer.json()["id"])

    assert moved["revision"] == newer
    assert answer.status_code == 202
    assert answer.json()["rollback_of"] == moved["id"]
    assert undone["status"] == "success"
    assert (undone["ref"], undone["revision"]) == (before, before)


def test_rollback_without_revision_is_409(deployd: Deployd, repo: Repo) -> None:
    plain = _deploy(deployd, "plain")

    answer = deployd.post(f"/api/admin/deploy/{plain['id']}/rollback")

    assert plain["revision_before"] is None
    assert answer.status_code == 409
    assert answer.json()["error"] == "no_revision"


def test_rollback_on_failure_restores_a_healthy_service(
    deployd: Deployd, repo: Repo
) -> None:
    good = _deploy(deployd, "site")
    repo.commit({"public/BROKEN": "yes\n"}, "break the health check")

    failed = _deploy(deployd, "site")
    rollback_id = failed["rolled_back_by"]
    undone = deployd.wait(rollback_id)

    assert good["status"] == "success"
    assert failed["status"] == "failed"
    assert failed["reason"].startswith("health check ")
    assert (
        f"==> Rolling back to {good['revision']} in deployment {rollback_id}"
        in (failed["output"])
    )
    assert undone["rollback_of"] == failed["id"]
    assert undone["status"] == "success", undone["output"]
    assert undone["revision"] == good["revision"]
    health = deployd.sandbox.run(
        "python3", "-c",
        f"import urllib.request; print(urllib.request.urlopen("
        f"'http://127.0.0.1:{APP_PORT}/health').status)",
    )  # fmt: skip
    assert health.stdout.strip() == "200"


def test_failed_rollback_is_not_rolled_back_again(deployd: Deployd, repo: Repo) -> None:
    sandbox = deployd.sandbox
    # Sick whatever is deployed: the rollback fails its health check as well.
    sandbox.write(
        "/etc/systemd/system/app.service.d/sick.conf",
        "[Service]\nEnvironment=UNHEALTHY_FILE=/run/app-sick\n",
    )
    sandbox.write("/run/app-sick", "")
    sandbox.systemctl("daemon-reload")
    try:
        failed = _deploy(deployd, "site")
        rollback = deployd.wait(failed["rolled_back_by"])
        time.sleep(1)
        newest = deployd.get("/api/admin/deploys", params={"target": "site"}).json()
    finally:
        sandbox.run("rm", "-r", "/etc/systemd/system/app.service.d", "/run/app-sick")
        sandbox.systemctl("daemon-reload")

    assert failed["status"] == "failed"
    assert rollback["rollback_of"] == failed["id"]
    assert rollback["status"] == "failed"
    assert rollback["rolled_back_by"] is None
    assert newest["deploys"][0]["id"] == rollback["id"]


@pytest.mark.parametrize("ref", ["main branch", "v1\tx", "bell\x07", "", "x" * 201])
def test_ref_with_whitespace_or_control_characters_is_400(
    deployd: Deployd, repo: Repo, ref: str
) -> None:
    answer = deployd.post("/api/admin/deploy", json={"target": "echo", "ref": ref})

    assert answer.status_code == 400
    assert answer.json()["error"] == "bad_ref"


def test_ref_with_shell_syntax_reaches_the_step_as_data(
    deployd: Deployd, repo: Repo
) -> None:
    ref = "$(touch${IFS}/srv/pwned);`id`|x"

    done = _deploy(deployd, "echo", ref=ref)

    assert done["status"] == "success"
    assert deployd.sandbox.path(f"{WORK}/ref-seen").read_text() == ref
    assert not deployd.sandbox.path("/srv/pwned").exists()
    assert done["ref"] == ref
