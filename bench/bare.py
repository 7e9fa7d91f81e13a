"""The reference server of the benchmarks: one Falcon route of constant JSON.

Served by waitress with the daemon's own settings, so that what the daemon costs
beyond it is what the comparison shows. Usage: bare.py PORT THREADS. It imports
nothing of ares-deployd, so its memory is the framework's alone.
"""

from __future__ import annotations

import sys

import falcon
import waitress

BODY = {"deploys": [{"id": "0", "target": "ares", "status": "success"}]}


class Constant:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = BODY


def main() -> None:
    app = falcon.App()
    app.add_route("/bare", Constant())
    waitress.serve(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        threads=int(sys.argv[2]),
        ident="bare",
        _quiet=True,
    )


if __name__ == "__main__":
    main()
