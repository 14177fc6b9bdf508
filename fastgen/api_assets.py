"""The API's documentation pages (/docs, /redoc) and the site's icon, served by the service itself.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so they are blank wherever the internet cannot be
reached; fastapi-offline ships both in its wheel (with an icon) and serves them from a static mount.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi_offline import FastAPIOffline

DOCS_URL, REDOC_URL = "/docs", "/redoc"
ASSETS_URL = "/docs/assets"  # swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png
ICON = files("fastapi_offline") / "static" / "favicon.png"
# Only this service: ReDoc's bundle still asks a CDN for the Redocly logo in its menu (and hides it when refused).
SAME_ORIGIN_ONLY = b"default-src 'self' 'unsafe-inline' data: blob:"


def create_app(**fastapi: Any) -> FastAPI:
    """``FastAPI(**fastapi)`` with /docs and /redoc on the packaged copies, and /favicon.ico for every page."""
    app = FastAPIOffline(docs_url=DOCS_URL, redoc_url=REDOC_URL, static_url=ASSETS_URL, **fastapi)
    app.add_middleware(SameOriginOnly, paths={DOCS_URL, REDOC_URL})

    # Browsers ask the site's root for its icon; Gradio serves one only when the page is mounted at "/".
    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(str(ICON), media_type="image/png")

    return app


class SameOriginOnly:
    """Answers the docs pages with a Content-Security-Policy under which the browser loads nothing from elsewhere."""

    def __init__(self, app, paths: set[str]):
        self.app, self.paths = app, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].removeprefix(scope.get("root_path", "")) not in self.paths:
            return await self.app(scope, receive, send)

        async def with_policy(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"content-security-policy", SAME_ORIGIN_ONLY)]
            await send(message)

        await self.app(scope, receive, with_policy)
