"""The deployment resources: trigger, poll, list, cancel and read the log."""

from __future__ import annotations

import io
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any

import falcon

from ares_deployd import buildlog, streams
from ares_deployd.api.app import read_json
from ares_deployd.errors import bad_request, not_found
from ares_deployd.runner import Runner
from ares_deployd.store import RUNNING, STATUSES, Deployment
from ares_deployd.streams import Stream, StreamLimit, Waiter, Wakeups

# The canonical form of the ids the daemon makes, the only form it answers to.
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
LIST_DEFAULT = 20
LIST_MAX = 200
# How often a stream looks at its deployment's status unless woken for it.
STATUS_CHECK = 1.0


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

        if deployment.status in ("running", "success"):
            # A quick build may have ended by now; it did start.
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
        data = buildlog.read_from(path, offset)

        # The bytes as written, so that offset plus their length is where the
        # next read starts, whatever a build printed.
        resp.content_type = "text/plain; charset=utf-8"
        resp.set_header(
            "X-Log-Size", str(offset + len(data) if data else buildlog.size(path))
        )
        resp.data = data


class Events:
    """``GET /api/admin/deploy/{id}/events``: the output line by line as it is
    written, then the final status, as server-sent events.

    Each output event's id is the byte offset its line starts at, so that
    ``Last-Event-ID`` resumes with the line after it.
    """

    def __init__(
        self,
        runner: Runner,
        limit: StreamLimit,
        wakeups: Wakeups,
        closing: threading.Event,
    ) -> None:
        self.runner = runner
        self.limit = limit
        self.wakeups = wakeups
        self.closing = closing

    def on_get(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        deployment = _find(self.runner, id)
        resume = _last_event_id(req)

        path = buildlog.log_path(self.runner.state_dir, deployment.id)

        streams.answer(
            req,
            resp,
            self.limit,
            self.closing,
            lambda stream: self._events(stream, deployment.id, path, resume),
        )

    def _events(
        self, stream: Stream, deployment_id: str, path: Path, resume: int | None
    ) -> Iterator[bytes]:
        waiter = Waiter()
        reader = _LineReader(path, resume)
        try:
            with self.wakeups.registered(deployment_id, waiter):
                woken, checked = True, 0.0
                while not stream.over():
                    waiter.watch(path)
                    # The history is read only when the runner says the end has
                    # come (and now and then besides), not at every line: many
                    # streams at once would queue on the database for nothing.
                    ended = False
                    if woken or time.monotonic() - checked >= STATUS_CHECK:
                        checked = time.monotonic()
                        # Read before the log: the daemon writes its last lines
                        # before it records the end, so none can be missed.
                        deployment = self.runner.store.get(deployment_id)
                        ended = deployment is None or deployment.status != RUNNING
                    chunk = reader.events(final=ended)
                    if ended:
                        if deployment is not None:
                            status = json.dumps(deployment.as_json())
                            chunk += streams.event(status, "status")
                        yield chunk
                        return
                    chunk = chunk or stream.keepalive()
                    if chunk:
                        stream.sent()
                        yield chunk
                    woken = False
                    if not reader.more:
                        woken = waiter.wait(stream.until_keepalive())
        finally:
            reader.close()
            waiter.close()


class _LineReader:
    """Whole lines of a growing log, each as an output event with its offset."""

    # Read at most this much between two writes to the client.
    CHUNK = 256 * 1024

    def __init__(self, path: Path, resume: int | None) -> None:
        self._path = path
        self._handle: io.FileIO | None = None
        # The offset of the first byte not yet sent, and what of it is read.
        self._start = 0 if resume is None else resume
        self._pending = b""
        # Resuming at an event's id means after the line that starts there.
        self._skipping = resume is not None
        # Set when a read stopped short of the end, so that the next comes at once.
        self.more = False

    def _open(self) -> io.FileIO | None:
        if self._handle is None:
            try:
                # Unbuffered: each read is one system call, and sees the end.
                self._handle = open(self._path, "rb", buffering=0)  # noqa: SIM115
            except FileNotFoundError:
                return None
            self._handle.seek(self._start)
        return self._handle

    def events(self, final: bool) -> bytes:
        """Events for the lines written since the last call; with ``final``,
        everything to the end, the last line even without its newline."""
        handle = self._open()
        if handle is None:
            return b""
        out = []
        self.more = False
        while data := handle.read(self.CHUNK):
            # One read a wake; a full one means more may wait behind it.
            self.more = len(data) == self.CHUNK
            data = self._pending + data
            if self._skipping:
                newline = data.find(b"\n")
                if newline < 0:
                    self._start += len(data)
                    self._pending = b""
                    continue
                self._start += newline + 1
                data = data[newline + 1 :]
                self._skipping = False
            end = data.rfind(b"\n") + 1
            for line in data[:end].split(b"\n")[:-1]:
                out.append(self._event(line))
                self._start += len(line) + 1
            self._pending = data[end:]
            if not final:
                break
        if final and self._pending and not self._skipping:
            out.append(self._event(self._pending))
            self._start += len(self._pending)
            self._pending = b""
        return b"".join(out)

    def _event(self, line: bytes) -> bytes:
        text = line.decode(errors="replace")
        return streams.event(text, "output", str(self._start))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def _last_event_id(req: falcon.Request) -> int | None:
    raw = req.get_header("Last-Event-ID")
    if raw is None or raw.strip() == "":
        return None
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise bad_request(
            "bad_last_event_id",
            "Last-Event-ID must be the id of an earlier output event, a byte offset",
        )
    return int(raw)


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
