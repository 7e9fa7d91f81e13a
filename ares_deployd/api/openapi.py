"""``GET /api/admin/openapi.json``: the API described, as kept beside this module."""

from __future__ import annotations

from pathlib import Path

import falcon

DOCUMENT = Path(__file__).with_name("openapi.json")


class Document:
    """Serves the OpenAPI document; read once, since it changes only on upgrade."""

    def __init__(self, path: Path = DOCUMENT) -> None:
        self._text = path.read_text(encoding="utf-8")

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.text = self._text
