"""The schema every door shares (REST, Celery, the CLI, the UI): GenerationRequest and GenerationResult.

Upper limits come from :class:`fastgen.settings.Limits`, passed in through :func:`parse_request`
(pydantic's validation context), so an operator can change them without code. Every violation
names the field and the limit.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, create_model, field_validator
from pydantic.json_schema import DEFAULT_REF_TEMPLATE
from pydantic_core import PydanticCustomError

from fastgen import techniques
from fastgen.errors import FieldError, InvalidRequest
from fastgen.settings import Limits
from fastgen.strict import Strict
from fastgen.techniques.seam import Technique

IMAGE_FORMATS = ("png", "jpeg", "webp")
VIDEO_FORMATS = ("mp4", "gif")
OutputFormat = Literal["png", "jpeg", "webp", "mp4", "gif"]
MAX_SEED = 2**63 - 1
# Fields whose upper bound is an operator's limit, and the Limits attribute that holds it.
UPPER_LIMITS = {
    "width": "max_side",
    "height": "max_side",
    "steps": "max_steps",
    "guidance": "max_guidance",
    "num_frames": "max_frames",
    "num_images": "max_images",
}
LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
LORA_NAME_SCHEMA = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"  # the same rule for tools, ".." included


def _limits(info: ValidationInfo) -> Limits:
    context = info.context or {}
    return context.get("limits") or Limits()


def _over(limit_name: str, limit: float, value: float, what: str = "must be at most") -> PydanticCustomError:
    return PydanticCustomError(
        "over_limit",
        "{what} {limit} (FASTGEN_{env}), got {value}",
        {"what": what, "limit": limit, "env": limit_name.upper(), "value": value},
    )


class LoraRef(Strict):
    """One adapter from the LoRA library, by name, with its strength."""

    name: str = Field(
        description="Adapter name in the LoRA library (letters, digits, _ . -)",
        json_schema_extra={"pattern": LORA_NAME_SCHEMA},
    )
    scale: float = Field(1.0, ge=-4.0, le=4.0, description="Adapter strength")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not LORA_NAME.match(v) or ".." in v:
            raise PydanticCustomError("lora_name", "must be 1-128 letters, digits, '_', '.' or '-' (no paths)")
        return v


def accelerate_options(table: tuple[Technique, ...] | None = None) -> type[Strict]:
    """The request's ``accelerate`` model: one field per technique of the table that has options there."""
    fields = {t.name: t.options for t in table or techniques.TECHNIQUES if t.options is not None}
    return create_model(
        "AccelerateOptions",
        __base__=Strict,
        __doc__="Which accelerations this request allows. Each is off unless asked for.",
        __module__=__name__,
        **fields,
    )


AccelerateOptions = accelerate_options()


