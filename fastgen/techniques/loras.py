"""Per-request LoRA adapters as a technique (SwiftDiffusion's hot-swapped adapters; ``fastgen.lora``, attached to a
run by ``fastgen.accelerators.loras``).

Their request field is the request's own ``loras`` list (``fastgen.schema.LoraRef``), not one under ``accelerate``.
"""

from __future__ import annotations

from fastgen.errors import InvalidRequest
from fastgen.techniques.seam import Flag, Technique

# Pipelines whose denoiser takes LoRA adapters through diffusers' hot-swap (tested: Stable Diffusion and Wan).
LORA_PIPELINES = frozenset({"StableDiffusionPipeline", "StableDiffusionXLPipeline", "WanPipeline"})


def lora_from_arg(text: str) -> dict:
    """``NAME`` or ``NAME:SCALE`` as a request's LoRA entry."""
    name, _, scale = text.partition(":")
    try:
        return {"name": name, "scale": float(scale)} if scale else {"name": name}
    except ValueError:
        raise InvalidRequest.one("lora", f"the scale after ':' must be a number, got {scale!r}") from None


TECHNIQUE = Technique(
    "loras",
    attach="fastgen.accelerators.loras",
    asked=lambda r: bool(r.loras),
    supported=lambda spec: spec.pipeline_class in LORA_PIPELINES,
    option="loras",
    acceleration=False,
    flags=(
        Flag(
            "--lora",
            "loras",
            "a LoRA from the library (FASTGEN_LORA_DIR, or the service's), scale 1 unless given; repeatable",
            metavar="NAME[:SCALE]",
            repeat=True,
            convert=lora_from_arg,
        ),
    ),
)
