"""Service settings: one frozen object read from ``FASTGEN_*`` environment variables.

Nothing reads the environment behind your back: build a :class:`Settings` once (usually with
:meth:`Settings.from_env`) and pass it to whatever needs it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from fastgen.parallel.config import PATCH_MODES

ENV_PREFIX = "FASTGEN_"
BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Every limit has an environment variable of its own."""

    max_pixels: int = 1024 * 1024  # FASTGEN_MAX_PIXELS: width * height of one image or frame
    max_side: int = 2048  # FASTGEN_MAX_SIDE: the longest width or height
    max_steps: int = 100  # FASTGEN_MAX_STEPS
    max_frames: int = 129  # FASTGEN_MAX_FRAMES: frames of one video
    max_prompt_chars: int = 2000  # FASTGEN_MAX_PROMPT_CHARS: prompt and negative prompt each
    max_loras: int = 4  # FASTGEN_MAX_LORAS: adapters on one request
    max_images: int = 4  # FASTGEN_MAX_IMAGES: images one request may ask for (num_images)
    max_guidance: float = 30.0  # FASTGEN_MAX_GUIDANCE
    max_body_bytes: int = 1024 * 1024  # FASTGEN_MAX_BODY_BYTES: a request body over this is refused (413) unread

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"{env_name(f.name)} must be positive, got {getattr(self, f.name)}")


def default_data_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastgen"


