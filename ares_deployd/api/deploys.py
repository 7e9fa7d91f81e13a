"""The deployment resources: trigger, poll, list, cancel and read the log."""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import falcon

from ares_deployd import buildlog
from ares_deployd.api.app import read_json
from ares_deployd.errors import bad_request, not_found
from ares_deployd.runner import Runner
from ares_deployd.store import STATUSES, Deployment

# The canonical form of the ids the daemon makes, the only form it answers to.
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
LIST_DEFAULT = 20
LIST_MAX = 200


class Answers:
    """Encoded answers, reused for as long as what they were made from holds.

    Clients poll the same few URLs; encoding the same rows again for each was
    most of what an answer cost. A key names everything the answer depends on.
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._items: OrderedDict[Hashable, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> str | None:
        with self._lock:
            return self._items.get(key)

    def put(self, key: Hashable, body: str) -> None:
        with self._lock:
            self._items[key] = body
            while len(self._items) > self._size:
                self._items.popitem(last=False)


def _lookup(runner: Runner, deployment_id: str) -> Deployment | None:
    if not UUID.fullmatch(deployment_id):
        return None
    return runner.store.get(deployment_id)


def _find(runner: Runner, deployment_id: str) -> Deployment:
    """The deployment with this id; malformed and unknown ids are both 404."""
    deployment = _lookup(runner, deployment_id)
    if deployment is None:
        raise not_found("not_found", f"No deployment with id {deployment_id!r}")
    return deployment


def detail(runner: Runner, deployment: Deployment) -> dict[str, Any]:
    """A deployment as ``GET /api/admin/deploy/{id}`` shows it."""
    output = buildlog.log_path(runner.state_dir, deployment.id)
    return {**deployment.as_json(), "output": buildlog.tail(output, deployment.id)}


class Deploy:
    """``POST /api/admin/deploy``: start a deployment of a configured target."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req)
        target = body.get("target")
        if target is None:
            raise bad_request("missing_target", 'The body needs a "target"')
        if not isinstance(target, str):
            raise bad_request("bad_target", '"target" must be a string')
        ref = body.get("ref")
        if ref is not None and not isinstance(ref, str):
            raise bad_request("bad_ref", '"ref" must be a string')

        deployment = self.runner.trigger(target, ref=ref)

        if deployment.status == "running":
            message = f"Deployment started for {target}"
        else:
            message = f"Deployment of {target} {deployment.status}: {deployment.reason}"
        resp.status = falcon.HTTP_202
        resp.location = f"/api/admin/deploy/{deployment.id}"
        resp.media = started(deployment, message)


def started(deployment: Deployment, message: str) -> dict[str, Any]:
    """The answer to a request that started a deployment."""
    return {
        "id": deployment.id,
        "status": deployment.status,
        "message": message,
        "target": deployment.target,
        "ref": deployment.ref,
        "rollback_of": deployment.rollback_of,
        "started_at": deployment.summary()["started_at"],
    }


class DeploymentResource:
    """``GET /api/admin/deploy/{id}``: a deployment with its output."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self._answers = Answers()

    def on_get(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        if not UUID.fullmatch(id):
            raise not_found("not_found", f"No deployment with id {id!r}")
        output = buildlog.log_path(self.runner.state_dir, id)
        key = (id, self.runner.store.generation, buildlog.size(output))
        resp.content_type = falcon.MEDIA_JSON
        if (cached := self._answers.get(key)) is not None:
            resp.text = cached
            return

        resp.text = json.dumps(detail(self.runner, _find(self.runner, id)))
        self._answers.put(key, resp.text)


class Cancel:
    """``POST /api/admin/deploy/{id}/cancel``: stop a running deployment."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def on_post(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        deployment = self.runner.cancel(_find(self.runner, id).id)
        resp.media = detail(self.runner, deployment)


class Rollback:
    """``POST /api/admin/deploy/{id}/rollback``: deploy the revision live before."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def on_post(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        failed = _find(self.runner, id)

        deployment = self.runner.rollback(failed.id)

        resp.status = falcon.HTTP_202
        resp.location = f"/api/admin/deploy/{deployment.id}"
        resp.media = started(
            deployment,
            f"Rollback of {deployment.target} to {deployment.ref} started",
        )


class Log:
    """``GET /api/admin/deploy/{id}/log``: the whole output as plain text."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def on_get(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        deployment = _find(self.runner, id)
        offset = _int_param(req, "offset", 0, 0, 2**62)

        path = buildlog.log_path(self.runner.state_dir, deployment.id)
        resp.content_type = "text/plain; charset=utf-8"
        resp.set_header("X-Log-Size", str(buildlog.size(path)))
        resp.text = buildlog.read_from(path, offset).decode(errors="replace")


class DeployList:
    """``GET /api/admin/deploys``: the newest deployments, filtered and paged."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self._answers = Answers()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        key = (req.query_string, self.runner.store.generation)
        resp.content_type = falcon.MEDIA_JSON
        if (cached := self._answers.get(key)) is not None:
            resp.text = cached
            return

        limit = _int_param(req, "limit", LIST_DEFAULT, 1, LIST_MAX)
        status = req.get_param("status")
        if status is not None and status not in STATUSES:
            raise bad_request(
                "bad_status", f"status must be one of {', '.join(STATUSES)}"
            )
        before = None
        if (before_id := req.get_param("before")) is not None:
            anchor = _lookup(self.runner, before_id)
            if anchor is None:
                raise bad_request(
                    "bad_before", f"before: no deployment with id {before_id!r}"
                )
            before = anchor.seq

        deployments = self.runner.store.list(
            limit=limit,
            target=req.get_param("target"),
            status=status,
            revision=req.get_param("revision"),
            before=before,
        )

        resp.text = json.dumps({"deploys": [d.summary() for d in deployments]})
        self._answers.put(key, resp.text)


def _int_param(
    req: falcon.Request, name: str, default: int, lowest: int, highest: int
) -> int:
    raw = req.get_param(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not lowest <= int(raw) <= highest:
        raise bad_request(
            f"bad_{name}", f"{name} must be a whole number from {lowest} to {highest}"
        )
    return int(raw)
