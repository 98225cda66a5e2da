"""The review web app: JSON endpoints over the manifest and one static page, on 127.0.0.1.

    collector review --data collected [--port 8765] [--no-browser]

Starlette + uvicorn, no template engine, no CDN: the page (static/) is served by this app.
Every write is one SQLite transaction (collector.review.store), so a decision is on disk
before the page shows it, and survives a restart or a kill. Image files are served only
from inside the collection's image store. On loopback the Host check stops DNS rebinding;
on any other interface (`--host 0.0.0.0`) the Host cannot be checked, so every request needs
the token printed at start (`/?token=...` once sets a cookie; scripts send
`Authorization: token ...`), as Jupyter does.
"""

from __future__ import annotations

import hmac
import secrets
import socket
import sys
import threading
import webbrowser
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs

from pydantic import BaseModel, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from collector.review.config import RankConfig, ReviewConfig
from collector.review.store import ImageQuery, ReviewError, ReviewStore
from collector.review.thumbnails import BROKEN_SVG, ThumbnailCache
from service.contract import ImageDecodeError

STATIC = Path(__file__).parent / "static"


class ActionRequest(BaseModel):
    action: Literal["approve", "reject", "relabel", "accept_suggestion", "clear", "set_attribute"]
    ids: list[int] = Field(min_length=1, max_length=5000)
    reason: str | None = Field(None, max_length=500)
    label: str | None = Field(None, max_length=100)
    # set_attribute: which attribute, and its value (null: back to the title rules' value)
    attribute: str | None = Field(None, max_length=64)
    value: str | None = Field(None, max_length=100)


class KeepRequest(BaseModel):
    image_id: int


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")
TOKEN_COOKIE = "review_token"


