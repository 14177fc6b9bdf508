"""GenerationRequest and GenerationResult: the one schema REST, Celery, the CLI and the UI share.

Upper limits come from :class:`fastgen.settings.Limits`, passed in through :func:`parse_request`
(pydantic's validation context), so an operator can change them without code. Every violation
names the field and the limit.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.json_schema import DEFAULT_REF_TEMPLATE
from pydantic_core import PydanticCustomError

from fastgen.errors import FieldError, InvalidRequest
from fastgen.parallel.config import PatchMode
from fastgen.settings import Limits

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
}
LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
LORA_NAME_SCHEMA = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"  # the same rule for tools, ".." included
SparseAttentionMode = Literal["off", "window", "video-heads"]
SPARSE_ATTENTION_MODES: tuple[str, ...] = ("off", "window", "video-heads")


def _limits(info: ValidationInfo) -> Limits:
    context = info.context or {}
    return context.get("limits") or Limits()


def _over(limit_name: str, limit: float, value: float, what: str = "must be at most") -> PydanticCustomError:
    return PydanticCustomError(
        "over_limit",
        "{what} {limit} (FASTGEN_{env}), got {value}",
        {"what": what, "limit": limit, "env": limit_name.upper(), "value": value},
    )


class Strict(BaseModel):
    """Strict at the edge: unknown fields, a bool or a string where a number belongs, NaN and infinity are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


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


class CacheOptions(Strict):
    """The approximate noise-state cache: start from a similar earlier prompt's state and skip steps."""

    enabled: bool | None = Field(
        None, description="Use the cache; null: the service's default (FASTGEN_CACHE_DEFAULT)"
    )
    min_similarity: float | None = Field(
        None, ge=0.0, le=1.0, description="Only reuse states of prompts at least this similar (cosine, 0-1)"
    )


class ParallelOptions(Strict):
    """How a multi-device worker spreads this request over its ranks (ignored by single-device workers)."""

    mode: PatchMode | None = Field(
        None,
        description="Patch mode when the image is split into strips: sync (exact), displaced (DistriFusion), pcpp "
        "(partially conditioned patches), naive (no exchange); null: the worker's default (FASTGEN_PARALLEL_MODE)",
    )
    cfg: bool | None = Field(
        None,
        description="Run the guidance branches on different ranks (exact); null: when guidance is on and the ranks "
        "split in two",
    )

    @property
    def asked(self) -> bool:
        return self.mode is not None or self.cfg is not None


def _settings_need_a_mode_schema(schema: dict[str, Any]) -> None:
    """The door's rule in JSON Schema, for tools: settings only with a mode other than off."""
    settings = [name for name in schema["properties"] if name != "mode"]
    on = [mode for mode in SPARSE_ATTENTION_MODES if mode != "off"]
    schema["anyOf"] = [
        {"required": ["mode"], "properties": {"mode": {"enum": on}}},
        {"properties": {name: {"type": "null"} for name in settings}},
    ]


class SparseAttentionOptions(Strict):
    """Sparse self-attention for DiTs (Re-ttention's statistical reshape; Sparse VideoGen's spatial/temporal heads).

    Null fields take the model's defaults for the mode (``fastgen models`` lists them).
    """

    model_config = ConfigDict(json_schema_extra=_settings_need_a_mode_schema)

    mode: SparseAttentionMode = Field(
        "off",
        description="off; window (a window of neighbouring tokens over the flattened image); video-heads (each head "
        "attends within nearby frames or to the same place across frames, chosen per head; video models)",
    )
    density: float | None = Field(None, gt=0.0, le=1.0, description="Share of the image tokens each query attends to")
    reshape: bool | None = Field(
        None, description="Re-ttention: rescale sparse steps by the attention mass measured on full steps"
    )
    dense_steps: int | None = Field(
        None, ge=1, description="Full-attention steps at the start (the last records the statistics)"
    )
    refresh_every: int | None = Field(None, ge=0, description="Steps between later full-attention steps (0: none)")
    block_size: int | None = Field(None, ge=1, le=1024, description="Tokens per block of the block-sparse mask")

    @model_validator(mode="after")
    def _settings_need_a_mode(self) -> SparseAttentionOptions:
        settings = [name for name in type(self).model_fields if name != "mode" and getattr(self, name) is not None]
        if settings and self.mode == "off":
            raise PydanticCustomError(
                "mode_off",
                "sets {settings} but mode is off; set mode to window or video-heads",
                {"settings": ", ".join(settings)},
            )
        return self

    @property
    def asked(self) -> bool:
        return self.mode != "off"


class AccelerateOptions(Strict):
    """Which accelerations this request allows. Each is off unless asked for."""

    fuse_qkv: bool = Field(False, description="Fuse attention Q/K/V projections into one matmul")
    cache: CacheOptions = Field(default_factory=CacheOptions)
    parallel: ParallelOptions = Field(default_factory=ParallelOptions)
    sparse_attention: SparseAttentionOptions = Field(default_factory=SparseAttentionOptions)


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
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; null picks one and reports it")
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


def request_schema(limits: Limits, ref_template: str = DEFAULT_REF_TEMPLATE) -> dict[str, Any]:
    """The request's JSON schema with this service's limits written in as maxima."""
    schema = GenerationRequest.model_json_schema(ref_template=ref_template)
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


class AccelerationReport(BaseModel):
    """What one acceleration did on one request."""

    name: str
    config: dict[str, Any] = Field(default_factory=dict)
    details: dict[str, Any] = Field(default_factory=dict)


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
    width: int
    height: int
    steps: int
    num_frames: int | None = None
    output_format: OutputFormat
    device: str
    artifacts: list[Artifact] = Field(default_factory=list)
    timings: Timings = Field(default_factory=Timings)
    accelerations: list[AccelerationReport] = Field(default_factory=list)
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
