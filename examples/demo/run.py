"""``make run``: ares-deployd with three demo services in a throwaway systemd.

Boots a sandbox, installs small real services ``ares``, ``eruka`` and ``admin``
(the HTTP server beside this file, and a static page), installs the daemon as a
systemd service from this checkout, prints how to reach it, and waits. Ctrl-C
powers the sandbox off; nothing it did stays on this machine.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.deployd import Deployd, free_port  # noqa: E402
from tests.sandbox import Sandbox, SandboxError  # noqa: E402

DEMO = "/srv/demo"
SERVER = ROOT / "examples" / "demo" / "server.py"
UPSTREAM = f"{DEMO}/upstream"

SERVICE_UNIT = """\
[Unit]
Description=demo {name} service

[Service]
WorkingDirectory={demo}/{name}/live
# Each start publishes the latest build: that is what a deployment restarts for.
ExecStartPre=/bin/cp -rT {demo}/{name}/dist {demo}/{name}/live
ExecStart=/usr/bin/python3 {demo}/{name}/live/server.py {port} {name}
User=demo
"""

STATIC_UNIT = """\
[Unit]
Description=demo admin dashboard (static files)

[Service]
# A static frontend: nothing runs, the unit only publishes the latest build.
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/cp -r {demo}/admin/dist/. {demo}/admin/live/
"""

# A short real build: check the code compiles, stamp a version, stage it.
BUILD_STEPS = """\
steps = [
    "echo Pulling latest changes...; cp {upstream}/server.py src/server.py",
    "echo Compiling...; python3 -m py_compile src/server.py",
    "mkdir -p dist && cp src/server.py dist/ && date -u +%FT%TZ > dist/VERSION",
]
"""

CONFIG = """\
[targets.ares]
description = "ARES backend: pulls latest code, rebuilds, and restarts"
working_directory = "{demo}/ares"
user = "demo"
{steps}restart = "ares.service"
health_url = "http://127.0.0.1:{ares}/health"

[targets.eruka]
description = "Eruka backend: pulls, rebuilds, and restarts"
working_directory = "{demo}/eruka"
user = "demo"
{steps}restart = "eruka.service"
health_url = "http://127.0.0.1:{eruka}/health"

[targets.admin]
description = "admin dashboard: rebuilds the frontend"
working_directory = "{demo}/admin"
user = "demo"
steps = ["echo Building frontend...; mkdir -p dist && date -u > dist/index.html"]
restart = "dirmacs-admin.service"

[services.ares]
unit = "ares.service"
port = {ares}
health_url = "http://127.0.0.1:{ares}/health"

[services.eruka]
unit = "eruka.service"
health_url = "http://127.0.0.1:{eruka}/health"

[services.admin]
unit = "dirmacs-admin.service"
"""


def install_demo(sandbox: Sandbox, ports: dict[str, int]) -> str:
    """Create the demo user, services and their first build; the daemon's config."""
    sandbox.run("useradd", "--system", "--no-create-home", "demo")
    # What the builds pull from, where the demo user can read it wherever the
    # checkout lies.
    sandbox.run("install", "-D", "-m", "0644", str(SERVER), f"{UPSTREAM}/server.py")
    for name in ("ares", "eruka", "admin"):
        for sub in ("src", "dist", "live"):
            sandbox.run("install", "-d", "-o", "demo", f"{DEMO}/{name}/{sub}")
    for name in ("ares", "eruka"):
        sandbox.run("install", "-o", "demo", str(SERVER), f"{DEMO}/{name}/live/")
        unit = SERVICE_UNIT.format(demo=DEMO, name=name, port=ports[name])
        sandbox.write(f"/etc/systemd/system/{name}.service", unit)
    sandbox.write(
        "/etc/systemd/system/dirmacs-admin.service", STATIC_UNIT.format(demo=DEMO)
    )
    sandbox.systemctl("daemon-reload")
    sandbox.systemctl("start", "ares.service", "eruka.service", "dirmacs-admin")
    steps = BUILD_STEPS.format(upstream=UPSTREAM)
    return CONFIG.format(demo=DEMO, steps=steps, **ports)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=3001, help="the API's port")
    args = parser.parse_args()

    print("Booting a throwaway systemd...", flush=True)
    try:
        sandbox = Sandbox.boot(share=[ROOT, sys.prefix])
    except SandboxError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    with sandbox:
        ports = {"ares": free_port(), "eruka": free_port()}
        daemon = Deployd(sandbox, port=args.port)
        daemon.install()
        daemon.configure(install_demo(sandbox, ports))
        daemon.start()

        print(
            f"""
ares-deployd runs as a systemd service in a sandbox (PID 1 is host pid
{sandbox.pid}); ares and eruka answer on 127.0.0.1:{ports["ares"]} and
:{ports["eruka"]}.

  Base URL:      {daemon.base_url}
  Admin secret:  {daemon.secret}

Try:

  curl -X POST {daemon.base_url}/api/admin/deploy \\
    -H "X-Admin-Secret: {daemon.secret}" \\
    -H "Content-Type: application/json" \\
    -d '{{"target": "ares"}}'

  curl {daemon.base_url}/api/admin/deploys -H "X-Admin-Secret: {daemon.secret}"

Inside the sandbox: nsenter -t {sandbox.pid} -a journalctl -u ares-deployd -f
Ctrl-C powers the sandbox off.""",
            flush=True,
        )
        # Set both: a shell that starts us in the background ignores SIGINT.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: sys.exit(0))
        try:
            while sandbox.run("true", check=False).returncode == 0:
                time.sleep(5)
        except SystemExit:
            print("\nPowering the sandbox off...", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
