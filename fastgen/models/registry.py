"""The model registry: what each model is and can do, as data.

A :class:`ModelSpec` declares a model's capabilities (image or video, UNet or DiT, default size,
size step, which accelerations apply). Requests are checked against it at the door, so asking a
model for something it cannot do is a clear error rather than a silently ignored option.

Built-in models are real diffusers architectures with seeded random weights, written with
``save_pretrained`` on first use and loaded with ``from_pretrained`` like any checkpoint. Any
local pipeline directory or hub id is accepted too; its capabilities come from its pipeline class.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastgen import techniques
from fastgen.errors import FieldError, InvalidRequest, ModelLoadError, UnknownModel
from fastgen.schema import (
    IMAGE_FORMATS,
    VIDEO_FORMATS,
    GenerationRequest,
    default_limit_errors,
)
from fastgen.settings import Limits
from fastgen.techniques.sparse_attention import SparseAttentionOptions

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BUILTIN_VERSION = 1  # bump when a built-in model's config or seed changes, so stale copies are rebuilt
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # trained built-in models shipped with the package


@dataclass(frozen=True)
class SparseAttentionDefaults:
    """One sparse-attention mode's defaults for a model (``accelerate.sparse_attention`` fields left null)."""

    density: float
    block_size: int = 128
    dense_steps: int = 2
    refresh_every: int = 10
    reshape: bool = True

    def fill(self, options: SparseAttentionOptions) -> SparseAttentionOptions:
        """The request's options with every null field taken from these defaults."""
        unset = {name: value for name, value in asdict(self).items() if getattr(options, name) is None}
        return options.model_copy(update=unset)


