"""What each rank runs in the parallel tests (spawned processes import it by name, so it is not a test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastgen.parallel.config import ParallelConfig
from fastgen.parallel.groups import ParallelGroups
from fastgen.parallel.layout import split

SHAPES = Path(__file__).resolve().parents[1] / "fastgen" / "models" / "weights" / "fastgen-shapes"


def load(model: str):
    if model == "fastgen-shapes":
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(SHAPES)
    else:
        from fastgen.models.builtin import BUILDERS

        pipe = BUILDERS[model](seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, call: dict) -> np.ndarray:
    generator = torch.Generator().manual_seed(call.get("seed", 0))
    fields = {k: v for k, v in call.items() if k != "seed"}
    out = pipe(**fields, generator=generator, output_type="np")
    return out.frames if hasattr(out, "frames") else out.images


def compare_modes(
    rank: int, world_size: int, model: str, call: dict, configs: dict[str, dict], calls: dict | None = None
) -> dict:
    """Plain output, each config's output and report, and the plain output again after every handle came off.

    ``calls`` overrides call fields per config (e.g. a size that does not split).
    """
    pipe = load(model)
    result = {"plain": generate(pipe, call), "runs": {}}
    for name, fields in configs.items():
        groups = ParallelGroups.build(ParallelConfig(**fields))
        handle = split(pipe, groups, guidance_on=call.get("guidance_scale", 1.0) > 1.0)
        try:
            images = generate(pipe, call | (calls or {}).get(name, {}))
        except ValueError as exc:
            result["runs"][name] = {"error": str(exc)}
            continue
        finally:
            handle.remove()
        result["runs"][name] = {"images": images, "report": handle.report()}
    result["after"] = generate(pipe, call)
    return result