class GenerationRequest(Strict):
    """What to generate. Fields left as null take the model's defaults."""

    prompt: str = Field(min_length=1, description="What to draw")
    negative_prompt: str = Field("", description="What to steer away from (used with guidance > 1)")
    model: str | None = Field(
        None, min_length=1, description="Model name, local pipeline directory or hub id; null or absent: the default"
    )
    width: int | None = Field(None, ge=8, description="Pixels; a multiple of the model's size step")
    height: int | None = Field(None, ge=8, description="Pixels; a multiple of the model's size step")
    steps: int | None = Field(None, ge=1, description="Denoising steps")
    guidance: float | None = Field(None, ge=0.0, description="Classifier-free guidance scale; <= 1 turns it off")
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Random seed of the first image (image i has seed + i); null picks one and reports it",
    )
    num_images: int = Field(
        1, ge=1, description="Image models only: images to make, each with its own seed (at most FASTGEN_MAX_IMAGES)"
    )
    num_frames: int | None = Field(None, ge=1, description="Video models only: frames to generate")
    fps: int | None = Field(None, ge=1, le=60, description="Video models only: frames per second of the file")
    output_format: OutputFormat | None = Field(None, description="png/jpeg/webp for images, mp4/gif for video")
    loras: list[LoraRef] = Field(default_factory=list, description="LoRA adapters and their scales")
    accelerate: AccelerateOptions = Field(default_factory=AccelerateOptions)

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _prompt_length(cls, v: str, info: ValidationInfo) -> str:
        limit = _limits(info).max_prompt_chars
        if len(v) > limit:
            raise _over("max_prompt_chars", limit, len(v), "must be at most")
        if info.field_name == "prompt" and not v.strip():
            raise PydanticCustomError("blank", "must not be blank")
        return v

    @field_validator(*UPPER_LIMITS)
    @classmethod
    def _at_most(cls, v: float | None, info: ValidationInfo) -> float | None:
        limit_name = UPPER_LIMITS[info.field_name]
        limit = getattr(_limits(info), limit_name)
        if v is not None and v > limit:
            raise _over(limit_name, limit, v)
        return v

    @field_validator("height")
    @classmethod
    def _pixels(cls, v: int | None, info: ValidationInfo) -> int | None:
        limit, width = _limits(info).max_pixels, info.data.get("width")
        if v is not None and width is not None and v * width > limit:
            raise PydanticCustomError(
                "over_limit",
                "width x height = {pixels} pixels, over the limit of {limit} (FASTGEN_MAX_PIXELS)",
                {"pixels": v * width, "limit": limit},
            )
        return v

    @field_validator("loras")
    @classmethod
    def _lora_count(cls, v: list[LoraRef], info: ValidationInfo) -> list[LoraRef]:
        limit = _limits(info).max_loras
        if len(v) > limit:
            raise _over("max_loras", limit, len(v), "may list at most")
        if len({lora.name for lora in v}) != len(v):
            raise PydanticCustomError("duplicate", "lists the same adapter twice")
        return v


def image_seeds(seed: int, count: int) -> list[int]:
    """The seeds of a request's ``count`` images: ``seed`` and the ones after it (past MAX_SEED they wrap to 0), so
    image i is what a one-image request with seed ``image_seeds(seed, count)[i]`` makes."""
    return [(seed + i) % (MAX_SEED + 1) for i in range(count)]


def parse_request(data: dict[str, Any] | str | bytes | GenerationRequest, limits: Limits) -> GenerationRequest:
    """Validate raw input (a dict or JSON) against ``limits``; raise InvalidRequest naming each bad field."""
    if isinstance(data, GenerationRequest):
        data = data.model_dump()
    try:
        if isinstance(data, str | bytes):
            return GenerationRequest.model_validate_json(data, context={"limits": limits})
        return GenerationRequest.model_validate(data, context={"limits": limits})
    except ValidationError as exc:
        raise InvalidRequest([_field_error(e) for e in exc.errors()]) from None


def _field_error(error: dict) -> FieldError:
    field = ".".join(str(part) for part in error["loc"]) or "request"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "is not a known field"
    elif error["type"] == "json_invalid":
        message = _json_problem(error.get("ctx", {}).get("error", message))
    elif error["type"] in TYPE_WORDS:
        message = f"must be {TYPE_WORDS[error['type']]}, got {_shown(error.get('input'))}"
    elif error["type"] == "string_too_short" and field == "model":
        message = "must not be empty; leave it out (or null) for the default model"
    return FieldError(field, message)


TYPE_WORDS = {
    "int_type": "an integer (a JSON number, not a string or a boolean)",
    "float_type": "a number (not a string or a boolean)",
    "bool_type": "true or false",
    "string_type": "a string",
}


def _shown(value: Any) -> str:
    """The offending input as JSON, cut short: a message never echoes a whole oversized value."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_problem(detail: str) -> str:
    """The parser's words for a body that is not JSON, with the cases people hit said plainly."""
    where = detail[detail.rfind(" at line ") :] if " at line " in detail else ""
    if "surrogate" in detail or "hex escape" in detail:
        return (
            "is not valid JSON: a \\u escape is half of a UTF-16 surrogate pair (\\ud800-\\udfff) with no other "
            f"half{where}; send text as UTF-8 or as a whole pair"
        )
    return f"is not valid JSON: {detail.removeprefix('Invalid JSON: ')}"


