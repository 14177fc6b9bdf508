"""Random-weight LoRA files, for tests and benchmarks on machines that cannot download real adapters.

They have real adapters' structure: the attention projections of a denoiser (``to_q``, ``to_k``, ``to_v``,
``to_out.0``, optionally the feed-forward layers), a rank, and either diffusers/PEFT key names or Kohya's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def random_lora(
    denoiser: torch.nn.Module,
    rank: int,
    seed: int,
    targets: tuple[str, ...] = ATTENTION,
    kohya: bool = False,
    prefix: str = "unet",
    strength: float = 1.0,
    alpha: float | None = None,
) -> dict[str, torch.Tensor]:
    """A LoRA state dict for every Linear layer of ``denoiser`` whose name ends in one of ``targets``.

    The update ``B @ A`` of each layer is scaled to about ``strength`` times a typical entry of the layer's own
    weight, so adapters visibly change the output without swamping it. Kohya files carry ``alpha`` (default: the
    rank, a scale of 1); the update is then multiplied by alpha / rank when applied.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in denoiser.named_modules():
        if not isinstance(layer, torch.nn.Linear) or not name.endswith(targets):
            continue
        scale = (strength * float(layer.weight.detach().std()) / rank) ** 0.5
        down = torch.randn(rank, layer.in_features, generator=generator) * scale
        up = torch.randn(layer.out_features, rank, generator=generator) * scale
        if kohya:
            key = f"lora_{prefix}_" + name.replace(".", "_")
            tensors |= {
                f"{key}.lora_down.weight": down,
                f"{key}.lora_up.weight": up,
                f"{key}.alpha": torch.tensor(float(alpha or rank)),
            }
        else:
            tensors |= {f"{prefix}.{name}.lora_A.weight": down, f"{prefix}.{name}.lora_B.weight": up}
    if not tensors:
        raise ValueError(f"no Linear layer of the denoiser ends in any of {targets}")
    return tensors


def write_lora(path: Path, tensors: dict[str, torch.Tensor], base: str | None = None) -> Path:
    """Save as safetensors (contiguous copies), naming the base model family in the metadata when given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"fastgen.base": base} if base else None
    )
    return path
