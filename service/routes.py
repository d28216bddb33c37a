"""HTTP routes (Starlette): decode requests, call the data plane, encode answers.

One exception handler maps every :class:`~service.core.errors.SteadyError` to
``{"error": "..."}`` with its ``status`` (503 adds ``Retry-After``); anything else
becomes a 500 with the same shape, so bad input never takes a replica down.

Example:
    >>> app = build_routes(plane, settings, metrics)     # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import v2
from service.core.card import steady_version
from service.dataplane import DataPlane
from service.core.errors import (
    AdminDisabled,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    SteadyError,
    Unauthorized,
    UnsupportedMediaType,
)
from service.metrics import Metrics
from service.settings import ServeSettings

__all__ = ["build_routes", "parse_multipart_image"]

log = logging.getLogger(__name__)

BODY_TIMEOUT_S = 30.0  # a request body must arrive within this (slow or stalled uploads are cut off)
_timeout = getattr(asyncio, "timeout", None)  # Python >= 3.11


def parse_multipart_image(content_type: str, body: bytes, field: str = "image") -> bytes:
    """The bytes of form field ``field`` of a multipart/form-data body."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise InvalidInput("multipart body could not be parsed (check the boundary)")
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == field:
            payload = part.get_payload(decode=True)
            return payload if isinstance(payload, bytes) else b""
    raise InvalidInput(f"multipart body has no field {field!r}")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=headers)