def default_limit_errors(asked: GenerationRequest, filled: GenerationRequest, limits: Limits) -> list[FieldError]:
    """A model default that the operator's limits forbid is refused, not clamped: clamping would quietly change
    the picture (fewer steps, another size), and the caller can always ask for a value within the limit."""
    errors = []
    for name, limit_name in UPPER_LIMITS.items():
        limit, value = getattr(limits, limit_name), getattr(filled, name)
        if getattr(asked, name) is None and value is not None and value > limit:
            env = f"FASTGEN_{limit_name.upper()}"
            message = (
                f"not given, and model {filled.model!r}'s default of {value} is over the limit of {limit} ({env})"
            )
            errors.append(FieldError(name, f"{message}; ask for at most {limit}"))
    pixels = filled.width * filled.height
    if (asked.width is None or asked.height is None) and pixels > limits.max_pixels:
        errors.append(
            FieldError(
                "width" if asked.width is None else "height",
                f"model {filled.model!r}'s default size gives {filled.width} x {filled.height} = {pixels} pixels, "
                f"over the limit of {limits.max_pixels} (FASTGEN_MAX_PIXELS); ask for a smaller width and height",
            )
        )
    return errors


def request_model(table: tuple[Technique, ...]) -> type[GenerationRequest]:
    """GenerationRequest with the ``accelerate`` options of another technique table (a test's, say)."""
    options = accelerate_options(table)
    return create_model(
        "GenerationRequest", __base__=GenerationRequest, accelerate=(options, Field(default_factory=options))
    )


def request_schema(
    limits: Limits, ref_template: str = DEFAULT_REF_TEMPLATE, model: type[GenerationRequest] | None = None
) -> dict[str, Any]:
    """The request's JSON schema with this service's limits written in as maxima."""
    schema = (model or GenerationRequest).model_json_schema(ref_template=ref_template)
    props = schema["properties"]
    for name, limit_name in UPPER_LIMITS.items():
        _nullable_variant(props[name])["maximum"] = getattr(limits, limit_name)
    props["prompt"]["maxLength"] = limits.max_prompt_chars
    props["negative_prompt"]["maxLength"] = limits.max_prompt_chars
    props["loras"]["maxItems"] = limits.max_loras
    schema["description"] = f"{schema.get('description', '')} Images may have at most {limits.max_pixels} pixels."
    return schema


def _nullable_variant(prop: dict[str, Any]) -> dict[str, Any]:
    return next(v for v in prop.get("anyOf", [prop]) if v.get("type") != "null")


class Artifact(BaseModel):
    """One stored output file."""

    name: str
    url: str
    media_type: str
    bytes: int
    sha256: str | None = Field(
        None, description="SHA-256 of the file, hex (null for results stored before checksums were recorded)"
    )
    seed: int | None = Field(None, description="The seed this image was drawn with (null for a video)")


class AccelerationReport(BaseModel):
    """What one acceleration did on one request."""

    name: str
    config: dict[str, Any] = Field(default_factory=dict)
    details: dict[str, Any] = Field(default_factory=dict)


class BatchReport(BaseModel):
    """How a request shared its pipeline call with others (request batching in the worker)."""

    jobs: int = Field(description="Requests in the call, this one included")
    images: int = Field(description="Images the call drew for all of them")
    others: list[str] = Field(description="The other requests' job ids")
    shared: dict[str, Any] = Field(
        description="What decided the batch: the settings every request of the call had in common, with their values"
    )


class Timings(BaseModel):
    load_s: float = 0.0
    denoise_s: float = 0.0
    encode_s: float = 0.0
    total_s: float = 0.0
    per_step_s: float = 0.0


class GenerationResult(BaseModel):
    """What a finished generation reports: the resolved request, its outputs and what accelerations did."""

    id: str
    request: GenerationRequest
    model: str
    seed: int
    seeds: list[int] = Field(default_factory=list, description="Each image's seed, in the artifacts' order")
    width: int
    height: int
    steps: int
    num_frames: int | None = None
    output_format: OutputFormat
    device: str
    artifacts: list[Artifact] = Field(default_factory=list)
    timings: Timings = Field(default_factory=Timings)
    accelerations: list[AccelerationReport] = Field(default_factory=list)
    batch: BatchReport | None = Field(None, description="The others this request ran with in one call; null: alone")
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
