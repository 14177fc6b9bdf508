"""Train a small LoRA that teaches ``fastgen-shapes`` a style (``fastgen.shapes.scenes.STYLES``), on CPU, in minutes.

LoRA is Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685, 2021; ICLR 2022): each
adapted layer's weight W is kept frozen and learns an update B @ A of rank r. Here only UNet layers are adapted
(``unet.add_adapter(LoraConfig(...))``); the text encoder and the VAE stay frozen, so the caption still decides the
colours, shape, position and background, and the adapter adds the style. The recipe is the base model's
(``fastgen.shapes.train``): the same captions (the train combinations only; held-out ones are never seen), images
rendered in the style with the same seeded jitter, posterior-mean latents computed once, v-prediction with the loss
weight (min(SNR, 5) + 1) / (SNR + 1), 10% of captions replaced by the empty prompt (classifier-free guidance's
unconditional branch learns the style too), AdamW with cosine decay over a wall-time budget. The frozen text
encoder's outputs are computed once per caption.

    python -m fastgen.shapes.train_lora --style complement --out DIR [--minutes 5 --rank 8 --seed 0]

Writes ``DIR/<style>.safetensors`` (``StableDiffusionPipeline.save_lora_weights``, diffusers/PEFT keys),
``DIR/<style>.training.json`` and the model card ``DIR/<style>.md`` with the measured results
(``fastgen.shapes.evaluate.evaluate_lora``).
"""

import argparse
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import diffusers
import numpy as np
import peft
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastgen.models.registry import WEIGHTS_DIR
from fastgen.shapes import scenes as sc
from fastgen.shapes.train import build_scheduler, cosine_lr, loss_weight

logger = logging.getLogger(__name__)

BASE = WEIGHTS_DIR / "fastgen-shapes"
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
RESNET_CONVS = ("conv1", "conv2")  # the resnets' 3x3 convolutions (geometry lives there more than in attention)
TARGETS = {
    "attn": ATTENTION,
    "attn+ff": ATTENTION + FEED_FORWARD,
    "attn+ff+conv": ATTENTION + FEED_FORWARD + RESNET_CONVS,
}


@dataclass(frozen=True)
class LoraTrainConfig:
    style: str
    out: str
    minutes: float = 5.0
    rank: int = 8
    seed: int = 0
    targets: str = "attn+ff"
    base: str = str(BASE)
    images: int = 8100  # styled renders of the train scenes (20 per combination)
    batch: int = 64
    lr: float = 2e-3
    caption_dropout: float = 0.1
    snr_cap: float = 5.0
    log_every: int = 50
    target_modules: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        if self.style not in sc.STYLES:
            raise ValueError(f"style: {self.style!r} is not one of {list(sc.STYLES)}")
        if self.targets not in TARGETS:
            raise ValueError(f"targets: {self.targets!r} is not one of {list(TARGETS)}")
        if self.minutes <= 0 or self.rank < 1:
            raise ValueError(f"minutes must be positive and rank at least 1, got {self.minutes} and {self.rank}")
        object.__setattr__(self, "target_modules", TARGETS[self.targets])


def load_base(path: str) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    return pipe


def styled_dataset(style: str, count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Renders of the train scenes in ``style``, in [-1, 1] NCHW, with their (plain) captions."""
    train = sc.train_scenes()
    picks = [train[i % len(train)] for i in range(count)]
    seeds = np.random.default_rng(seed).integers(0, 2**31, size=count)
    images = np.stack([sc.render(scene, int(s), style) for scene, s in zip(picks, seeds, strict=True)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0, [sc.caption(s) for s in picks]


@torch.no_grad()
def posterior_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Posterior means, scaled by the base model's own factor (unlike train.py, which sets it)."""
    means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(512)])
    return means * vae.config.scaling_factor


