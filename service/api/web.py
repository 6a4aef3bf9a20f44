"""The status page: ``GET /`` (index.html) and ``GET /static/{name}`` (its script and stylesheet).

Plain files from ``service/web/``, no build step. The page itself needs no token: it asks the
user for one and calls the JSON API (and the SSE streams) with it. Only the names in ``ASSETS``
are served -- a fixed allow-list, so no path ever reaches the file system from a request.

Every answer carries a strict Content-Security-Policy (scripts and styles from this origin only,
no inline code, connections to this origin only) and ``Referrer-Policy: no-referrer``, since the
page puts the token into EventSource URLs.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from litestar import Controller, Response, get
from litestar.exceptions import NotFoundException

# name -> content type; nothing else is served.
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Small files, revalidated on every load: a new release shows at once.
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return resources.files("service").joinpath("web").joinpath(name).read_bytes()


def asset(name: str) -> Response[bytes]:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFoundException("not found")
    return Response(_read(name), media_type=media_type, headers=SECURITY_HEADERS)


class WebController(Controller):
    path = "/"
    include_in_schema = False

    @get("/", summary="The status page")
    async def index(self) -> Response[bytes]:
        return asset("index.html")

    @get("/static/{name:str}", summary="The status page's script and stylesheet")
    async def static(self, name: str) -> Response[bytes]:
        return asset(name)
