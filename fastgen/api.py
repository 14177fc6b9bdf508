"""The REST API: submit a job, poll it, download its result, cancel it; optionally the web page at /ui.

``POST /v1/jobs`` answers 202 at once with the job's id and status URL; ``GET /v1/jobs/{id}``
tells queued / running (with progress) / succeeded (with the result) / failed (with a readable
error) / cancelled; ``GET /v1/jobs/{id}/result`` streams the file; ``DELETE /v1/jobs/{id}``
cancels. Bad input is a 4xx naming each field and limit, an unknown (or another tenant's) job a 404, a
broker or store that is down or hangs a 503 within seconds.

With ``FASTGEN_API_KEYS`` set, every ``/v1`` call needs a key (``Authorization: Bearer <key>``
or ``X-API-Key``) and sees only its tenant's jobs; without it the service is open.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Iterator

import kombu.exceptions
import redis.exceptions
from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from fastgen import api_assets, api_docs
from fastgen.api_docs import JobAccepted
from fastgen.artifacts import ArtifactGone, ArtifactStore
from fastgen.errors import FastgenError, InvalidRequest
from fastgen.jobs import DEFAULT_TENANT, redis_fault
from fastgen.metrics import render_metrics
from fastgen.schema import GenerationResult, request_schema
from fastgen.settings import Settings
from fastgen.workers.queue import JobNotFound, JobQueue, JobStatus, QueueUnavailable

logger = logging.getLogger(__name__)
JSON_TYPES = ("application/json", "+json")


class Unauthorized(FastgenError):
    pass


class NotReady(FastgenError):
    pass


class BodyTooLarge(FastgenError):
    pass


class NotJson(FastgenError):
    pass


def _cache_counters(settings: Settings):
    """Reads the approximate cache's shared counters (None when the cache is off); the store opens on first use,
    so a store that cannot be opened fails a scrape's cache section, not the API's start."""
    if settings.cache_bytes == 0:
        return None
    opened = []

    def counters() -> dict[str, dict[str, int]]:
        if not opened:
            from fastgen.cache.store import open_cache_store

            opened.append(open_cache_store(settings.broker_url, settings.data_dir, settings.cache_url))
        return opened[0].counters()

    return counters


def create_api(
    settings: Settings,
    queue: JobQueue | None = None,
    artifacts: ArtifactStore | None = None,
    ui_api_url: str | None = None,
    ui_api_key: str | None = None,
) -> FastAPI:
    """The FastAPI app over a job queue and an artifact store built from ``settings`` unless given.

    With ``ui_api_url`` the web page is mounted at ``/ui``, talking to the API at that URL (usually
    this service's own address) over HTTP like any remote client; without it the app is the API alone.
    """
    queue = queue or JobQueue(settings)
    if queue.door_embedder is not None:
        queue.door_embedder.warm()
    artifacts = artifacts or ArtifactStore(settings.artifact_url)
    keys = settings.tenants_by_key
    if not keys:
        logger.warning("FASTGEN_API_KEYS is not set: the service is open to anyone who can reach it")
    app = api_assets.create_app(title="fastgen", version="0.1.0", description=__doc__)
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes)
    _add_error_handlers(app)
    tenant_of = _tenant_dependency(keys)
    cache_counters = _cache_counters(settings)
    docs = api_docs.Responses(authenticated=bool(keys))

    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobAccepted,
        responses=docs.of(401, 413, 415, 422, 503, accepted=True),
        openapi_extra=api_docs.request_body(),
    )
    async def submit_job(request: Request, tenant: str = Depends(tenant_of)) -> JSONResponse:
        _require_json(request)
        body = await request.body()
        job = await run_in_threadpool(queue.submit, body, tenant)  # Redis and the broker block
        url = f"/v1/jobs/{job.id}"
        accepted = JobAccepted(id=job.id, model=job.model, status_url=url, result_url=f"{url}/result")
        return JSONResponse(accepted.model_dump(), status_code=202, headers={"Location": url})

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, responses=docs.of(401, 404, 422, 503))
    def job_status(job_id: str, tenant: str = Depends(tenant_of)) -> JobStatus:
        return queue.status(job_id, tenant)

    @app.delete("/v1/jobs/{job_id}", status_code=202, response_model=JobStatus, responses=docs.of(401, 404, 422, 503))
    def cancel_job(job_id: str, tenant: str = Depends(tenant_of)) -> JobStatus:
        return queue.cancel(job_id, tenant)

    @app.get(
        "/v1/jobs/{job_id}/result",
        response_class=StreamingResponse,
        responses={**api_docs.MEDIA_RESPONSE, **docs.of(401, 404, 409, 410, 422, 503)},
    )
    def job_result(
        job_id: str,
        index: int = Query(0, ge=0, description="Which of the job's images (0 to num_images - 1); a video is 0"),
        tenant: str = Depends(tenant_of),
    ) -> StreamingResponse:
        """One file of a succeeded job's result: image ``index``, or the video."""
        result = _finished(queue, job_id, tenant)
        if index >= len(result.artifacts):
            count = len(result.artifacts)
            raise InvalidRequest.one("index", f"must be 0 to {count - 1}: job {job_id} made {count}, got {index}")
        artifact = result.artifacts[index]
        artifacts.verify(job_id, artifact)  # before the 200: a damaged file is a 410, never a broken body
        return StreamingResponse(
            _chunks(artifacts, job_id, artifact.name, artifact.bytes),
            media_type=artifact.media_type,
            headers={
                "Content-Disposition": f'inline; filename="{artifact.name}"',
                "Content-Length": str(artifact.bytes),
            },
        )

    @app.get(
        "/v1/jobs/{job_id}/result.zip",
        response_class=Response,
        responses={**api_docs.ZIP_RESPONSE, **docs.of(401, 404, 409, 410, 503)},
    )
    def job_result_zip(job_id: str, tenant: str = Depends(tenant_of)) -> Response:
        """Every file of a succeeded job's result in one ZIP archive: each under its artifact name (``image_0.png``,
        ``image_1.png``, ... or ``video.mp4``) and ``result.json``, the result's metadata (each artifact's seed)."""
        result = _finished(queue, job_id, tenant)
        for artifact in result.artifacts:
            artifacts.verify(job_id, artifact)
        return Response(
            zip_of(artifacts, result),
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{job_id}.zip"'},
        )

    @app.get("/v1/models", response_model=list[dict], responses=docs.of(401))
    def models(tenant: str = Depends(tenant_of)) -> list[dict]:
        """Every served model's capabilities; a model that cannot be read is listed with ``usable: false`` and why."""
        return [_model_entry(queue, name) for name in queue.models]

    @app.get("/v1/loras", response_model=list[dict], responses=docs.of(401))
    def loras(tenant: str = Depends(tenant_of)) -> list[dict]:
        """The LoRA library (rescanned, so files copied in since are listed): name, format, rank, base, checksum."""
        queue.loras.scan()
        return queue.loras.listing()

    @app.get("/v1/schema", response_model=dict, responses=docs.of(401))
    def schema(tenant: str = Depends(tenant_of)) -> dict:
        """The request JSON schema with this service's limits (a /v1 call like the others: keys apply)."""
        return request_schema(settings.limits)

    @app.get("/healthz", response_model=api_docs.Health, responses=docs.of(503))
    def healthz() -> JSONResponse:
        queue.check()
        return JSONResponse({"status": "ok", "models": queue.models, "open": not keys})

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        return render_metrics(queue.jobs, cache_counters)

    def usable_models() -> dict[str, dict]:
        entries = (_model_entry(queue, name) for name in queue.models)
        return {entry["name"]: entry for entry in entries if entry["usable"]}

    api_docs.install(app, settings.limits, usable_models, settings.default_model)
    if ui_api_url is not None:
        from fastgen.ui import mount_ui  # Gradio loads only where the page is served

        mount_ui(app, ui_api_url, api_key=ui_api_key, path="/ui")
    return app


def _model_entry(queue: JobQueue, name: str) -> dict:
    try:
        return {**queue.registry.resolve(name).capabilities(), "usable": True}
    except FastgenError as exc:
        logger.warning("served model %s cannot be used: %s", name, exc)
        return {"name": name, "usable": False, "error": str(exc)}


def _require_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not content_type.endswith(JSON_TYPES):
        shown = content_type[:60] or "none"
        raise NotJson(f"the request body must be JSON (Content-Type: application/json), got {shown}")


def _tenant_dependency(keys: dict[str, str]):
    if not keys:
        return lambda: DEFAULT_TENANT
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <key>, a key of FASTGEN_API_KEYS")
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="A key of FASTGEN_API_KEYS")

    def tenant_of(
        credentials: HTTPAuthorizationCredentials | None = Security(bearer), api_key: str | None = Security(header)
    ) -> str:
        key = credentials.credentials if credentials else api_key
        if key not in keys:
            raise Unauthorized("a valid API key is required (Authorization: Bearer <key> or X-API-Key)")
        return keys[key]

    return tenant_of