@torch.no_grad()
def caption_embeddings(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frozen text encoder's output for each distinct caption and for the empty prompt, and each caption's row."""
    distinct = sorted(set(captions))
    row = {text: i for i, text in enumerate(distinct)}
    max_length = pipe.tokenizer.model_max_length
    tokens = pipe.tokenizer(distinct + [""], padding="max_length", max_length=max_length, truncation=True)
    states = pipe.text_encoder(torch.tensor(tokens.input_ids))[0]
    return states[:-1], states[-1], torch.tensor([row[text] for text in captions])


def add_lora(unet, cfg: LoraTrainConfig) -> list[torch.nn.Parameter]:
    """A rank-r adapter (alpha = r, so its scaling is 1) on the chosen layers; returns its trainable parameters."""
    targets = list(cfg.target_modules)
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian", target_modules=targets))
    return [p for p in unet.parameters() if p.requires_grad]


def train_adapter(pipe, latents: torch.Tensor, embeddings, cfg: LoraTrainConfig) -> dict:
    """The base model's v-prediction loss on the styled latents, LoRA parameters only, for ``cfg.minutes``."""
    states, empty, rows = embeddings
    params = add_lora(pipe.unet, cfg)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    alphas = build_scheduler().alphas_cumprod
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    budget, start, step, recent = cfg.minutes * 60, time.monotonic(), 0, []
    pipe.unet.train()
    while (elapsed := time.monotonic() - start) < budget:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.lr, elapsed, budget)
        index = torch.randint(len(latents), (cfg.batch,), generator=gen)
        text = states[rows[index]].clone()
        text[torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout] = empty
        loss = v_loss(pipe.unet, latents[index], text, alphas, gen, cfg.snr_cap)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        recent.append(loss.item())
        if step % cfg.log_every == 0:
            logger.info("lora step %d  %.0fs  %.2fs/it  loss %.4f", step, elapsed, elapsed / step, np.mean(recent))
            recent = []
    pipe.unet.eval()
    return {
        "steps": step,
        "train_seconds": round(time.monotonic() - start, 1),
        "trainable_params": sum(p.numel() for p in params),
    }


def v_loss(unet, x0, text, alphas, gen, snr_cap: float) -> torch.Tensor:
    t = torch.randint(0, len(alphas), (len(x0),), generator=gen)
    a = alphas[t].view(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=gen)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * x0
    pred = unet(noisy, t, encoder_hidden_states=text).sample
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    return (loss_weight(alphas[t] / (1 - alphas[t]), snr_cap) * per_sample).mean()


def save_adapter(pipe, out: Path, style: str) -> Path:
    """One ``<style>.safetensors`` written by diffusers, then the base model named in its header (``fastgen.base``)
    so the library lists it for ``fastgen-shapes``; the tensors are the ones diffusers wrote."""
    name = f"{style}.safetensors"
    layers = get_peft_model_state_dict(pipe.unet)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, weight_name=name)
    path = out / name
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    save_file(load_file(str(path)), str(path), metadata={**metadata, "fastgen.base": "fastgen-shapes"})
    return path


def run(cfg: LoraTrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    pipe = load_base(cfg.base)
    pixels, captions = styled_dataset(cfg.style, cfg.images, cfg.seed)
    latents = posterior_latents(pipe.vae, pixels)
    embeddings = caption_embeddings(pipe, captions)
    prepared = time.monotonic() - started
    logger.info("%d %s renders of %d captions encoded in %.0fs", len(pixels), cfg.style, len(set(captions)), prepared)
    stats = {"config": asdict(cfg), "train_combinations": len(set(captions)), "prepare_seconds": round(prepared, 1)}
    stats |= train_adapter(pipe, latents, embeddings, cfg)
    path = save_adapter(pipe, out, cfg.style)
    stats["wall_minutes"] = round((time.monotonic() - started) / 60, 2)
    stats["size_bytes"] = path.stat().st_size
    stats["threads"] = torch.get_num_threads()
    stats["versions"] = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }
    (out / f"{cfg.style}.training.json").write_text(json.dumps(stats, indent=2) + "\n")
    logger.info("saved %s (%d bytes) after %.1f min", path, stats["size_bytes"], stats["wall_minutes"])
    return stats


def evaluate_and_write_card(out: Path, style: str, per_caption: int = 4) -> dict:
    """Measure the adapter on held-out captions, store the numbers with the training's and write the model card."""
    from fastgen.shapes.card import lora_card
    from fastgen.shapes.evaluate import evaluate_lora

    stats_path = out / f"{style}.training.json"
    stats = json.loads(stats_path.read_text())
    base, lora = Path(stats["config"]["base"]), out / f"{style}.safetensors"
    stats["evaluation"] = evaluate_lora(base, lora, style, per_caption)
    stats_path.write_text(json.dumps(stats, indent=2) + "\n")
    (out / f"{style}.md").write_text(lora_card(style, stats))
    return stats["evaluation"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--style", required=True, choices=sc.STYLES)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--minutes", type=float, default=5.0, help="training wall-time budget")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", choices=list(TARGETS), default="attn+ff", help="which UNet layers to adapt")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--per-caption", type=int, default=4, help="seeded images per held-out caption to measure")
    parser.add_argument("--no-eval", action="store_true", help="train and save only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = LoraTrainConfig(
        style=args.style, out=str(args.out), minutes=args.minutes, rank=args.rank, seed=args.seed, targets=args.targets
    )
    run(cfg)
    if not args.no_eval:
        print(json.dumps(evaluate_and_write_card(args.out, args.style, args.per_caption), indent=2))


if __name__ == "__main__":
    main()
