"""The HTTP face of the image server: OpenAI's images endpoint, the image files, a web page.

    POST /v1/images/generations   {"prompt": ..., "n": 1, "size": "256x256",
                                   "response_format": "url" | "b64_json",
                                   "seed": 0, "guidance": 2.0, "rerank": 16}   (last three ours)
    GET  /v1/images/files/<id>.png the images that `url` answers point at (kept in memory, the
                                   newest `stored_images`)
    GET  /                         a page to try prompts in a browser
    GET  /health                   what the server draws (sizes, limits, reranking)

Answers have OpenAI's shape ({"created": ..., "data": [{"url": ...} | {"b64_json": ...}]}),
and so do errors ({"error": {"message", "type", "param", "code"}}): 400 for a bad request,
413 for a body over `max_body_bytes`, 429 when the queue is full, 404 for an unknown image.
OpenAI fields this server has no use for (`model`, `quality`, `style`, `user`, ...) are
accepted and ignored; any other field is an error that names it.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import importlib.resources
import threading
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictInt
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from dalle_jax.serving.batcher import QueueFull
from dalle_jax.serving.images import ImageRequest, RequestError


class GenerationBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    n: StrictInt = 1
    size: str = "1024x1024"
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png"] = "png"
    stream: Literal[False] = False
    seed: StrictInt | None = None
    guidance: float | None = None
    rerank: StrictInt = 0
    # Accepted so that OpenAI clients' requests pass; they change nothing here.
    model: str | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    moderation: str | None = None
    background: str | None = None
    safety_identifier: str | None = None


def openai_error(status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={
        "error": {"message": message, "type": kind, "param": param, "code": code}})


def describe_validation_error(error: RequestValidationError) -> tuple[str, str | None]:
    """The first problem of a body that did not parse, as (message, field)."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = location[0] if location else None
    if first.get("type") == "missing":
        return f"{param} is required", param
    if first.get("type") == "extra_forbidden":
        return f"unknown field {param!r}", param
    if param is None:
        return f"the body is not a JSON object ({first.get('msg')})", None
    return f"{param}: {first.get('msg')}", param


class ImageStore:
    """The newest `capacity` images by id, for `url` answers (older ones expire)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._images: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        key = uuid.uuid4().hex
        with self._lock:
            self._images[key] = png
            while len(self._images) > self.capacity:
                self._images.popitem(last=False)
        return key

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._images.get(key)


class BodyTooLarge(HTTPException):
    # An HTTPException, so that FastAPI's body parsing passes it on unchanged.
    def __init__(self, max_bytes: int):
        super().__init__(413, f"the request body is larger than {max_bytes} bytes")


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` (declared or streamed) stops the request."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        received = 0

        async def limited_receive():
            nonlocal received
            if declared is not None and int(declared) > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


def make_app(service, *, max_body_bytes: int = 64 * 1024, stored_images: int = 1024) -> FastAPI:
    """The FastAPI app serving `service` (an `images.ImageService`)."""
    app = FastAPI(title="dalle_jax images", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    store = ImageStore(stored_images)
    page = importlib.resources.files("dalle_jax.serving").joinpath("page.html").read_text()

    @app.exception_handler(RequestValidationError)
    async def bad_body(request, error):
        message, param = describe_validation_error(error)
        return openai_error(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request, error):
        code = "request_too_large" if error.status_code == 413 else None
        return openai_error(error.status_code, str(error.detail), code=code)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", "waiting": service.batcher.waiting, **service.describe()}

    @app.get("/v1/images/files/{name}")
    async def image_file(name: str):
        png = store.get(name.removesuffix(".png"))
        if png is None:
            return openai_error(404, f"no image {name!r} (images expire after the newest "
                                f"{stored_images})", param="name")
        return Response(png, media_type="image/png")

    @app.post("/v1/images/generations")
    async def generations(body: GenerationBody, request: Request):
        wanted = ImageRequest(prompt=body.prompt, n=body.n,
                              size="1024x1024" if body.size == "auto" else body.size,
                              seed=body.seed, guidance=body.guidance, rerank=body.rerank)
        try:
            future, wanted = service.submit(wanted)
        except RequestError as error:
            return openai_error(400, str(error), param=error.param)
        except QueueFull as error:
            return openai_error(429, f"the server is busy: {error}; retry later",
                                kind="requests", code="rate_limit_exceeded")
        try:
            drawn = await asyncio.wrap_future(future)
            pngs = await run_in_threadpool(service.finish, wanted, drawn)
        except Exception as error:  # noqa: BLE001 - the client gets an answer, the server lives
            return openai_error(500, f"drawing failed: {error!r}", kind="server_error")
        if body.response_format == "b64_json":
            data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in pngs]
        else:
            base = str(request.base_url).rstrip("/")
            data = [{"url": f"{base}/v1/images/files/{store.put(png)}.png"} for png in pngs]
        for item in data:
            item["revised_prompt"] = wanted.prompt
        return {"created": int(time.time()), "data": data, "seed": wanted.seed,
                "guidance": wanted.guidance}

    return app
