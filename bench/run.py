"""``make bench``: what ares-deployd costs, each figure a ratio against a reference.

Boots a sandbox, runs the daemon in it as a systemd service, and measures every
figure against its reference in the same run, alternating the two over several
rounds; the median of each side is reported with its spread. Absolute times on a
shared machine mean little, ratios more. ``--quick`` runs every figure once with
tiny counts, to keep the harness working; it judges nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import client_name, load, paced  # noqa: E402
from tests.deployd import Deployd, free_port  # noqa: E402
from tests.sandbox import Sandbox  # noqa: E402

WORK = "/srv/bench"
SERVICES = 50
# Requests a second of the steady load that latency is measured under: the rate
# of the load test, well below what the daemon can answer.
STEADY_RATE = 200


@dataclass
class Figure:
    name: str
    reference: str
    unit: str
    goal: str
    # Judges the ratio (or, for an absolute goal, our median).
    met: Callable[[float, float], bool]
    # How the ratio is formed: ours over the reference, or the other way.
    inverse: bool = False
    ours: list[float] = field(default_factory=list)
    theirs: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def ratio(self) -> float:
        ours, theirs = statistics.median(self.ours), statistics.median(self.theirs)
        return theirs / ours if self.inverse else ours / theirs


@dataclass
class Bench:
    sandbox: Sandbox
    daemon: Deployd
    rounds: int
    quick: bool
    figures: list[Figure] = field(default_factory=list)

    def inside(self, code: str) -> str:
        """Run Python inside the sandbox; its last line of output."""
        result = self.sandbox.run("python3", "-c", textwrap.dedent(code), timeout=600)
        return result.stdout.strip().splitlines()[-1]

    def timed_inside(self, argv: list[str]) -> float:
        """Seconds a command takes inside the sandbox, timed there."""
        return float(
            self.inside(
                f"""
                import subprocess, time
                start = time.perf_counter()
                subprocess.run({argv!r}, check=True, stdout=subprocess.DEVNULL)
                print(time.perf_counter() - start)
                """
            )
        )

    def rss(self, pid: int) -> float:
        """Resident memory of a process in the sandbox, in MB."""
        status = self.sandbox.path(f"/proc/{pid}/status").read_text()
        kib = next(
            line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")
        )
        return int(kib) / 1024

    def has_route(self, path: str) -> bool:
        return self.daemon.get(path).status_code != 404


def deploy_and_wait(daemon: Deployd, target: str) -> float:
    """Seconds from the POST to the final state, as a client learns of it."""
    start = time.perf_counter()
    answer = daemon.post("/api/admin/deploy", json={"target": target})
    deployment_id = answer.json()["id"]
    events = f"/api/admin/deploy/{deployment_id}/events"
    with daemon.http.get(daemon.base_url + events, stream=True, timeout=120) as stream:
        if stream.status_code == 200:
            for line in stream.iter_lines():
                if line == b"event: status":
                    return time.perf_counter() - start
    # Without an event stream, the quickest a client can learn it: polling.
    while (
        daemon.get(f"/api/admin/deploy/{deployment_id}").json()["status"] == "running"
    ):
        time.sleep(0.005)
    return time.perf_counter() - start


def bench_deploy(bench: Bench, target: str, step: list[str], goal: float) -> None:
    figure = Figure(
        f"deploy overhead, one step `{' '.join(step)}`: POST to final state",
        f"`systemd-run --wait -p Type=oneshot {' '.join(step)}`",
        "s",
        f"at most {goal}x",
        lambda ratio, ours: ratio <= goal,
    )
    for _ in range(bench.rounds):
        figure.ours.append(deploy_and_wait(bench.daemon, target))
        figure.theirs.append(
            bench.timed_inside(
                ["systemd-run", "--wait", "--quiet", "-p", "Type=oneshot", *step]
            )
        )
    bench.figures.append(figure)


def bench_output_latency(bench: Bench) -> None:
    figure = Figure(
        "output latency: a build writes a line, a client receives it",
        "the API document's polling every 3 s",
        "s",
        "median at most 50 ms",
        lambda ratio, ours: ours <= 0.050,
    )
    daemon = bench.daemon
    answer = daemon.post("/api/admin/deploy", json={"target": "stamp"})
    deployment_id = answer.json()["id"]
    polled: dict[str, float] = {}

    def poll() -> None:
        while True:
            body = daemon.get(f"/api/admin/deploy/{deployment_id}").json()
            now = time.time()
            for line in body["output"].splitlines():
                if line.startswith("stamp ") and line not in polled:
                    polled[line] = now - float(line.split()[1])
            if body["status"] != "running":
                return
            time.sleep(3)

    poller = threading.Thread(target=poll)
    poller.start()
    events = f"/api/admin/deploy/{deployment_id}/events"
    with daemon.http.get(daemon.base_url + events, stream=True, timeout=120) as stream:
        for line in stream.iter_lines():
            text = line.decode()
            if text.startswith("data: stamp "):
                figure.ours.append(time.time() - float(text.split()[2]))
            if text == "event: status":
                break
    poller.join()
    figure.theirs = list(polled.values())
    bench.figures.append(figure)


def bench_requests(bench: Bench, path: str, label: str, bare_url: str) -> None:
    seconds = 1 if bench.quick else 4
    figure = Figure(
        f"`GET {label}`, requests per second",
        "a bare Falcon route of constant JSON, same waitress settings",
        "req/s",
        "at least 0.7x",
        lambda ratio, ours: ratio >= 0.7,
    )
    headers = {"X-Admin-Secret": bench.daemon.secret}
    for _ in range(bench.rounds):
        figure.ours.append(load(bench.daemon.base_url + path, headers, seconds).rate)
        figure.theirs.append(load(bare_url, {}, seconds).rate)
    bench.figures.append(figure)


def sequential_latency(
    daemon: Deployd, path: str, count: int, fresh: bool = False
) -> float:
    """The median time of ``count`` requests made one after another.

    With ``fresh``, each request has a query string of its own, which the daemon
    ignores but which keeps it from answering from its cache.
    """
    session = daemon.http
    times = []
    for n in range(count):
        url = (
            daemon.base_url
            + path
            + (f"?round={n}-{time.monotonic_ns()}" if fresh else "")
        )
        start = time.perf_counter()
        answer = session.get(url, timeout=30)
        times.append(time.perf_counter() - start)
        assert answer.status_code == 200, answer.text
    return statistics.median(times)


def bench_services(bench: Bench) -> None:
    figure = Figure(
        f"`GET /api/admin/services` with {SERVICES} configured units",
        f"`systemctl show -p ActiveState,SubState,MainPID` of the same {SERVICES} "
        "units, one process",
        "s",
        "at least 5x faster",
        lambda ratio, ours: ratio >= 5,
        inverse=True,
    )
    units = [f"bench-{n}.service" for n in range(SERVICES)]
    show = ["systemctl", "show", "-p", "ActiveState,SubState,MainPID", *units]
    for _ in range(bench.rounds):
        figure.ours.append(sequential_latency(bench.daemon, "/api/admin/services", 20))
        figure.theirs.append(bench.timed_inside(show))
    bench.figures.append(figure)


def bench_logs(bench: Bench) -> None:
    figure = Figure(
        "`GET /api/admin/services/{name}/logs?lines=200`",
        "`journalctl -u UNIT -n 200 -o json`",
        "s",
        "at most 1.3x",
        lambda ratio, ours: ratio <= 1.3,
    )
    path = "/api/admin/services/chatty/logs?lines=200"
    journal = ["journalctl", "-u", "chatty.service", "-n", "200", "-o", "json"]
    for _ in range(bench.rounds):
        figure.ours.append(sequential_latency(bench.daemon, path, 5))
        figure.theirs.append(bench.timed_inside(journal))
    bench.figures.append(figure)


def start_extra_daemon(bench: Bench, name: str, rows: int) -> Deployd:
    """Another daemon in the sandbox with its own history of ``rows`` rows."""
    extra = Deployd(bench.sandbox)
    extra.secret = bench.daemon.secret
    extra.http.headers["X-Admin-Secret"] = extra.secret
    state = f"/var/lib/bench-{name}"
    config = f"/etc/bench-{name}.toml"
    bench.sandbox.write(
        config,
        f'[server]\nlisten = "127.0.0.1:{extra.port}"\n'
        f'admin_secret_file = "/etc/ares-deployd/admin-secret"\n'
        f'state_dir = "{state}"\nhistory = {rows + 10}\n',
    )
    program = str(Path(sys.prefix) / "bin" / "ares-deployd")
    bench.sandbox.run(
        "systemd-run", f"--unit=bench-daemon-{name}", "-p", "Type=notify",
        f"--setenv=ARES_DEPLOYD_CONFIG={config}", program,
    )  # fmt: skip
    extra.wait_ready()
    bench.inside(
        f"""
        import sqlite3, time, uuid
        db = sqlite3.connect("{state}/history.sqlite3")
        now = time.time()
        rows = [(str(uuid.uuid4()), "t%d" % (n % 7), "success", "unit",
                 now - {rows} + n, now - {rows} + n + 1) for n in range({rows})]
        db.executemany("INSERT INTO deployments (id, target, status, unit, started,"
                       " finished) VALUES (?, ?, ?, ?, ?, ?)", rows)
        db.commit()
        print(db.execute("SELECT COUNT(*) FROM deployments").fetchone()[0])
        """
    )
    return extra


def bench_history(bench: Bench) -> None:
    large = 1000 if bench.quick else 100_000
    figure = Figure(
        f"`GET /api/admin/deploys` with {large:,} deployments stored",
        "the same with 100",
        "s",
        "at most 1.3x",
        lambda ratio, ours: ratio <= 1.3,
        note="(every request missed the answer cache)",
    )
    small_daemon = start_extra_daemon(bench, "small", 100)
    large_daemon = start_extra_daemon(bench, "large", large)
    for _ in range(bench.rounds):
        for daemon, side in (
            (large_daemon, figure.ours),
            (small_daemon, figure.theirs),
        ):
            side.append(
                sequential_latency(daemon, "/api/admin/deploys", 50, fresh=True)
            )
    for name in ("small", "large"):
        bench.sandbox.systemctl("stop", f"bench-daemon-{name}")
    bench.figures.append(figure)


def bench_memory(bench: Bench, bare_pid: int, bare_url: str) -> None:
    figure = Figure(
        "idle memory (RSS)",
        "the bare Falcon and waitress process",
        "MB",
        "at most 1.5x",
        lambda ratio, ours: ratio <= 1.5,
    )
    for _ in range(bench.rounds):
        figure.ours.append(bench.rss(bench.daemon.main_pid()))
        figure.theirs.append(bench.rss(bare_pid))
        time.sleep(0.2)
    bench.figures.append(figure)

    deployments, reads = (5, 200) if bench.quick else (500, 20_000)
    growth = Figure(
        f"RSS growth over {deployments} deployments and {reads:,} requests",
        "none (before and after)",
        "MB",
        "at most 5 MB",
        lambda ratio, ours: ours <= 5,
    )
    pid = bench.daemon.main_pid()
    before = bench.rss(pid)
    for _ in range(deployments):
        deploy_and_wait(bench.daemon, "true")
    paths = ["/api/admin/deploys", "/api/admin/deploys?limit=200"]
    for n in range(reads):
        bench.daemon.get(paths[n % 2])
    after = bench.rss(pid)
    growth.ours, growth.theirs = [after - before], [0.0]
    growth.note = f"{before:.1f} MB before, {after:.1f} MB after"
    bench.figures.append(growth)


def bench_busy_latency(bench: Bench) -> None:
    seconds = 1 if bench.quick else 8
    figure = Figure(
        "API p99 latency during 5 parallel deployments and 20 open streams, "
        f"at a steady {STEADY_RATE} requests a second",
        "the same, idle",
        "s",
        "at most 2x",
        lambda ratio, ours: ratio <= 2,
    )
    daemon = bench.daemon
    headers = {"X-Admin-Secret": daemon.secret}
    url = daemon.base_url + "/api/admin/deploys"
    # Besides: the builds alone, and the same under a load as heavy as wrk can
    # make it, where p99 is mostly the time spent queueing behind other requests.
    builds_alone: list[float] = []
    saturated: dict[str, list[float]] = {"idle": [], "busy": []}
    for _ in range(bench.rounds):
        figure.theirs.append(paced(url, headers, seconds, STEADY_RATE).p99)
        saturated["idle"].append(load(url, headers, seconds / 2).p99)
        ids = [daemon.deploy(f"busy{n}") for n in range(5)]
        builds_alone.append(paced(url, headers, seconds, STEADY_RATE).p99)
        streams = [
            daemon.http.get(
                f"{daemon.base_url}/api/admin/deploy/{ids[n % 5]}/events",
                stream=True,
                timeout=60,
            )
            for n in range(20)
        ]
        figure.ours.append(paced(url, headers, seconds, STEADY_RATE).p99)
        saturated["busy"].append(load(url, headers, seconds / 2).p99)
        for stream in streams:
            stream.close()
        for deployment_id in ids:
            daemon.post(f"/api/admin/deploy/{deployment_id}/cancel")
            daemon.wait(deployment_id)

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.1f} ms"

    idle, busy = (statistics.median(saturated[name]) for name in ("idle", "busy"))
    slowdown = _ratio(busy / idle)

    figure.note = (
        f"With the 5 builds alone: {ms(builds_alone)}. Under as much load as "
        f"{client_name()} can make with 8 connections: {ms(saturated['idle'])} "
        f"idle, {ms(saturated['busy'])} busy "
        f"({slowdown}), "
        "where p99 is mostly queueing: the builds' processes and the streams take "
        "CPU from a server that already has none to spare."
    )
    bench.figures.append(figure)


# Each line carries the time it was written, for the output latency figure.
STAMP_LINE = "echo stamp $(date +%s.%N)"

TARGETS = (
    f"""
