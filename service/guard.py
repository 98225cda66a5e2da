"""ASGI middleware in front of the image endpoints: bad requests get a clear 4xx, never a 500.

BentoML parses multipart bodies itself and answers some malformed ones with a 500 (a binary part
under an unexpected field name is fed to `json.loads` -> UnicodeDecodeError), and fetches any
URL sent as text in a file field. This guard checks the body once before BentoML sees it: byte
limits (413), field names and kinds, the number of images (400). It also sheds load: past
`max_concurrency` requests in flight it answers 429 at once, and it adds Retry-After to every
429/503 so that clients back off instead of piling up. (BentoML's own `max_concurrency` answers
429 from a middleware outside this one, where no Retry-After can be added.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from service.schemas import ErrorBody

FORM_SLACK_BYTES = 64 * 1024  # multipart headers and small form fields around the images


@dataclass(frozen=True)
class ImageRoute:
    """What one POST endpoint accepts: its file field, the most files, its other form fields."""
    file_field: str
    max_files: int
    other_fields: frozenset[str]


class GuardError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


async def send_error(send, status: int, reason: str, message: str,
                     headers: dict[str, str] | None = None) -> None:
    body = ErrorBody(error=message, reason=reason).model_dump_json().encode()
    raw_headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class ApiKeys:
    """Bearer keys a request must present, held only as SHA-256 digests.

    Every key is compared (no early exit) with hmac.compare_digest on equal-length digests, so
    the answer's timing says neither which key nor how much of one matched. Keys are never
    logged or echoed.
    """

    def __init__(self, keys: list[str], open_paths: frozenset[str]):
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]
        self.open_paths = open_paths

    def __bool__(self) -> bool:
        return bool(self._digests)

    def allows(self, scope) -> bool:
        if not self._digests or scope["path"].rstrip("/") in self.open_paths:
            return True
        value = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return False
        presented = hashlib.sha256(token.strip()).digest()
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(presented, digest)
        return matched


class RequestGuard:
    def __init__(self, app, *, routes: dict[str, ImageRoute], max_image_bytes: int,
                 max_concurrency: int, retry_after_s: int, api_keys: ApiKeys | None = None,
                 on_reject: Callable[[str], None] = lambda reason: None):
        self.app = app
        self.api_keys = api_keys
        self.on_reject = on_reject  # e.g. a Prometheus counter by reason
        self.routes = routes
        self.max_image_bytes = max_image_bytes
        self.max_concurrency = max_concurrency
        self.in_flight = 0  # one event loop per worker: a plain counter is enough
        self.retry_after = str(retry_after_s).encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self._with_retry_after(send)
        if self.api_keys and not self.api_keys.allows(scope):  # before any body is read
            self.on_reject("unauthorized")
            return await send_error(
                send, 401, "unauthorized",
                "send a valid API key as 'Authorization: Bearer <key>' (keys are set with "
                "CLASSIFIER_API_KEYS or CLASSIFIER_API_KEY_FILE on the server)",
                headers={"WWW-Authenticate": 'Bearer realm="product-classifier"'})
        route = self.routes.get(scope["path"].rstrip("/") or "/")
        if route is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_concurrency:
            self.on_reject("too_many_requests")
            return await send_error(send, 429, "too_many_requests",
                                    f"{self.in_flight} requests in flight, the limit is "
                                    f"{self.max_concurrency}; retry shortly")
        self.in_flight += 1
        try:
            body = await self._read_body(scope, receive, route)
            await self._check_form(scope, body, route)
            await self.app(scope, _replay(body, receive), send)
        except GuardError as error:
            self.on_reject(error.reason)
            await send_error(send, error.status, error.reason, error.message)
        finally:
            self.in_flight -= 1

    def _with_retry_after(self, send):
        async def send_with_retry_after(message) -> None:
            if message["type"] == "http.response.start" and message["status"] in (429, 503):
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers.append((b"retry-after", self.retry_after))
                message = {**message, "headers": headers}
            await send(message)
        return send_with_retry_after

    async def _read_body(self, scope, receive, route: ImageRoute) -> bytes:
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if not content_type.lower().startswith("multipart/form-data"):
            raise GuardError(415, "not_multipart",
                             f"send the photo as multipart/form-data in the field "
                             f"'{route.file_field}' (got Content-Type '{content_type or 'none'}')")
        limit = self.max_image_bytes * route.max_files + FORM_SLACK_BYTES
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise GuardError(413, "request_too_large",
                             f"request body is {int(declared)} bytes, the limit is {limit}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise GuardError(400, "client_disconnected", "the client went away mid-body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # a lying or absent Content-Length: stop reading, do not buffer
                raise GuardError(413, "request_too_large",
                                 f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _check_form(self, scope, body: bytes, route: ImageRoute) -> None:
        if not body:
            raise GuardError(400, "empty_body",
                             f"the request has no body; send the photo in the field "
                             f"'{route.file_field}'")
        request = Request(dict(scope), _replay(body, None))
        try:
            form = await request.form(max_files=route.max_files, max_fields=16)
        except HTTPException as exc:  # Starlette's MultiPartException, as a 400
            if "many files" in str(exc.detail).lower():
                raise GuardError(400, "too_many_images",
                                 f"at most {route.max_files} images per request") from exc
            raise GuardError(400, "malformed_multipart", f"unreadable form: {exc.detail}") from exc
        except Exception as exc:
            raise GuardError(400, "malformed_multipart", f"unreadable form: {exc}") from exc
        try:
            self._check_fields(form, route)
        finally:
            await form.close()

    def _check_fields(self, form, route: ImageRoute) -> None:
        allowed = route.other_fields | {route.file_field}
        unknown = sorted(set(form.keys()) - allowed)
        if unknown:
            raise GuardError(400, "unknown_field",
                             f"unexpected form field(s) {unknown}; send the photo in the field "
                             f"'{route.file_field}' (other fields: {sorted(route.other_fields)})")
        files = form.getlist(route.file_field)
        if not files:
            raise GuardError(400, "missing_image", f"no '{route.file_field}' field in the form")
        if len(files) > route.max_files:
            raise GuardError(400, "too_many_images",
                             f"{len(files)} images, at most {route.max_files} per request")
        for index, part in enumerate(files):
            if not isinstance(part, UploadFile):
                # BentoML would fetch a URL given here: the service only takes uploaded bytes.
                raise GuardError(400, "not_a_file",
                                 f"'{route.file_field}' #{index} is a text field; upload the "
                                 "image file itself (URLs are not fetched)")
            if part.size is not None and part.size > self.max_image_bytes:
                raise GuardError(413, "image_too_large",
                                 f"'{part.filename}' is {part.size} bytes, the limit is "
                                 f"{self.max_image_bytes}")
        for name in route.other_fields:
            if isinstance(form.get(name), UploadFile):
                raise GuardError(400, "not_a_value", f"'{name}' must be a plain form value")


class DecodeBusy(Exception):
    """This process is already decoding as many pixels as its budget allows."""


class PixelBudget:
    """Pixels being decoded at once in this process: what bounds decode memory.

    A PNG of one colour is a few hundred kB on the wire and 49 MP (200 MB) decoded, so byte
    limits alone let a handful of requests take gigabytes. Each image holds its share (width x
    height from its header) from before its decode until its thread is done with it, even if
    the request is cancelled meanwhile. Whoever fits goes first: a small photo is not queued
    behind a huge one; one that cannot get its share within `wait_s` raises DecodeBusy.
    """

    def __init__(self, capacity: int, wait_s: float, threads: int | None = None):
        self.capacity, self.wait_s, self.threads = capacity, wait_s, threads
        self.in_use = 0
        self.peak = 0  # high-water mark, exported as a metric
        self._waiters: set[asyncio.Future] = set()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def run(self, pixels: int, fn: Callable, *args):
        """`fn(*args)` in a decode thread once `pixels` fit in the budget."""
        if pixels > self.capacity:
            raise ValueError(f"{pixels} pixels can never fit a budget of {self.capacity}")
        loop = asyncio.get_running_loop()
        await self._acquire(pixels, loop)
        if self._executor is None:  # made in the worker process, not at import
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.threads, thread_name_prefix="decode")
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._release(pixels)
            raise
        # Released when the thread is done, not when the awaiting task is: a cancelled request
        # must not free memory that a decode still holds.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release, pixels))
        return await asyncio.wrap_future(future)

    async def _acquire(self, pixels: int, loop) -> None:
        deadline = loop.time() + self.wait_s
        while self.in_use + pixels > self.capacity:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DecodeBusy(f"{self.in_use} of {self.capacity} pixels are being decoded; "
                                 f"{pixels} more do not fit, retry shortly")
            waiter = loop.create_future()
            self._waiters.add(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                pass  # the loop condition decides
            finally:
                self._waiters.discard(waiter)
        self.in_use += pixels
        self.peak = max(self.peak, self.in_use)

    def _release(self, pixels: int) -> None:
        self.in_use -= pixels
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


def _replay(body: bytes, receive):
    """A `receive` that hands the buffered body on once, then waits on the real client."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if receive is None:
            return {"type": "http.disconnect"}
        return await receive()
    return replay
