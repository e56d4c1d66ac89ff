"""The HTTP side (Starlette): the OpenAI Images API route, /v1/models, /health, /metrics, the bearer key, the body
limit, and the wait for a request's images that ends early when its client disconnects or its time is up."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import time

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .schema import ApiError, parse_body
from .service import Service

CLIENT_GONE = 499  # the nginx convention: the client closed the connection before the answer


def error_response(service: Service, error: ApiError) -> JSONResponse:
    service.metrics.error(error.metric)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def not_ready(service: Service) -> ApiError:
    if service.state == "stopping":
        return ApiError(503, "the server is shutting down: retry on another instance", kind="server_error",
                        code="shutting_down", metric="shutting_down")  # fmt: skip
    if service.state == "failed":
        return ApiError(503, "the model failed to load (see the server's log)", kind="server_error",
                        code="model_failed", metric="not_ready")  # fmt: skip
    return ApiError(503, "the model is still loading: retry shortly", kind="server_error", code="model_loading",
                    headers={"Retry-After": "5"}, metric="not_ready")  # fmt: skip


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` bytes (from Content-Length, or while it
    streams in when there is none)."""
    too_large = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes",
                         code="body_too_large", metric="body_too_large")  # fmt: skip
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(receive):
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(service: Service, lifespan=None) -> Starlette:
    """The ASGI app serving `service`."""

    async def generations(request: Request) -> Response:
        arrived = time.monotonic()
        try:
            if not service.ready:
                raise not_ready(service)
            body = parse_body(await read_body(request, service.limits.max_body_bytes))
            work = await run_in_threadpool(service.admit, body)
        except ApiError as e:
            return error_response(service, e)
        images = asyncio.wrap_future(work.future)
        gone = asyncio.ensure_future(_disconnected(request.receive))
        remaining = service.limits.request_timeout_s - (time.monotonic() - arrived)
        done, _ = await asyncio.wait({images, gone}, timeout=max(0.0, remaining), return_when=asyncio.FIRST_COMPLETED)
        if images not in done:
            service.batcher.cancel(work)
            images.cancel()
            gone.cancel()
            if gone in done:  # nobody reads this answer
                service.metrics.error("disconnected")
                return Response(status_code=CLIENT_GONE)
            limit = service.limits.request_timeout_s
            return error_response(service, ApiError(504, f"the request took longer than this server's limit of "
                                                         f"{limit:g} s (--request-timeout): lower n, size or steps",
                                                    kind="server_error", code="timeout", metric="timeout"))
        gone.cancel()
        try:
            pngs = images.result()
        except ApiError as e:
            return error_response(service, e)
        service.metrics.answered(time.monotonic() - arrived, len(pngs))
        s = work.request.job.settings
        data = [{"b64_json": base64.b64encode(png).decode("ascii"), "seed": seed}
                for (_, png), seed in zip(pngs, work.request.seeds)]
        return JSONResponse({"created": int(time.time()), "data": data, "output_format": "png",
                             "size": f"{s.width}x{s.height}"})  # fmt: skip

    def model_card() -> dict:
        return {"id": service.name, "object": "model", "created": service.created, "owned_by": "fastsd35"}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        if request.path_params["model"] != service.name:
            return error_response(service, ApiError(404, f"model {request.path_params['model']!r} is not served "
                                                         f"here: this server serves {service.name!r}",
                                                    code="model_not_found", metric="not_found"))
        return JSONResponse(model_card())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": service.state}, status_code=200 if service.ready else 503)

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no such endpoint: {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(service, ApiError(exc.status_code, message, headers=exc.headers,
                                                metric="not_found" if exc.status_code == 404 else "bad_request"))

    async def internal_error(request: Request, exc: Exception) -> Response:
        return error_response(service, ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error",
                                                metric="internal"))

    routes = [
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: internal_error})  # fmt: skip
    return BearerKey(app, service) if service.api_key else app


class BearerKey:
    """ASGI middleware: every path but /health needs `Authorization: Bearer KEY` (compared in constant time, on
    digests so that not even the key's length shows); 401 otherwise."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service
        self.expected = hashlib.sha256(f"Bearer {service.api_key}".encode()).digest()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = [v for k, v in scope["headers"] if k == b"authorization"]
            digest = hashlib.sha256(given[0] if len(given) == 1 else b"").digest()
            if not hmac.compare_digest(digest, self.expected):  # two headers hash b"": refused too
                error = ApiError(401, "a valid API key is needed: send the header Authorization: Bearer KEY",
                                 code="invalid_api_key", metric="unauthorized",
                                 headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
                await error_response(self.service, error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


@contextlib.asynccontextmanager
async def worker_lifespan(service: Service, pipes):
    """Start the workers with the app (the model is loaded already) and drain them when it stops."""
    service.start(pipes)
    try:
        yield
    finally:
        service.stop()
        await run_in_threadpool(service.join)
