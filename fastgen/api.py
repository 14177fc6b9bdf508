"""The REST API: submit a job, poll it, download its result, cancel it; optionally the web page at /ui.

``POST /v1/jobs`` answers 202 at once with the job's id and status URL; ``GET /v1/jobs/{id}``
tells queued / running (with progress) / succeeded (with the result) / failed (with a readable
error) / cancelled; ``GET /v1/jobs/{id}/result`` streams the file; ``DELETE /v1/jobs/{id}``
cancels. Bad input is a 422 naming each field, an unknown (or another tenant's) job a 404, an
unreachable queue a 503.

With ``FASTGEN_API_KEYS`` set, every ``/v1`` call needs a key (``Authorization: Bearer <key>``
or ``X-API-Key``) and sees only its tenant's jobs; without it the service is open.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from fastgen.artifacts import ArtifactStore
from fastgen.errors import FastgenError, InvalidRequest
from fastgen.metrics import render_metrics
from fastgen.request import request_schema
from fastgen.settings import Settings
from fastgen.workers.queue import JobNotFound, JobQueue, JobStatus, QueueUnavailable

logger = logging.getLogger(__name__)
OPEN_TENANT = "public"


class Unauthorized(FastgenError):
    pass


class NotReady(FastgenError):
    pass


def _cache_counters(settings: Settings):
    """Reads the approximate cache's shared counters (nothing when the cache is off)."""
    if settings.cache_bytes == 0:
        return lambda: None
    from fastgen.cache.store import open_cache_store

    store = open_cache_store(settings.broker_url, settings.data_dir, settings.cache_url)
    return store.counters


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
    app = FastAPI(title="fastgen", version="0.1.0", description=__doc__)
    _add_error_handlers(app)
    tenant_of = _tenant_dependency(keys)
    cache_counters = _cache_counters(settings)

    @app.post("/v1/jobs", status_code=202, openapi_extra=_request_body(settings))
    async def submit_job(request: Request, tenant: str = Depends(tenant_of)) -> JSONResponse:
        body = await request.body()
        job = await run_in_threadpool(queue.submit, body, tenant)  # Redis and the broker block
        url = f"/v1/jobs/{job.id}"
        content = {
            "id": job.id,
            "status": "queued",
            "model": job.model,
            "status_url": url,
            "result_url": f"{url}/result",
        }
        return JSONResponse(content, status_code=202, headers={"Location": url})

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus)
    def job_status(job_id: str, tenant: str = Depends(tenant_of)) -> JobStatus:
        return queue.status(job_id, tenant)

    @app.delete("/v1/jobs/{job_id}", status_code=202, response_model=JobStatus)
    def cancel_job(job_id: str, tenant: str = Depends(tenant_of)) -> JobStatus:
        return queue.cancel(job_id, tenant)

    @app.get("/v1/jobs/{job_id}/result")
    def job_result(job_id: str, tenant: str = Depends(tenant_of)) -> StreamingResponse:
        status = queue.status(job_id, tenant)
        if status.result is None or not status.result.artifacts:
            raise NotReady(f"job {job_id} is {status.status}; its result exists once it has succeeded")
        artifact = status.result.artifacts[0]
        return StreamingResponse(
            _chunks(artifacts, job_id, artifact.name),
            media_type=artifact.media_type,
            headers={
                "Content-Disposition": f'inline; filename="{artifact.name}"',
                "Content-Length": str(artifact.bytes),
            },
        )

    @app.get("/v1/models")
    def models(tenant: str = Depends(tenant_of)) -> list[dict]:
        return [queue.registry.resolve(name).capabilities() for name in queue.models]

    @app.get("/v1/loras")
    def loras(tenant: str = Depends(tenant_of)) -> list[dict]:
        """The LoRA library (rescanned, so files copied in since are listed): name, format, rank, base, checksum."""
        queue.loras.scan()
        return queue.loras.listing()

    @app.get("/v1/schema")
    def schema() -> dict:
        return request_schema(settings.limits)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        queue.check()
        return JSONResponse({"status": "ok", "models": queue.models, "open": not keys})

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        return render_metrics(queue.jobs, cache_counters())

    if ui_api_url is not None:
        from fastgen.ui import mount_ui  # Gradio loads only where the page is served

        mount_ui(app, ui_api_url, api_key=ui_api_key, path="/ui")
    return app


def _tenant_dependency(keys: dict[str, str]):
    def tenant_of(request: Request) -> str:
        if not keys:
            return OPEN_TENANT
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if key not in keys:
            raise Unauthorized("a valid API key is required (Authorization: Bearer <key> or X-API-Key)")
        return keys[key]

    return tenant_of


def _chunks(artifacts: ArtifactStore, job_id: str, name: str, size: int = 1 << 16) -> Iterator[bytes]:
    with artifacts.open(job_id, name) as f:
        while chunk := f.read(size):
            yield chunk


def _request_body(settings: Settings) -> dict:
    schema = request_schema(settings.limits)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


ERROR_STATUS = {InvalidRequest: 422, JobNotFound: 404, Unauthorized: 401, NotReady: 409, QueueUnavailable: 503}


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

    async def connection_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"the job queue is unreachable: {exc}"}, status_code=503)

    app.add_exception_handler(FastgenError, fastgen_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ConnectionError, connection_error)
    app.add_exception_handler(OSError, connection_error)
