"""The web playground of `serve.openai` (issue #33): a page at `/` that chats with the base, an adapter or a weighted
mix (sliders compose the `model` string), compares 2-4 models on one prompt, loads and unloads adapters and shows
/metrics live. Plain files beside this module (index.html, app.js, style.css: no build step, nothing from the
network), calling the same public API as any client; `python -m serve.openai --ui 0` leaves the page out.

    mount(app, auth=False)

registers GET / (the page, under a strict Content-Security-Policy: no inline script, requests to this origin only),
GET /ui/app.js and /ui/style.css. The page lists the adapters it can load with the API's GET /v1/adapters (serve.app,
behind the API key like the other API routes). `PUBLIC` names the page's paths,
which need no key (they hold no data: the page asks for the key and keeps it in the browser's session storage; the
server never puts it in the page).
"""
from __future__ import annotations

from importlib import resources

FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PUBLIC = frozenset({"/"} | {f"/ui/{name}" for name in FILES})  # the page and its files: served without the key
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def read(name: str) -> bytes:
    """One of the page's files, from the installed package (a wheel carries them as package data)."""
    return resources.files(__name__).joinpath(name).read_bytes()


def is_public(path: str) -> bool:
    return path in PUBLIC


def mount(app, *, auth: bool = False) -> None:
    """Add the playground's routes to `app` (build_app's FastAPI app). `auth`: the server wants an API key, so the
    page asks for one before its first request."""
    from fastapi.responses import Response

    html = read("index.html").decode().replace('data-auth="0"', f'data-auth="{int(bool(auth))}"')
    files = {name: read(name) for name in FILES}

    @app.get("/", include_in_schema=False)
    async def index():
        return Response(html, media_type="text/html; charset=utf-8",
                        headers={**HEADERS, "Content-Security-Policy": CSP})

    @app.get("/ui/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in files:
            return Response(status_code=404)
        return Response(files[name], media_type=FILES[name], headers=HEADERS)