@dataclass(frozen=True)
class ModelSpec:
    """A model's declarative capabilities and defaults."""

    name: str
    kind: Literal["image", "video"]
    architecture: Literal["unet", "dit"]
    pipeline_class: str
    source: str = ""  # local directory or hub id; empty for built-ins until built
    builtin: bool = False
    description: str = ""
    width: int = 512
    height: int = 512
    steps: int = 30
    guidance: float = 7.5
    size_multiple: int = 8  # VAE downsampling times the transformer's patch size
    num_frames: int | None = None
    fps: int | None = None
    frame_multiple: int = 1  # video VAEs compress time: frames must be frame_multiple * k + 1
    accelerations: frozenset[str] = frozenset({"fuse_qkv", "cache"})  # and those of fastgen.techniques' rules
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # Sparse attention modes and their defaults; None: those of the pipeline class (SPARSE_ATTENTION_PIPELINES).
    sparse_attention: Mapping[str, SparseAttentionDefaults] | None = None

    def capabilities(self) -> dict[str, Any]:
        """JSON-ready description, for `fastgen models` and the REST model listing."""
        return {
            "name": self.name,
            "kind": self.kind,
            "architecture": self.architecture,
            "pipeline": self.pipeline_class,
            "builtin": self.builtin,
            "description": self.description,
            "defaults": {
                "width": self.width,
                "height": self.height,
                "steps": self.steps,
                "guidance": self.guidance,
                "num_frames": self.num_frames,
                "fps": self.fps,
                "output_format": self.default_format,
            },
            "size_multiple": self.size_multiple,
            "frame_multiple": self.frame_multiple if self.kind == "video" else None,
            "accelerations": sorted(self.supported_accelerations),
            "loras": techniques.by_name()["loras"].supported(self),
            "sparse_attention": {mode: asdict(d) for mode, d in self.sparse_attention_modes.items()},
        }

    @property
    def supported_accelerations(self) -> frozenset[str]:
        return techniques.accelerations(self)

    @property
    def sparse_attention_modes(self) -> Mapping[str, SparseAttentionDefaults]:
        """The sparse attention modes this model accepts, with its defaults for each."""
        if self.sparse_attention is not None:
            return self.sparse_attention
        return SPARSE_ATTENTION_PIPELINES.get(self.pipeline_class, {})

    @property
    def default_format(self) -> str:
        return "mp4" if self.kind == "video" else "png"

    def complete(self, request: GenerationRequest, limits: Limits | None = None) -> GenerationRequest:
        """Fill the request's unset fields from this model's defaults and check what it asks for (and, given the
        operator's ``limits``, that the defaults it takes are within them)."""
        filled = request.model_copy(
            update={
                "model": self.name,
                "width": request.width or self.width,
                "height": request.height or self.height,
                "steps": request.steps or self.steps,
                "guidance": self.guidance if request.guidance is None else request.guidance,
                "num_frames": request.num_frames or self.num_frames,
                "fps": request.fps or self.fps,
                "output_format": request.output_format or self.default_format,
            }
        )
        filled = self._fill_sparse_attention(filled)
        errors = [
            *(default_limit_errors(request, filled, limits) if limits else []),
            *self._size_errors(filled),
            *self._video_errors(request, filled),
            *self._acceleration_errors(filled),
            *self._sparse_attention_errors(filled),
            *self._lora_errors(filled),
            *(FieldError(name, reason) for name, reason in techniques.conflicts(filled, self)),
        ]
        if errors:
            raise InvalidRequest(errors)
        return filled

    def _fill_sparse_attention(self, r: GenerationRequest) -> GenerationRequest:
        options = r.accelerate.sparse_attention
        defaults = self.sparse_attention_modes.get(options.mode)
        if defaults is None:
            return r
        accelerate = r.accelerate.model_copy(update={"sparse_attention": defaults.fill(options)})
        return r.model_copy(update={"accelerate": accelerate})

    def _sparse_attention_errors(self, r: GenerationRequest) -> list[FieldError]:
        options, modes = r.accelerate.sparse_attention, self.sparse_attention_modes
        if not options.asked or not modes:  # not asked, or refused as an acceleration the model lacks
            return []
        if options.mode not in modes:
            return [
                FieldError(
                    "accelerate.sparse_attention.mode",
                    f"model {self.name!r} supports {', '.join(sorted(modes))}; got {options.mode!r}",
                )
            ]
        if options.dense_steps >= r.steps:
            return [
                FieldError(
                    "accelerate.sparse_attention.dense_steps",
                    f"must be less than steps ({r.steps}) for any step to be sparse, got {options.dense_steps}",
                )
            ]
        return []

    def _size_errors(self, r: GenerationRequest) -> list[FieldError]:
        return [
            FieldError(name, f"must be a multiple of {self.size_multiple} for model {self.name!r}, got {value}")
            for name, value in (("width", r.width), ("height", r.height))
            if value % self.size_multiple
        ]

    def _video_errors(self, asked: GenerationRequest, r: GenerationRequest) -> list[FieldError]:
        if self.kind == "image":
            unusable = [
                FieldError(name, f"only video models take {name}; {self.name!r} makes images")
                for name in ("num_frames", "fps")
                if getattr(asked, name) is not None
            ]
            if r.output_format not in IMAGE_FORMATS:
                unusable.append(FieldError("output_format", f"must be one of {', '.join(IMAGE_FORMATS)} for images"))
            return unusable
        errors = []
        if r.num_images > 1:
            errors.append(FieldError("num_images", f"{self.name!r} makes one video per request; got {r.num_images}"))
        if (r.num_frames - 1) % self.frame_multiple:
            errors.append(
                FieldError(
                    "num_frames", f"must be {self.frame_multiple}*k + 1 for model {self.name!r}, got {r.num_frames}"
                )
            )
        if r.output_format not in VIDEO_FORMATS:
            errors.append(FieldError("output_format", f"must be one of {', '.join(VIDEO_FORMATS)} for video"))
        return errors

    def _acceleration_errors(self, r: GenerationRequest) -> list[FieldError]:
        supported = ", ".join(sorted(self.supported_accelerations)) or "none"
        return [
            FieldError(t.request_field, f"model {self.name!r} does not support {t.name}; it supports: {supported}")
            for t in techniques.TECHNIQUES
            if t.acceleration and t.asked(r) and not t.supported(self)
        ]

    def _lora_errors(self, r: GenerationRequest) -> list[FieldError]:
        if not r.loras:
            return []
        if not techniques.by_name()["loras"].supported(self):
            return [FieldError("loras", f"model {self.name!r} ({self.pipeline_class}) does not take LoRA adapters")]
        return []