def _finished(queue: JobQueue, job_id: str, tenant: str) -> GenerationResult:
    status = queue.status(job_id, tenant)
    if status.result is None or not status.result.artifacts:
        raise NotReady(f"job {job_id} is {status.status}; its result exists once it has succeeded")
    return status.result


def zip_of(artifacts: ArtifactStore, result: GenerationResult) -> bytes:
    """The result's files and its metadata as one ZIP archive, stored uncompressed (the media are compressed)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for artifact in result.artifacts:
            archive.writestr(artifact.name, artifacts.read(result.id, artifact.name))
        archive.writestr("result.json", result.model_dump_json(indent=2))
    return buffer.getvalue()


def _chunks(artifacts: ArtifactStore, job_id: str, name: str, size: int, chunk: int = 1 << 16) -> Iterator[bytes]:
    """The file's first ``size`` bytes (what Content-Length promised), in chunks."""
    with artifacts.open(job_id, name) as f:
        while size > 0 and (data := f.read(min(chunk, size))):
            size -= len(data)
            yield data


class BodyLimit:
    """Refuses a request body over ``max_bytes`` with a 413 before it is read whole: at once when Content-Length
    says so, else as soon as the chunks received pass the limit (chunked bodies have no length).

    Written here because Starlette and FastAPI have no body limit and uvicorn's only limits are on headers.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        received, started = 0, False

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self._message())
            return message

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(send)

    def _message(self) -> str:
        return f"the request body is over the limit of {self.max_bytes} bytes (FASTGEN_MAX_BODY_BYTES)"

    async def _refuse(self, send) -> None:
        response = JSONResponse({"error": self._message()}, status_code=413, headers={"Connection": "close"})
        await response({"type": "http"}, None, send)


STORE_FAULTS = (
    OSError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,
)
ERROR_STATUS = {
    InvalidRequest: 422,
    JobNotFound: 404,
    Unauthorized: 401,
    NotReady: 409,
    ArtifactGone: 410,
    BodyTooLarge: 413,
    NotJson: 415,
    QueueUnavailable: 503,
}


def _add_error_handlers(app: FastAPI) -> None:
    async def fastgen_error(request: Request, exc: FastgenError) -> JSONResponse:
        status = next((code for kind, code in ERROR_STATUS.items() if isinstance(exc, kind)), 500)
        body = {"error": str(exc)}
        if isinstance(exc, InvalidRequest):
            body["detail"] = [{"field": e.field, "message": e.message} for e in exc.errors]
        return JSONResponse(body, status_code=status)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [
            {"field": ".".join(str(p) for p in e["loc"][1:]) or "request", "message": e["msg"]} for e in exc.errors()
        ]
        return JSONResponse(
            {"error": "; ".join(f"{d['field']}: {d['message']}" for d in detail), "detail": detail}, status_code=422
        )

    async def unreachable(request: Request, exc: Exception) -> JSONResponse:
        logger.warning("%s %s: a store is unreachable: %s", request.method, request.url.path, exc)
        return JSONResponse({"error": f"the job queue or a store is unreachable: {exc}"}, status_code=503)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        if redis_fault(exc):  # raised past every store wrapper: still the store's fault, not a bug
            return await unreachable(request, exc)
        logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); it is logged"}, status_code=500)

    app.add_exception_handler(FastgenError, fastgen_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    for fault in STORE_FAULTS:
        app.add_exception_handler(fault, unreachable)
    app.add_exception_handler(Exception, unexpected)
