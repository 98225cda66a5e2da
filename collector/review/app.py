"""The review web app: JSON endpoints over the manifest and one static page, on 127.0.0.1.

    python -m collector.review --manifest crawl/manifest.sqlite [--port 8765] [--no-browser]

Starlette + uvicorn, no template engine, no CDN: the page (static/) is served by this app.
Every write is one SQLite transaction (collector.review.store), so a decision is on disk
before the page shows it, and survives a restart or a kill.
"""

from __future__ import annotations

import sys
import threading
import webbrowser
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from collector.review.store import ImageQuery, ReviewError, ReviewStore
from collector.review.thumbnails import BROKEN_SVG, ThumbnailCache
from service.contract import ImageDecodeError

STATIC = Path(__file__).parent / "static"


class ReviewConfig(BaseModel):
    """Review the collected images in a browser: filter, approve, reject, relabel, undo."""

    manifest: Path = Field(description="the collector's manifest.sqlite (from `collector crawl`), "
                                       "or the collection folder holding it")
    host: str = Field("127.0.0.1", description="interface to listen on; keep it local")
    port: int = Field(8765, ge=0, le=65535, description="port (0 = any free port)")
    browser: bool = Field(True, description="open the page in the default browser "
                                            "(--no-browser to skip)")
    rank: str | None = Field(None, description=(
        "before serving, rank images by how likely their label is wrong with this model: "
        "'imagenet', a trainer run folder, an .onnx path or a BentoML tag "
        "(same as `collector rank`)"))
    thumbnail_dir: Path | None = Field(None, description=(
        "thumbnail cache; default: .review/thumbs beside the manifest"))


class ActionRequest(BaseModel):
    action: Literal["approve", "reject", "relabel", "accept_suggestion", "clear"]
    ids: list[int] = Field(min_length=1, max_length=5000)
    reason: str | None = Field(None, max_length=500)
    label: str | None = Field(None, max_length=100)


class KeepRequest(BaseModel):
    image_id: int


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")


class LocalOnly:
    """Refuse what another web site open in the same browser could send to this local app.

    - Host must be a loopback name while we listen on loopback (DNS rebinding);
    - a POST must be JSON (a cross-site form or text/plain POST is not) and, when the browser
      names its Origin, come from this app's own origin (CSRF).
    """

    def __init__(self, app, check_host: bool = True):
        self.app = app
        self.check_host = check_host

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
        if scope["method"] == "POST":
            origin = headers.get("origin")
            if origin is not None and origin != f"http://{host}":
                return 403, f"cross-origin request from {origin} refused"
            if not headers.get("content-type", "").startswith("application/json"):
                return 415, "POST bodies must be application/json"
        return None


def create_app(manifest: Path, thumbnail_dir: Path | None = None,
               check_host: bool = True) -> Starlette:
    store = ReviewStore(manifest)
    thumbs = ThumbnailCache(thumbnail_dir or store.root / ".review" / "thumbs")

    def index(request: Request) -> Response:
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
                                        label=body.label))

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
    app = Starlette(routes=routes, middleware=[Middleware(LocalOnly, check_host=check_host)],
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
        from collector.review.rank import RankConfig, rank

        result = rank(RankConfig(manifest=config.manifest, model=config.rank))
        print(f"ranked {result['ranked']} images ({result['model']})", file=sys.stderr)
    app = create_app(config.manifest, config.thumbnail_dir,
                     check_host=config.host in LOOPBACK_NAMES)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port,
                                           log_level="warning", access_log=False))
    if config.browser:
        def open_when_up() -> None:
            while not server.started and not server.should_exit:
                threading.Event().wait(0.1)
            if server.started:
                port = server.servers[0].sockets[0].getsockname()[1]
                webbrowser.open(f"http://{config.host}:{port}/")
        threading.Thread(target=open_when_up, daemon=True).start()
    _announce(server, config)
    server.run()


def _announce(server, config: ReviewConfig) -> None:
    """Print the address once the socket is bound (port 0 means we learn it only then)."""
    def wait() -> None:
        while not server.started and not server.should_exit:
            threading.Event().wait(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            print(f"review page: http://{config.host}:{port}/  (Ctrl-C to stop)", flush=True)
    threading.Thread(target=wait, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """`collector review` and `python -m collector.review` call this."""
    from pydantic_settings import CliApp

    from collector.review.rank import _settings_cls

    cli = _settings_cls(ReviewConfig, "collector review")
    parsed = CliApp.run(cli, cli_args=sys.argv[1:] if argv is None else argv)
    config = ReviewConfig.model_validate(parsed.model_dump())
    try:
        serve(config)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
