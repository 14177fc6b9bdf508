"""Fused attention projections: Q, K and V computed by one matmul instead of three.

The fused QKV projection comes from transformer training systems (Megatron-LM, Shoeybi et al.,
2019, arXiv:1909.08053): one wide GEMM reads the activations once and keeps the device busier
than three narrow ones. Self-attention fuses Q/K/V, cross-attention K/V. Results change only by
floating-point summation order.

diffusers builds the fused layers (``fuse_qkv_projections``) but its undo keeps them in memory and
leaves flags behind; the handle here removes every trace so the model is exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fastgen.schema import GenerationRequest

if TYPE_CHECKING:
    from fastgen.engine.run import Run

FUSED_LAYERS = ("to_qkv", "to_kv", "to_added_qkv", "to_added_kv")
_MISSING = object()


@dataclass(frozen=True)
class FuseQKVConfig:
    """No knobs: the technique is exact up to summation order."""


def from_request(request: GenerationRequest) -> FuseQKVConfig | None:
    return FuseQKVConfig() if request.accelerate.fuse_qkv else None


def from_run(run: Run) -> FuseQKVConfig | None:
    return from_request(run.request)


def denoiser(pipe) -> torch.nn.Module:
    """The pipeline's denoising network: a UNet or a transformer."""
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if model is None:
        raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")
    return model


class FusedQKVHandle:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.processors = dict(model.attn_processors)
        self.original_attr = vars(model).get("original_attn_processors", _MISSING)
        model.fuse_qkv_projections()
        self.fused = sum(any(hasattr(m, name) for name in FUSED_LAYERS) for m in model.modules())

    def remove(self) -> None:
        self.model.set_attn_processor(self.processors)
        for module in self.model.modules():
            _unfuse(module)
        if self.original_attr is _MISSING:
            vars(self.model).pop("original_attn_processors", None)
        else:
            self.model.original_attn_processors = self.original_attr

    def report(self) -> dict[str, Any]:
        return {"fused_attention_layers": self.fused}


def _unfuse(module: torch.nn.Module) -> None:
    for name in FUSED_LAYERS:
        if name in module._modules:
            del module._modules[name]
    if "fused_projections" in vars(module):
        module.fused_projections = False


def apply(pipe, config: FuseQKVConfig, run: Run | None = None) -> FusedQKVHandle:
    """Fuse the denoiser's attention projections; ``remove()`` restores the unfused model exactly."""
    return FusedQKVHandle(denoiser(pipe))