[targets.true]
working_directory = "{WORK}"
user = "nobody"
steps = ["true"]

[targets.sleep]
working_directory = "{WORK}"
user = "nobody"
steps = ["sleep 1"]

[targets.stamp]
working_directory = "{WORK}"
user = "nobody"
steps = ["sleep 0.5; for i in $(seq STAMPS); do {STAMP_LINE}; sleep 0.2; done"]
"""
    + "".join(
        f"""
[targets.busy{n}]
working_directory = "{WORK}"
user = "nobody"
steps = ["while true; do echo busy; sleep 0.1; done"]
"""
        for n in range(5)
    )
    + "".join(
        f'\n[services.bench{n}]\nunit = "bench-{n}.service"\n' for n in range(SERVICES)
    )
    + '\n[services.chatty]\nunit = "chatty.service"\n'
)


def prepare(sandbox: Sandbox, quick: bool) -> None:
    sandbox.run("install", "-d", "-m", "1777", WORK)
    for n in range(SERVICES):
        sandbox.write(
            f"/etc/systemd/system/bench-{n}.service",
            "[Service]\nExecStart=/bin/sleep infinity\n",
        )
    sandbox.write(
        "/etc/systemd/system/chatty.service",
        "[Service]\nType=oneshot\nRemainAfterExit=yes\n"
        "ExecStart=/bin/sh -c 'for i in $(seq 400); do echo line $i; done'\n",
    )
    sandbox.systemctl("daemon-reload")
    units = [f"bench-{n}.service" for n in range(SERVICES)]
    sandbox.systemctl("start", *units, "chatty.service")


def _ratio(ratio: float) -> str:
    # A ratio far below one keeps a significant digit rather than read 0.00x.
    return f"{ratio:.2f}x" if ratio >= 0.01 else f"{ratio:.1g}x"


def write_results(bench: Bench, path: Path, started: float) -> None:
    def shown(values: list[float], unit: str) -> str:
        median = statistics.median(values)
        low, high = min(values), max(values)
        if unit == "s":
            return f"{median * 1000:.1f} ms ({low * 1000:.1f}–{high * 1000:.1f})"
        return f"{median:,.1f} {unit} ({low:,.1f}–{high:,.1f})"

    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench`"
        + (" in `--quick` mode: tiny counts, nothing judged." if bench.quick else "."),
        "Each figure sets our median against its reference's, measured in the same "
        "run, alternating; the spread is the lowest and highest of the rounds.",
        "",
        "| figure | ours | reference | ratio | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for figure in bench.figures:
        if not figure.ours or not figure.theirs:
            lines.append(
                f"| {figure.name} | not measured | {figure.reference} | | "
                f"{figure.goal} | no: {figure.note} |"
            )
            continue
        ours = statistics.median(figure.ours)
        absolute = not statistics.median(figure.theirs)
        ratio = float("nan") if absolute else figure.ratio
        met = "—" if bench.quick else ("yes" if figure.met(ratio, ours) else "**no**")
        note = f" {figure.note}" if figure.note else ""
        ours_text = shown(figure.ours, figure.unit)
        theirs_text = shown(figure.theirs, figure.unit)
        lines.append(
            f"| {figure.name} | {ours_text} | {figure.reference}: {theirs_text} | "
            f"{'—' if absolute else _ratio(ratio)} | {figure.goal} | {met}{note} |"
        )
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
         .splitlines() if line.startswith("model name")), platform.machine()
    )  # fmt: skip
    lines += [
        "",
        "## Method",
        "",
        f"- {bench.rounds} rounds a figure, ours and the reference taken in turn.",
        "- The daemon runs as a systemd service in the sandbox of the tests (a real "
        "systemd, D-Bus and journald), from this checkout; requests come from the "
        "host over loopback.",
        "- References that are commands (`systemd-run`, `systemctl`, `journalctl`) "
        "are timed inside the sandbox, without the cost of entering it.",
        f"- Requests per second: {client_name()}, 8 connections, a few seconds a "
        "round, bounded. Latency: a paced client that sends at a steady rate and "
        "counts each request from when it was due, so that a server falling "
        "behind shows.",
        "- Deploy figures take the time from the POST to the final status on the "
        "deployment's event stream. The targets build as `nobody`, as a target "
        "with a user of its own does; the reference runs bare, with none of the "
        "build unit's protections (NoNewPrivileges, PrivateTmp and the rest), "
        "which systemd pays for in the build's namespace.",
        "- The daemon keeps encoded answers until the history or the log they came "
        "from changes; the requests-per-second figures poll one URL, as clients do, "
        "so they are answered from it. The history figure gives every request a "
        "query string of its own, so that it measures the database.",
        "",
        "## Machine",
        "",
        f"- {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}; "
        f"{platform.platform()}",
        f"- run on {time.strftime('%Y-%m-%d', time.gmtime(started))}, took "
        f"{time.time() - started:.0f} s",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts, no judging")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "RESULTS.md", help="the report"
    )
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    started = time.time()

    from ares_deployd.config import DEFAULT_MAX_STREAMS
    from ares_deployd.daemon import threads_for

    threads = threads_for(DEFAULT_MAX_STREAMS)

    with Sandbox.boot(share=[ROOT, sys.prefix]) as sandbox:
        prepare(sandbox, args.quick)
        daemon = Deployd(sandbox)
        daemon.install(log_level="info")
        stamps = 5 if args.quick else 40
        daemon.configure(TARGETS.replace("STAMPS", str(stamps)))
        daemon.start()
        bare_port = free_port()
        sandbox.run(
            "systemd-run", "--unit=bench-bare", sys.executable,
            str(ROOT / "bench" / "bare.py"), str(bare_port), str(threads),
        )  # fmt: skip
        bare_url = f"http://127.0.0.1:{bare_port}/bare"
        for _ in range(100):
            try:
                requests.get(bare_url, timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.05)
        bare_pid = int(sandbox.systemctl("show", "-P", "MainPID", "bench-bare").stdout)
        bench = Bench(sandbox, daemon, rounds, args.quick)
        some_id = daemon.deploy("true")
        daemon.wait(some_id)

        steps: list[tuple[str, Callable[[], None]]] = [
            ("memory", lambda: bench_memory(bench, bare_pid, bare_url)),
            ("deploy true", lambda: bench_deploy(bench, "true", ["true"], 1.5)),
            ("deploy sleep", lambda: bench_deploy(
                bench, "sleep", ["sleep", "1"], 1.05)),
            ("list rps", lambda: bench_requests(
                bench, "/api/admin/deploys", "/api/admin/deploys", bare_url)),
            ("get rps", lambda: bench_requests(
                bench, f"/api/admin/deploy/{some_id}", "/api/admin/deploy/{id}",
                bare_url)),
            ("history", lambda: bench_history(bench)),
        ]  # fmt: skip
        if bench.has_route(f"/api/admin/deploy/{some_id}/events"):
            steps.insert(3, ("output latency", lambda: bench_output_latency(bench)))
            steps.append(("busy latency", lambda: bench_busy_latency(bench)))
        if bench.has_route("/api/admin/services"):
            steps.append(("services", lambda: bench_services(bench)))
            steps.append(("logs", lambda: bench_logs(bench)))
        for name, step in steps:
            print(f"bench: {name}...", flush=True)
            step()
    write_results(bench, args.out, started)
    print(args.out.read_text())
    print(json.dumps({"figures": len(bench.figures)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
