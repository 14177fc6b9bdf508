"""Sparse self-attention for DiTs as a technique: its request options, CLI flags and page control.

Re-ttention (Chen et al., "Re-ttention: Ultra Sparse Visual Generation via Attention Statistical Reshape", NeurIPS
2025) and Sparse VideoGen (Xi et al., "Sparse VideoGen: Accelerating Video Diffusion Transformers with Spatial-Temporal
Sparsity", ICML 2025); the kernels are ``fastgen.attention``, the attachment ``fastgen.accelerators.sparse_attention``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from fastgen.strict import Strict
from fastgen.techniques.seam import Control, Flag, Technique

SparseAttentionMode = Literal["off", "window", "video-heads"]
SPARSE_ATTENTION_MODES: tuple[str, ...] = ("off", "window", "video-heads")


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


TECHNIQUE = Technique(
    "sparse_attention",
    attach="fastgen.accelerators.sparse_attention",
    asked=lambda r: r.accelerate.sparse_attention.asked,
    supported=lambda spec: bool(spec.sparse_attention_modes),
    options=(SparseAttentionOptions, Field(default_factory=SparseAttentionOptions)),
    control=Control(
        "Sparse attention",
        "Each query attends to a window of nearby tokens (about 3%), rescaled to stay close to dense: DiTs only.",
        {"mode": "window"},
    ),
    flags=(
        Flag(
            "--sparse-attention",
            "accelerate.sparse_attention.mode",
            "accelerate: sparse self-attention for DiTs with Re-ttention's reshape (video-heads: video models)",
            choices=SPARSE_ATTENTION_MODES[1:],
        ),
        # A density without a mode is refused at the door (mode off) rather than dropped here.
        Flag(
            "--sparse-density",
            "accelerate.sparse_attention.density",
            "sparse attention: share of tokens each query attends to (default: model's)",
            type=float,
        ),
    ),
)