# Pipelines whose DiT self-attention fastgen.accelerators.sparse_attention can make sparse, the modes each accepts
# and their defaults. The window's 1/32 density is Re-ttention's 3.1% (evaluated there on PixArt); the others are
# fastgen's starting points, not yet measured on real weights (docs/SPARSE_ATTENTION.md).
_RETTENTION_WINDOW = SparseAttentionDefaults(density=0.03125)
SPARSE_ATTENTION_PIPELINES: dict[str, Mapping[str, SparseAttentionDefaults]] = {
    "PixArtAlphaPipeline": {"window": _RETTENTION_WINDOW},
    "PixArtSigmaPipeline": {"window": _RETTENTION_WINDOW},
    "FluxPipeline": {"window": SparseAttentionDefaults(density=0.0625)},
    "WanPipeline": {"window": _RETTENTION_WINDOW, "video-heads": SparseAttentionDefaults(density=0.05)},
}
# The built-in models' token counts are a few hundred: smaller blocks, a wider share, and refreshes sized for
# their 20 steps.
_TINY_SPARSE = SparseAttentionDefaults(density=0.25, block_size=16, dense_steps=2, refresh_every=5)

BUILTIN_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="fastgen-shapes",
            kind="image",
            architecture="unet",
            pipeline_class="StableDiffusionPipeline",
            source=str(WEIGHTS_DIR / "fastgen-shapes"),
            builtin=True,
            description="Trained here: draws 'a {color} {shape} at the {position} on a {color} background'",
            width=32,
            height=32,
            steps=25,
            guidance=2.5,
            size_multiple=8,
        ),
        ModelSpec(
            name="tiny-sd",
            kind="image",
            architecture="unet",
            pipeline_class="StableDiffusionPipeline",
            builtin=True,
            description="Stable Diffusion architecture (UNet, 8x VAE, CLIP), random weights",
            width=256,
            height=256,
            steps=20,
            guidance=7.5,
            size_multiple=8,
        ),
        ModelSpec(
            name="tiny-pixart",
            kind="image",
            architecture="dit",
            pipeline_class="PixArtSigmaPipeline",
            builtin=True,
            description="PixArt-Sigma architecture (DiT, 8x VAE, T5), random weights",
            width=256,
            height=256,
            steps=20,
            guidance=4.5,
            size_multiple=16,
            call_kwargs={"use_resolution_binning": False, "clean_caption": False},
            sparse_attention={"window": _TINY_SPARSE},
        ),
        ModelSpec(
            name="tiny-wan",
            kind="video",
            architecture="dit",
            pipeline_class="WanPipeline",
            builtin=True,
            description="Wan 2.1 text-to-video architecture (video DiT, 3D VAE, T5), random weights",
            width=128,
            height=128,
            steps=20,
            guidance=5.0,
            size_multiple=16,
            num_frames=17,
            fps=8,
            frame_multiple=4,
            sparse_attention={"window": _TINY_SPARSE, "video-heads": _TINY_SPARSE},
        ),
    )
}

# What a pipeline class can do, for models that are not built in (local directories, hub ids).
PIPELINE_FAMILIES: dict[str, dict[str, Any]] = {
    "StableDiffusionPipeline": {"kind": "image", "architecture": "unet", "width": 512, "height": 512},
    "StableDiffusionXLPipeline": {"kind": "image", "architecture": "unet", "width": 1024, "height": 1024},
    "PixArtAlphaPipeline": {
        "kind": "image",
        "architecture": "dit",
        "width": 1024,
        "height": 1024,
        "guidance": 4.5,
        "size_multiple": 16,
    },
    "PixArtSigmaPipeline": {
        "kind": "image",
        "architecture": "dit",
        "width": 1024,
        "height": 1024,
        "guidance": 4.5,
        "size_multiple": 16,
    },
    "FluxPipeline": {
        "kind": "image",
        "architecture": "dit",
        "width": 1024,
        "height": 1024,
        "guidance": 3.5,
        "size_multiple": 16,
        "steps": 28,
    },
    "StableDiffusion3Pipeline": {
        "kind": "image",
        "architecture": "dit",
        "width": 1024,
        "height": 1024,
        "size_multiple": 16,
        "steps": 28,
    },
    "WanPipeline": {
        "kind": "video",
        "architecture": "dit",
        "width": 832,
        "height": 480,
        "guidance": 5.0,
        "size_multiple": 16,
        "num_frames": 81,
        "fps": 16,
        "frame_multiple": 4,
    },
    "AnimateDiffPipeline": {
        "kind": "video",
        "architecture": "unet",
        "width": 512,
        "height": 512,
        "num_frames": 16,
        "fps": 8,
    },
}


