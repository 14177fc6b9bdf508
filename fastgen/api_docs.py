"""The OpenAPI document's parts that FastAPI cannot infer: the request body with this service's limits (a raw body
read by the door, so FastAPI sees no model), every error an operation can answer with its body, and the response
models of the plain-JSON endpoints. ``install`` makes /openapi.json self-contained: the request schema's
``$defs`` become components, so every reference resolves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from fastgen.schema import IMAGE_FORMATS, VIDEO_FORMATS, request_schema
from fastgen.settings import Limits

BODY_PREFIX = "Body"  # request-body components, apart from the (limit-free) response models FastAPI emits
BODY_SCHEMA = f"{BODY_PREFIX}GenerationRequest"
MEDIA = ("image/png", "image/jpeg", "image/webp", "video/mp4", "image/gif")


class FieldProblem(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    """Every error's body: what went wrong in words, and for 422 each bad field."""

    error: str
    detail: list[FieldProblem] | None = None


class JobAccepted(BaseModel):
    id: str
    status: Literal["queued"] = "queued"
    model: str
    status_url: str
    result_url: str


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str]
    open: bool


WHAT = {
    401: "No valid API key (FASTGEN_API_KEYS is set)",
    404: "No such job, or another tenant's",
    409: "The job has not succeeded (yet)",
    410: "The result's file is missing from the artifact store or damaged",
    413: "The request body is over FASTGEN_MAX_BODY_BYTES",
    415: "The request body is not JSON",
    422: "A field is invalid or over a limit; each is named",
    503: "The job queue, a store or a file cannot be reached (within seconds)",
}
MEDIA_RESPONSE = {
    200: {
        "description": "The result's file, checked against its recorded size and SHA-256 before it is sent",
        "content": {media: {"schema": {"type": "string", "format": "binary"}} for media in MEDIA},
    }
}


ZIP_RESPONSE = {
    200: {
        "description": "Every file of the result (``image_<i>.<fmt>`` or ``video.<fmt>``) and ``result.json``, its"
        " metadata, each file checked against its recorded size and SHA-256 first",
        "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
    }
}


class Responses:
    """The error responses of an operation; 401 only where keys are required."""

    def __init__(self, authenticated: bool):
        self.authenticated = authenticated

    def of(self, *codes: int, accepted: bool = False) -> dict[int | str, dict[str, Any]]:
        errors = {code: {"model": ErrorBody, "description": WHAT[code]} for code in codes}
        if not self.authenticated:
            errors.pop(401, None)
        if accepted:
            errors[202] = {"headers": {"Location": {"schema": {"type": "string"}, "description": "The status URL"}}}
        return errors


def request_body() -> dict[str, Any]:
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{BODY_SCHEMA}"}}}
    return {"requestBody": {"required": True, "content": content}}


def install(app: FastAPI, limits: Limits, served: Callable[[], dict[str, dict]], default: str) -> None:
    """Build /openapi.json once, with the request body's schema (and its parts) as components; ``served`` gives the
    usable served models' capabilities by name, whose rules the body's schema states for each model."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema = request_schema(limits, ref_template=f"#/components/schemas/{BODY_PREFIX}{{model}}")
            parts = {f"{BODY_PREFIX}{name}": part for name, part in schema.pop("$defs", {}).items()}
            schema = with_model_rules(schema, served(), default, limits)
            document.setdefault("components", {}).setdefault("schemas", {}).update({**parts, BODY_SCHEMA: schema})
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi


def with_model_rules(schema: dict[str, Any], models: dict[str, dict], default: str, limits: Limits) -> dict:
    """The body schema with what the door checks per model, where JSON Schema can say it: only served models, each
    model's size multiple, image or video fields and formats, frame counts, LoRAs. (Not sayable, so checked only
    at the door: width x height against the pixel limit, defaults against the limits, dense_steps < steps, which
    LoRA names the library holds, which accelerations a model supports.)"""
    properties, required = dict(schema["properties"]), list(schema.get("required", []))
    names = {"enum": sorted(models)}
    properties["model"] = {**properties["model"], "anyOf": [names, {"type": "null"}] if default in models else [names]}
    rules = [{"if": _names(name), "then": _model_rules(caps, limits)} for name, caps in sorted(models.items())]
    if default in models:
        rules.append({"if": _no_model(), "then": _model_rules(models[default], limits)})
    else:  # the default model is not served: every request must name one that is
        required.append("model")
    return {**schema, "properties": properties, "required": required, "allOf": rules}


def _names(name: str) -> dict:
    return {"required": ["model"], "properties": {"model": {"const": name}}}


def _no_model() -> dict:
    return {"anyOf": [{"not": {"required": ["model"]}}, {"properties": {"model": {"type": "null"}}}]}


def _model_rules(caps: dict[str, Any], limits: Limits) -> dict[str, Any]:
    side = {"anyOf": [{"type": "integer", "multipleOf": caps["size_multiple"]}, {"type": "null"}]}
    rules: dict[str, Any] = {"width": side, "height": side}
    if caps["kind"] == "image":
        rules |= {"num_frames": {"type": "null"}, "fps": {"type": "null"}}
        rules["output_format"] = {"anyOf": [{"enum": list(IMAGE_FORMATS)}, {"type": "null"}]}
    else:
        frames = list(range(1, limits.max_frames + 1, caps["frame_multiple"] or 1))
        rules["num_frames"] = {"anyOf": [{"enum": frames}, {"type": "null"}]}
        rules["output_format"] = {"anyOf": [{"enum": list(VIDEO_FORMATS)}, {"type": "null"}]}
    if not caps["loras"]:
        rules["loras"] = {"maxItems": 0}
    return {"properties": rules}
