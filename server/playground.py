"""The playground: a static chat page at `/` and its assets under `/playground/`, read from the installed package.

The page is a client of the public API and nothing more: it posts to /v1/chat/completions with `stream: true`
and reads the SSE itself, so it sees exactly what any OpenAI client sees (errors included). It lives outside
/v1, so it loads without the API key; the key is typed into the page and sent by the page's own requests.

Everything it needs ships in `server/static/` (package data): the Content-Security-Policy below lets the browser
fetch nothing from any other origin, so the page works on a closed network and cannot leak the data URLs of a
user's images to a third party.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from plm_serve.server.errors import APIError

# name under /playground/ (and index.html at /) -> media type
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
}

# Same origin only. data:/blob: for the previews of picked files (object URLs) and the empty favicon;
# connect-src 'self' is the API.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "media-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-cache",  # revalidate: a server upgrade must not keep serving yesterday's script
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


@cache
def read_asset(name: str) -> bytes:
    """The bytes of one file of `plm_serve.server/static/` (read once; the files are a few kB)."""
    return (resources.files("plm_serve.server") / "static" / name).read_bytes()


def _asset_response(name: str) -> Response:
    return Response(read_asset(name), media_type=ASSETS[name], headers=HEADERS)


@router.get("/")
async def page() -> Response:
    return _asset_response("index.html")


@router.get("/playground/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS or name == "index.html":
        raise APIError(404, f"The playground has no file named {name!r}", code="not_found")
    return _asset_response(name)