class LocalOnly:
    """Refuse what another web site open in the same browser could send to this local app.

    - Host must be a loopback name while we listen on loopback (DNS rebinding);
    - with a token (any other interface), every request must carry it: cookie, `?token=`
      or `Authorization: token ...`;
    - a POST must be JSON (a cross-site form or text/plain POST is not) and, when the browser
      names its Origin, come from this app's own origin (CSRF).
    """

    def __init__(self, app, check_host: bool = True, token: str | None = None):
        self.app = app
        self.check_host = check_host
        self.token = token

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            problem = self._problem(scope)
            if problem:
                status, message = problem
                await JSONResponse({"error": message}, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _problem(self, scope) -> tuple[int, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
        if self.check_host and name not in LOOPBACK_NAMES:
            return 403, f"host {host!r} refused: the review app answers on 127.0.0.1 only"
        if self.token is not None and not self._has_token(scope, headers):
            return 403, ("this review page needs its token: open the address printed when "
                         "it started (http://HOST:PORT/?token=...), or send "
                         "'Authorization: token ...'")
        if scope["method"] == "POST":
            origin = headers.get("origin")
            if origin is not None and origin != f"http://{host}":
                return 403, f"cross-origin request from {origin} refused"
            if not headers.get("content-type", "").startswith("application/json"):
                return 415, "POST bodies must be application/json"
        return None

    def _has_token(self, scope, headers: dict[str, str]) -> bool:
        offered = []
        for pair in headers.get("cookie", "").split(";"):   # a malformed one is no token
            name, _, value = pair.strip().partition("=")
            if name == TOKEN_COOKIE:
                offered.append(value)
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "token":
            offered.append(value.strip())
        offered.append(_query_token(scope) or "")
        # Constant-time comparison: the token must not leak through response timing.
        return any(hmac.compare_digest(o.encode(), self.token.encode()) for o in offered if o)


def _query_token(scope) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
    return values[0] if values else None


def create_app(manifest: Path, thumbnail_dir: Path | None = None,
               check_host: bool = True, token: str | None = None) -> Starlette:
    """The app; `token` (required on a non-loopback interface) guards every request."""
    store = ReviewStore(manifest)
    thumbs = ThumbnailCache(thumbnail_dir or store.root / ".review" / "thumbs")

    def index(request: Request) -> Response:
        if token is not None and "token" in request.query_params:
            # The printed link: keep the token in a cookie and take it out of the address bar.
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    def summary(request: Request) -> Response:
        return JSONResponse(store.summary())

    def labels(request: Request) -> Response:
        return JSONResponse({"labels": store.labels()})

    def images(request: Request) -> Response:
        params = dict(request.query_params)
        for key in ("label", "shop", "text", "cursor", "group", "min_suspect"):
            if params.get(key) == "":
                params.pop(key)
        query = _validated(ImageQueryModel, params)
        page = store.list_images(ImageQuery(**query.model_dump()))
        return JSONResponse({"items": page.items, "total": page.total,
                             "next_cursor": page.next_cursor})

    def image(request: Request) -> Response:
        return JSONResponse(store.get(request.path_params["image_id"]))

    def thumbnail(request: Request) -> Response:
        path, key = store.file_for(request.path_params["image_id"])
        try:
            thumb = thumbs.path_for(key, path)
        except ImageDecodeError as exc:
            return Response(BROKEN_SVG.format(reason=exc.reason), media_type="image/svg+xml",
                            headers={"Cache-Control": "no-cache"})
        # Keyed by content hash: the bytes behind this URL never change.
        return FileResponse(thumb, media_type="image/jpeg",
                            headers={"Cache-Control": "private, max-age=86400"})

    def original(request: Request) -> Response:
        path, _ = store.file_for(request.path_params["image_id"])
        if not path.is_file():
            raise HTTPException(404, f"file {path.name} is gone from the store")
        return FileResponse(path)

    async def action(request: Request) -> Response:
        body = _validated(ActionRequest, await _json(request))
        return JSONResponse(store.apply(body.action, body.ids, reason=body.reason,
                                        label=body.label, attribute=body.attribute,
                                        value=body.value))

    def undo(request: Request) -> Response:
        return JSONResponse(store.undo())

    def history(request: Request) -> Response:
        return JSONResponse({"history": store.history()})

    def groups(request: Request) -> Response:
        kind = request.query_params.get("kind", "all")
        if kind not in ("all", "duplicate", "conflict"):
            raise ReviewError(f"kind must be all, duplicate or conflict, not {kind!r}")
        cursor = request.query_params.get("cursor")
        return JSONResponse(store.groups(kind, int(cursor) if cursor else None))

    async def keep(request: Request) -> Response:
        body = _validated(KeepRequest, await _json(request))
        return JSONResponse(store.keep_one(request.path_params["group_id"], body.image_id))

    async def review_error(request: Request, exc: Exception) -> Response:
        status = 404 if str(exc).startswith(("no image", "image ")) else 400
        return JSONResponse({"error": str(exc)}, status_code=status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    routes = [
        Route("/", index),
        Route("/api/summary", summary),
        Route("/api/labels", labels),
        Route("/api/images", images),
        Route("/api/images/{image_id:int}", image),
        Route("/api/images/{image_id:int}/thumb", thumbnail),
        Route("/api/images/{image_id:int}/file", original),
        Route("/api/actions", action, methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"]),
        Route("/api/history", history),
        Route("/api/groups", groups),
        Route("/api/groups/{group_id:int}/keep", keep, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes,
                    middleware=[Middleware(LocalOnly, check_host=check_host, token=token)],
                    exception_handlers={ReviewError: review_error, HTTPException: http_error})
    app.state.store = store
    return app


class ImageQueryModel(BaseModel):
    """Query string of /api/images, checked (a typo gives a 400 that names it)."""

    model_config = {"extra": "forbid"}
    label: str | None = None
    review: Literal["all", "todo", "approved", "rejected", "relabelled"] = "all"
    status: Literal["all", "ok", "duplicate", "conflict", "downloaded"] = "all"
    shop: str | None = None
    group: int | None = None
    min_suspect: float | None = Field(None, ge=0, le=1)
    confident_only: bool = False
    text: str | None = Field(None, max_length=200)
    title: Literal["all", "off_topic", "on_topic"] = "all"
    sort: Literal["id", "suspect"] = "id"
    cursor: str | None = None
    limit: int = Field(60, ge=1, le=500)


def _validated(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                             for e in exc.errors())
        raise ReviewError(problems) from None


async def _json(request: Request) -> dict:
    try:
        data = await request.json()
    except ValueError:
        raise ReviewError("body must be JSON") from None
    if not isinstance(data, dict):
        raise ReviewError("body must be a JSON object")
    return data


def serve(config: ReviewConfig) -> None:
    import uvicorn

    if config.rank:
        from collector.review.rank import rank

        result = rank(RankConfig(data=config.data, model=config.rank))
        print(f"ranked {result['ranked']} images ({result['model']})", file=sys.stderr)
    local = config.host in LOOPBACK_NAMES
    # Off loopback anyone on the network could reach the page: a fresh token per start.
    token = None if local else secrets.token_urlsafe(24)
    app = create_app(config.data, config.thumbnail_dir, check_host=local, token=token)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port,
                                           log_level="warning", access_log=False))
    _announce(server, config, token)
    server.run()


def _announce(server, config: ReviewConfig, token: str | None) -> None:
    """Print the address once the socket is bound (port 0 means we learn it only then), and
    open it in the browser if asked."""
    def wait() -> None:
        while not server.started and not server.should_exit:
            threading.Event().wait(0.05)
        if not server.started:
            return
        port = server.servers[0].sockets[0].getsockname()[1]
        host = config.host
        if host in ("0.0.0.0", "::", ""):    # every interface: name one others can use
            host = socket.gethostname()
        elif ":" in host and not host.startswith("["):
            host = f"[{host}]"
        url = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
        print(f"review page: {url}  (Ctrl-C to stop)", flush=True)
        if token:
            print("  listening beyond this machine: the page needs the token in that link",
                  flush=True)
        if config.browser:
            webbrowser.open(url)
    threading.Thread(target=wait, daemon=True).start()