def build_routes(plane: DataPlane, settings: ServeSettings, metrics: Metrics) -> Starlette:
    """The Starlette application over ``plane``."""

    async def read_body(request: Request) -> bytes:
        """The whole body, bounded in size (413) and in time (a stalled upload gets 400 after BODY_TIMEOUT_S)."""
        try:
            if _timeout is None:  # Python 3.10
                return await asyncio.wait_for(_read_body(request), BODY_TIMEOUT_S)
            async with _timeout(BODY_TIMEOUT_S):  # a deadline on this task: no extra task per request
                return await _read_body(request)
        except asyncio.TimeoutError as exc:
            raise InvalidInput(f"request body not received within {BODY_TIMEOUT_S:.0f} s") from exc

    async def _read_body(request: Request) -> bytes:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"body of {declared} bytes is over the limit of {limit}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def counted(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """Request metrics for inference routes; the handler takes its admission slot with ``admitted_body``."""

        async def wrapper(request: Request) -> Response:
            start = time.perf_counter()
            # label only served models: client-chosen names must not create new series
            model = str(request.path_params.get("model", ""))
            model = model if model in plane.catalog.models else "_unknown"
            labels = {"version": "none", "stage": "none"}
            request.state.labels = labels
            request.state.admitted = False
            code = 500
            entered = False
            try:
                plane.enter()  # 503 once draining (SIGTERM)
                entered = True
                response = await handler(request)
                code = response.status_code
                return response
            except SteadyError as exc:
                code = exc.status
                raise
            except Exception as exc:  # noqa: BLE001 - answered as 500 JSON, never crashes the replica
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                code = 500
                raise SteadyError(f"internal error: {type(exc).__name__}") from exc
            finally:
                if entered:
                    plane.leave()
                if request.state.admitted:
                    plane.release()
                metrics.request(model, labels["version"], labels["stage"], code, time.perf_counter() - start)

        return wrapper

    async def admitted_body(request: Request) -> bytes:
        """Read the body, then take an admission slot (503 when over ``max_inflight``).

        Admission comes after the body so that clients stalling mid-upload hold a connection,
        never one of the slots that bound the decode and inference work; when the slots are
        already taken the request is shed before its body is read, so overload stays cheap.
        """
        if plane.inflight >= settings.max_inflight:
            plane.admit()  # raises Overloaded (503 + Retry-After) without reading the body
        body = await read_body(request)
        plane.admit()
        request.state.admitted = True
        return body

    # ----------------------------------------------------------------- REST
    @counted
    async def classify(request: Request) -> Response:
        model = request.path_params["model"]
        content_type = request.headers.get("content-type", "")
        media = _image_media(request)
        top_raw = request.query_params.get("top_k", "5")
        if not (top_raw.isascii() and top_raw.isdigit()) or len(top_raw) > 4:  # "²".isdigit() is True
            raise InvalidInput(f"top_k must be a positive integer, got {top_raw[:20]!r}")
        version = request.query_params.get("version") or None
        plane.lookup(model, version)  # 404 before reading a large body
        body = await admitted_body(request)
        if media == "multipart/form-data":
            body = parse_multipart_image(content_type, body)
        served, doc = await plane.classify(model, body, int(top_raw), version)
        request.state.labels.update(version=str(served.version), stage=served.stage)
        return _json(doc)

    async def list_models(request: Request) -> Response:
        return _json(plane.models())

    async def reload(request: Request) -> Response:
        token = settings.admin_token
        if not token:
            raise AdminDisabled("admin endpoints are disabled: set admin_token in the config or STEADY_ADMIN_TOKEN")
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Unauthorized("missing or wrong bearer token")
        result = await plane.reload()
        return _json(result)

    # ----------------------------------------------------------------- V2
    async def v2_server(request: Request) -> Response:
        return _json(v2.server_metadata(steady_version()))

    async def live(request: Request) -> Response:
        return _json({"live": True})

    async def ready(request: Request) -> Response:
        if plane.draining:
            return _json({"ready": False, "error": "shutting down"}, status=503)
        if not plane.ready:
            return _json({"ready": False, "error": "models are still loading"}, status=503)
        return _json({"ready": True})

    def _served(request: Request) -> Any:
        return plane.lookup(request.path_params["model"], request.path_params.get("version"))

    async def v2_model(request: Request) -> Response:
        sv = _served(request)
        versions = [request.path_params["version"]] if "version" in request.path_params else \
            [x.version for x in plane.versions_of(sv.model)]
        return _json(v2.model_metadata(sv.model, [int(v) for v in versions], sv.card.num_classes))

    async def v2_model_ready(request: Request) -> Response:
        _served(request)
        if not plane.ready or plane.draining:
            return _json({"ready": False}, status=503)
        return _json({"name": request.path_params["model"], "ready": True})

    async def v2_config(request: Request) -> Response:
        sv = _served(request)
        return _json(v2.model_config(sv.model, settings.max_batch_size, sv.card.num_classes, sv.resolution, sv.policy))

    @counted
    async def v2_infer(request: Request) -> Response:
        model = request.path_params["model"]
        version = request.path_params.get("version")
        plane.lookup(model, version)
        body = await admitted_body(request)
        header_length = v2.parse_header_length(request.headers.get(v2.HEADER_LENGTH), len(body))
        parsed = v2.parse_infer_request(body, header_length)
        served, outputs, binary = await plane.infer_v2(model, version, parsed)
        request.state.labels.update(version=str(served.version), stage=served.stage)
        payload, json_length = v2.encode_infer_response(
            served.model, str(served.version), outputs, binary, parsed.id, {"stage": served.stage}
        )
        if json_length is None:
            return Response(payload, media_type="application/json")
        return Response(payload, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(json_length)})

    # ----------------------------------------------------------------- explain
    def _explain_int(request: Request, name: str) -> int | None:
        raw = request.query_params.get(name)
        if raw is None or raw == "":
            return None
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 6:
            raise InvalidInput(f"{name} must be a non-negative integer, got {raw[:20]!r}")
        return int(raw)

    async def explain(request: Request) -> Response:
        """Occlusion sensitivity (``:explain``): its own admission slots and its own metrics."""
        start = time.perf_counter()
        model = str(request.path_params.get("model", ""))
        labels = {"model": model if model in plane.catalog.models else "_unknown", "version": "none"}
        code, admitted, entered = 500, False, False
        try:
            plane.enter()  # 503 once draining (SIGTERM), like classify
            entered = True
            media = _image_media(request)
            params = {"class_index": _explain_int(request, "class"), "size": _explain_int(request, "size"),
                      "stride": _explain_int(request, "stride")}
            version = request.query_params.get("version") or None
            plane.lookup(model, version)  # 404 before reading a large body
            if plane.explain_inflight >= settings.max_explain_inflight:
                plane.admit_explain()  # 503 + Retry-After without reading the body
            body = await read_body(request)
            plane.admit_explain()
            admitted = True
            if media == "multipart/form-data":
                body = parse_multipart_image(request.headers.get("content-type", ""), body)
            png = _prefers_png(request.headers.get("accept", ""))
            served, doc, picture = await plane.explain(model, body, version=version, png=png, **params)
            labels["version"] = str(served.version)
            code = 200
            if picture is not None:
                return Response(picture, media_type="image/png", headers={
                    "X-Steady-Prediction": str(doc["prediction"]["index"]), "X-Steady-Class": str(doc["class"]["index"])})
            return _json(doc)
        except SteadyError as exc:
            code = exc.status
            raise
        except Exception as exc:  # noqa: BLE001 - answered as 500 JSON, never crashes the replica
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            raise SteadyError(f"internal error: {type(exc).__name__}") from exc
        finally:
            if entered:
                plane.leave()
            if admitted:
                plane.release_explain()
            metrics.explain(labels["model"], labels["version"], code, time.perf_counter() - start)

    # ----------------------------------------------------------------- errors
    async def steady_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SteadyError)
        headers = {"Retry-After": str(settings.retry_after_s)} if exc.status == 503 else None
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc)
        return _json({"error": str(exc)}, exc.status, headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _json({"error": str(exc.detail)}, exc.status_code, dict(exc.headers or {}) or None)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _json({"error": f"internal error: {type(exc).__name__}"}, 500)

    async def not_found(request: Request) -> Response:
        raise NotFound(f"no route {request.method} {request.url.path[:100]}")

    m = "/v2/models/{model}"
    mv = "/v2/models/{model}/versions/{version}"
    routes = [
        Route("/v1/models/{model}:classify", classify, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/admin/reload", reload, methods=["POST"]),
        Route("/v2", v2_server, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
    ]
    for base in (mv, m):
        routes += [
            Route(base, v2_model, methods=["GET"]),
            Route(base + "/ready", v2_model_ready, methods=["GET"]),
            Route(base + "/config", v2_config, methods=["GET"]),
            Route(base + "/infer", v2_infer, methods=["POST"]),
        ]
    routes.append(Route("/v1/models/{model}:explain", explain, methods=["POST"]))
    routes.append(Route("/{path:path}", not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]))
    return Starlette(
        routes=routes,
        exception_handlers={SteadyError: steady_error, HTTPException: http_error, Exception: server_error},
    )


def _image_media(request: Request) -> str:
    """The media type of an image body (image/*, application/octet-stream or multipart/form-data), else 415."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if not (media.startswith("image/") or media in ("application/octet-stream", "multipart/form-data")):
        raise UnsupportedMediaType(
            f"unsupported Content-Type {content_type[:60]!r}: send the image with Content-Type image/* "
            "or as multipart/form-data field 'image'"
        )
    return media


def _prefers_png(accept: str) -> bool:
    """Whether an Accept header asks for image/png over application/json (by q-value; ties: the first listed)."""
    best: dict[str, tuple[float, int]] = {}
    for position, item in enumerate(accept.lower().split(",")):
        media, *options = [part.strip() for part in item.split(";")]
        q = 1.0
        for option in options:
            key, _, value = option.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media in ("image/png", "application/json") and media not in best:
            best[media] = (q, -position)
    png = best.get("image/png")
    return png is not None and png[0] > 0 and png > best.get("application/json", (0.0, -1_000_000))

