"""Multi-device layouts as a technique: CFG parallelism and patch parallelism (DistriFusion's displaced patches, PCPP)
for UNets, sequence parallelism for DiTs. The layouts themselves are ``fastgen.parallel``.

DistriFusion: Li et al., "DistriFusion: Distributed Parallel Inference for High-Resolution Diffusion Models",
CVPR 2024, arXiv:2402.19481. PCPP: Zhang et al., "Partially Conditioned Patch Parallelism for Accelerated Diffusion
Model Inference", arXiv:2412.02962.
"""

from __future__ import annotations

from pydantic import Field

from fastgen.parallel.config import PatchMode
from fastgen.strict import Strict
from fastgen.techniques.seam import Technique

# Pipelines whose denoiser fastgen.parallel splits (UNets by row strips, PixArt and Wan DiTs by token chunks).
# Not Flux or SD3 (joint text-image attention) nor AnimateDiff (temporal attention), which it would split wrongly.
SPLITTABLE_PIPELINES = frozenset(
    (
        "StableDiffusionPipeline",
        "StableDiffusionXLPipeline",
        "PixArtAlphaPipeline",
        "PixArtSigmaPipeline",
        "WanPipeline",
    )
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


# Composes with sparse attention only where it keeps each sequence whole (a CFG split, or a UNet's row strips): a
# rule of the worker's device layout, decided there (fastgen.parallel.layout), since it depends on the group.
TECHNIQUE = Technique(
    "parallel",
    asked=lambda r: r.accelerate.parallel.asked,
    supported=lambda spec: spec.pipeline_class in SPLITTABLE_PIPELINES,
    options=(ParallelOptions, Field(default_factory=ParallelOptions)),
)