class ModelRegistry:
    """Resolves a model name to its spec and to a directory ``from_pretrained`` can load."""

    def __init__(self, model_dir: Path, builtins: Mapping[str, ModelSpec] | None = None):
        self.model_dir = Path(model_dir)
        self.builtins = dict(BUILTIN_SPECS if builtins is None else builtins)

    def names(self) -> list[str]:
        return sorted(self.builtins)

    def resolve(self, name: str) -> ModelSpec:
        """The spec for a built-in name, a local pipeline directory or a hub id."""
        if name in self.builtins:
            return self.builtins[name]
        path = Path(name).expanduser()
        if path.is_dir():
            return spec_from_config(name, _read_local_index(path), source=str(path))
        if HUB_ID.match(name):
            return spec_from_config(name, _read_hub_index(name), source=name)
        raise UnknownModel(name, self.names())

    def source(self, spec: ModelSpec) -> str:
        """Where ``from_pretrained`` loads this model from, building a random-weight built-in on first use."""
        if spec.source:
            return spec.source
        target = self.model_dir / f"{spec.name}-v{BUILTIN_VERSION}"
        if not (target / "model_index.json").is_file():
            build_and_save(spec.name, target)
        return str(target)


def spec_from_config(name: str, index: dict[str, Any], source: str) -> ModelSpec:
    pipeline_class = index.get("_class_name", "") if isinstance(index, dict) else ""
    family = PIPELINE_FAMILIES.get(pipeline_class)
    if family is None:
        raise InvalidRequest.one(
            "model",
            f"{name!r} is a {pipeline_class or 'unknown'} pipeline; supported pipelines: "
            f"{', '.join(sorted(PIPELINE_FAMILIES))}",
        )
    return ModelSpec(name=name, pipeline_class=pipeline_class, source=source, **family)


def _read_local_index(path: Path) -> dict[str, Any]:
    index = path / "model_index.json"
    if not index.is_file():
        raise InvalidRequest.one("model", f"{str(path)!r} is a directory but has no model_index.json")
    try:
        return json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest.one("model", f"{str(index)!r} cannot be read as JSON: {exc}") from None


def _read_hub_index(repo_id: str) -> dict[str, Any]:
    # huggingface_hub alone (no diffusers, no torch): the door reads a hub model's config without the model stack.
    from huggingface_hub import constants, errors, hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(repo_id, "model_index.json")).read_text())
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
        hub = "is switched off here (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "cannot be reached"
        message = f"hub model {repo_id!r} is not downloaded here and the hub {hub}"
    except (errors.RepositoryNotFoundError, errors.GatedRepoError):
        message = f"hub model {repo_id!r} does not exist or is private (a token with access is needed)"
    except errors.EntryNotFoundError:
        message = f"hub repository {repo_id!r} is not a diffusers pipeline (it has no model_index.json)"
    except Exception as exc:  # a broken download or config: still "cannot use this model here"
        message = f"could not read hub model {repo_id!r}: {_first_line(exc)}"
    raise InvalidRequest.one("model", f"{message}; download it first or use a local pipeline directory")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def build_and_save(name: str, target: Path, seed: int = 0) -> None:
    """Build a built-in model and publish it atomically, so concurrent processes never see half a model."""
    from fastgen.models.builtin import BUILDERS

    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building built-in model %s into %s", name, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        BUILDERS[name](seed).save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "model_index.json").is_file():  # lost a race only if the winner finished
                raise ModelLoadError(f"could not publish built-in model {name} to {target}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