@dataclass(frozen=True)
class Settings:
    """Everything configurable about a fastgen process."""

    data_dir: Path = field(default_factory=default_data_dir)  # FASTGEN_DATA_DIR
    model_dir: Path | None = None  # FASTGEN_MODEL_DIR; default <data_dir>/models
    artifact_url: str | None = None  # FASTGEN_ARTIFACT_URL (fsspec URL); default <data_dir>/artifacts
    broker_url: str | None = None  # FASTGEN_BROKER_URL; none means the embedded broker
    default_model: str = "fastgen-shapes"  # FASTGEN_DEFAULT_MODEL
    device: str = "auto"  # FASTGEN_DEVICE: auto, cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # FASTGEN_DTYPE: auto (float16 on CUDA, float32 elsewhere), float32, float16, bfloat16
    models: str = ""  # FASTGEN_MODELS: comma-separated models the service offers; empty: the built-ins
    job_timeout_s: int = 900  # FASTGEN_JOB_TIMEOUT_S: the longest one job may run
    api_keys: str = ""  # FASTGEN_API_KEYS: "key=tenant,key2=tenant2"; empty: an open service
    ui_api_key: str = ""  # FASTGEN_UI_API_KEY: the key the web page uses when FASTGEN_API_KEYS is set
    host: str = "127.0.0.1"  # FASTGEN_HOST: where `fastgen serve` listens
    port: int = 8000  # FASTGEN_PORT
    cache_bytes: int = 2 * 1024**3  # FASTGEN_CACHE_BYTES: approximate-cache states kept; 0 turns the cache off
    cache_default: bool = False  # FASTGEN_CACHE_DEFAULT: use the cache for requests that do not say
    cache_policy: str = "fastgen"  # FASTGEN_CACHE_POLICY: fastgen, nirvana (the paper's) or quality (calibrated)
    cache_calibrations: str = ""  # FASTGEN_CACHE_CALIBRATIONS: a folder of `fastgen cache calibrate` tables
    cache_thresholds: str = ""  # FASTGEN_CACHE_THRESHOLDS: "0.95:0.5,0.9:0.4,..." similarity:skipped fraction
    cache_embedder: str = "pipeline"  # FASTGEN_CACHE_EMBEDDER: pipeline, minilm, or a sentence-transformers model
    cache_share_tenants: bool = False  # FASTGEN_CACHE_SHARE_TENANTS: let tenants reuse each other's states
    cache_index: str = "flat"  # FASTGEN_CACHE_INDEX: flat (exact) or hnsw (millions of entries)
    cache_url: str | None = None  # FASTGEN_CACHE_URL (fsspec URL) for state files; default <artifact_url>/_cache
    devices: int = 1  # FASTGEN_DEVICES: devices (ranks) per worker; above 1 each request is split over them
    parallel_mode: str = "displaced"  # FASTGEN_PARALLEL_MODE: the patch mode of requests that do not say
    lora_dir: Path | None = None  # FASTGEN_LORA_DIR: the LoRA library (*.safetensors); default <data_dir>/loras
    lora_slots: int = 8  # FASTGEN_LORA_SLOTS: adapters kept resident per pipeline (least recently used replaced)
    lora_host_bytes: int = 4 * 1024**3  # FASTGEN_LORA_HOST_BYTES: library adapters pre-read into host memory
    lora_apply_by_step: int = 0  # FASTGEN_LORA_APPLY_BY_STEP: >0 starts denoising while a LoRA loads (off: 0)
    batch_max: int = 4  # FASTGEN_BATCH_MAX: compatible queued jobs a worker runs in one pipeline call (1: off)
    batch_wait_ms: int = 0  # FASTGEN_BATCH_WAIT_MS: how long a job with nothing queued behind it waits for company
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        if self.model_dir is None:
            object.__setattr__(self, "model_dir", self.data_dir / "models")
        object.__setattr__(self, "model_dir", Path(self.model_dir).expanduser())
        if self.artifact_url is None:
            object.__setattr__(self, "artifact_url", str(self.data_dir / "artifacts"))
        if self.cache_url is None:
            object.__setattr__(self, "cache_url", self.artifact_url.rstrip("/") + "/_cache")
        if self.cache_bytes < 0:
            raise ValueError(f"FASTGEN_CACHE_BYTES must be 0 (off) or more, got {self.cache_bytes}")
        object.__setattr__(self, "lora_dir", Path(self.lora_dir or self.data_dir / "loras").expanduser())
        if self.lora_slots < self.limits.max_loras:
            limit = self.limits.max_loras
            raise ValueError(f"FASTGEN_LORA_SLOTS must be at least FASTGEN_MAX_LORAS ({limit}), got {self.lora_slots}")
        if self.lora_slots > 99:
            raise ValueError(f"FASTGEN_LORA_SLOTS must be at most 99, got {self.lora_slots}")
        if self.lora_apply_by_step < 0 or self.lora_host_bytes < 0:
            raise ValueError("FASTGEN_LORA_APPLY_BY_STEP and FASTGEN_LORA_HOST_BYTES must be 0 or more")
        if self.cache_policy not in ("fastgen", "nirvana", "quality"):
            raise ValueError(f"FASTGEN_CACHE_POLICY must be fastgen, nirvana or quality, got {self.cache_policy!r}")
        self.cache_threshold_table  # noqa: B018 -- a malformed table fails at start-up
        if self.cache_index not in ("flat", "hnsw"):
            raise ValueError(f"FASTGEN_CACHE_INDEX must be flat or hnsw, got {self.cache_index!r}")
        if self.job_timeout_s <= 0:
            raise ValueError(f"FASTGEN_JOB_TIMEOUT_S must be positive, got {self.job_timeout_s}")
        self.tenants_by_key  # noqa: B018 -- a malformed key list fails at start-up, not on the first request
        if self.batch_max < 1 or self.batch_wait_ms < 0:
            raise ValueError(
                f"FASTGEN_BATCH_MAX must be at least 1 and FASTGEN_BATCH_WAIT_MS 0 or more, got {self.batch_max}"
                f" and {self.batch_wait_ms}"
            )
        if self.devices < 1:
            raise ValueError(f"FASTGEN_DEVICES must be at least 1, got {self.devices}")
        if self.parallel_mode not in PATCH_MODES:
            raise ValueError(
                f"FASTGEN_PARALLEL_MODE must be one of {', '.join(PATCH_MODES)}, got {self.parallel_mode!r}"
            )
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"FASTGEN_DTYPE must be auto, float32, float16 or bfloat16, got {self.dtype!r}")

    @property
    def tenants_by_key(self) -> dict[str, str]:
        """API key to tenant, from FASTGEN_API_KEYS."""
        pairs = [item.strip() for item in self.api_keys.split(",") if item.strip()]
        if any("=" not in pair for pair in pairs):
            raise ValueError("FASTGEN_API_KEYS must look like key1=tenant1,key2=tenant2")
        return dict(pair.split("=", 1) for pair in pairs)

    @property
    def cache_threshold_table(self) -> tuple[tuple[float, float], ...] | None:
        """FASTGEN_CACHE_THRESHOLDS as (minimum similarity, fraction of steps skipped) pairs; None: the policy's."""
        if not self.cache_thresholds.strip():
            return None
        try:
            pairs = [item.split(":") for item in self.cache_thresholds.split(",") if item.strip()]
            return tuple((float(similarity), float(fraction)) for similarity, fraction in pairs)
        except ValueError:
            raise ValueError(
                "FASTGEN_CACHE_THRESHOLDS must look like 0.95:0.5,0.9:0.4 (similarity:fraction of steps skipped), "
                f"got {self.cache_thresholds!r}"
            ) from None

    def served_models(self, builtins: list[str]) -> list[str]:
        names = [name.strip() for name in self.models.split(",") if name.strip()]
        return names or builtins

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``FASTGEN_*`` variables; unset ones keep their defaults."""
        env = os.environ if environ is None else environ
        values = _read_fields(cls, env, skip={"limits"})
        return cls(**values, limits=Limits(**_read_fields(Limits, env)))


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _read_fields(cls: type, env: Mapping[str, str], skip: frozenset[str] | set[str] = frozenset()) -> dict:
    values = {}
    for f in fields(cls):
        raw = env.get(env_name(f.name))
        if f.name in skip or raw is None or raw == "":
            continue
        values[f.name] = _parse(f, raw)
    return values


def _parse(f, raw: str):
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"{env_name(f.name)} must be a number, got {raw!r}") from None
    if kind == "bool":
        if raw.lower() not in BOOLEANS:
            raise ValueError(f"{env_name(f.name)} must be true or false, got {raw!r}")
        return BOOLEANS[raw.lower()]
    return raw
