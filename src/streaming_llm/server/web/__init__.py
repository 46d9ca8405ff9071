"""The web chat page: `GET /` and its static files under `/web/` (plain HTML, CSS and JS, no
build step, no CDN; the files ship in the package).

The page talks to the server only through the public API (`/v1/chat/completions` streamed,
`/v1/sessions/{id}`), with the API key the user types in. What it serves itself needs no key and
holds nothing secret: the page, its script and style, and the model name and streaming settings
(sinks, window) written into the page so it can draw the cache before the first reply.
It does NOT render markdown, keep conversations on the server beyond the API's own sessions,
or know anything about how sessions are stored.
"""

from __future__ import annotations

import json
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PATHS = ("/", *(f"/web/{name}" for name in FILES))  # open without an API key


def _read(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def mount_web(app: FastAPI, model_name: str, config) -> tuple[str, ...]:
    """Add the page's routes to `app`; returns their paths (for the API-key middleware to leave open)."""
    page_config = {"model": model_name, "sinks": getattr(config, "sinks", None), "window": getattr(config, "window", None),
                   "method": getattr(config, "method", None)}
    # "</" cannot end the script element early: json.dumps output with it escaped
    blob = json.dumps(page_config).replace("</", "<\\/")
    page = _read("index.html").replace("{{CONFIG}}", blob)

    @app.get("/", include_in_schema=False)
    async def web_page():
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    for name, media_type in FILES.items():
        body = _read(name)

        def serve(body=body, media_type=media_type):
            return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})

        app.add_api_route(f"/web/{name}", serve, methods=["GET"], include_in_schema=False)
    return PATHS
