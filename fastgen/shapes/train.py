"""Train a tiny latent text-to-image model on the shape scenes, from scratch, on CPU, within a time budget.

The recipe (measured on two CPU cores): an AutoencoderKL to 8x8x4 latents, then a cross-attention UNet and a small
CLIP text encoder trained jointly with v-prediction (Salimans & Ho, "Progressive Distillation", 2022) and an
x0-style loss weight (min(SNR, 5) + 1) / (SNR + 1) after Min-SNR weighting (Hang et al., 2023), on posterior-mean
latents computed once. The result is saved as an ordinary ``StableDiffusionPipeline`` directory.

    python -m fastgen.shapes.train --out DIR [--minutes-vae 10 --minutes-unet 32 --seed 0]
"""

import argparse
import copy
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTextModel, CLIPTokenizer

from fastgen.models.builtin import clip_text_encoder, stable_diffusion_pipeline
from fastgen.shapes import scenes as sc

logger = logging.getLogger(__name__)

MAX_TOKENS = 16
TEXT_DIM = 64
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass(frozen=True)
class TrainConfig:
    out: str
    minutes_vae: float = 10.0
    minutes_unet: float = 32.0
    seed: int = 0
    images: int = 16200  # jittered renders of the train scenes (40 per combination)
    latent_channels: int = 8  # 8 rather than 4: the decoder keeps the squares' corners
    vae_batch: int = 16  # small batches: four times the updates in the same time, much sharper reconstructions
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_batch: int = 128
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    snr_cap: float = 5.0
    log_every: int = 25

    def __post_init__(self):
        for name in ("minutes_vae", "minutes_unet"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout: must be in [0, 1), got {self.caption_dropout}")


def build_tokenizer(captions: list[str]) -> CLIPTokenizer:
    """A CLIP tokenizer whose BPE is trained on the caption words, so every word becomes one token.

    The merges come from a real BPE trainer: CLIP's BPE applies merges by global rank, so hand-written merge lists
    split words wrongly.
    """
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        end_of_word_suffix="</w>",
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz"),
        show_progress=False,
    )
    bpe.train_from_iterator(captions, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    vocab = dict(state["vocab"])
    for special in (_BOS, _EOS):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return clip_text_encoder(tokenizer, hidden=TEXT_DIM, max_positions=MAX_TOKENS)


def build_vae(latent_channels: int) -> AutoencoderKL:
    # Three levels: 32x32 images become 8x8 latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=sc.SIZE,
    )


def build_unet(latent_channels: int) -> UNet2DConditionModel:
    # addition_embed_type="text" adds an attention-pooled caption embedding to the time embedding.
    return UNet2DConditionModel(
        sample_size=sc.SIZE // 4,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def build_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="trailing",
        steps_offset=1,  # ignored by "trailing" spacing; set so the pipeline does not warn
    )


def make_dataset(count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Jittered renders of the train scenes in [-1, 1], NCHW, with their captions."""
    train = sc.train_scenes()
    rng = np.random.default_rng(seed)
    picks = [train[i % len(train)] for i in range(count)]
    seeds = rng.integers(0, 2**31, size=count)
    images = np.stack([sc.render(scene, int(s)) for scene, s in zip(picks, seeds, strict=True)])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, [sc.caption(scene) for scene in picks]


def cosine_lr(base: float, elapsed: float, budget: float, warmup: float = 0.02) -> float:
    """Cosine decay over wall time, since training stops at a time budget rather than a step count."""
    progress = min(elapsed / budget, 1.0)
    if progress < warmup:
        return base * max(progress / warmup, 0.05)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, cfg: TrainConfig) -> dict:
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    budget, start, step, recent = cfg.minutes_vae * 60, time.monotonic(), 0, []
    vae.train()
    while (elapsed := time.monotonic() - start) < budget:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.vae_lr, elapsed, budget)
        batch = pixels[torch.randint(len(pixels), (cfg.vae_batch,), generator=gen)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        mse = F.mse_loss(recon, batch)
        loss = mse + 0.1 * F.l1_loss(recon, batch) + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        recent.append(mse.item())
        if step % cfg.log_every == 0:
            psnr = 10 * math.log10(4.0 / np.mean(recent))  # the [-1, 1] range spans 2
            logger.info("vae step %d  %.0fs  mse %.5f  psnr %.1f dB", step, elapsed, np.mean(recent), psnr)
            recent = []
    vae.eval()
    return {"vae_steps": step, "vae_seconds": round(time.monotonic() - start, 1)}


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Posterior-mean latents of every image, computed once; also sets the VAE's scaling factor to 1/std."""
    means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(512)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return means * vae.config.scaling_factor


@torch.no_grad()
def vae_psnr(vae: AutoencoderKL, pixels: torch.Tensor) -> float:
    recon = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in pixels.split(512)])
    return 10 * math.log10(4.0 / F.mse_loss(recon.clamp(-1, 1), pixels).item())


@torch.no_grad()
def reconstruction_adherence(vae: AutoencoderKL, per_caption: int = 4) -> float:
    """Share of the VAE's reconstructions of held-out renders that the scorer reads all-correct: the ceiling the
    whole model can reach, since every generated image goes through this decoder."""
    from fastgen.shapes.score import adherence

    scenes = sc.heldout_scenes() * per_caption
    renders = np.stack([sc.render(scene, 1000 + i) for i, scene in enumerate(scenes)])
    pixels = torch.from_numpy(renders).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    images = ((recon + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return adherence(list(images), [sc.caption(scene) for scene in scenes])["all"]


def loss_weight(snr: torch.Tensor, cap: float) -> torch.Tensor:
    """x0-style weight for a v-prediction loss: (min(SNR, cap) + 1) / (SNR + 1)."""
    return (snr.clamp(max=cap) + 1) / (snr + 1)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)


def train_denoiser(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    latents: torch.Tensor,
    captions: list[str],
    cfg: TrainConfig,
) -> tuple[UNet2DConditionModel, CLIPTextModel, dict]:
    """Joint UNet + text encoder training; returns the EMA copies."""
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    ids = ids.input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids[0]
    alphas = build_scheduler().alphas_cumprod
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    budget, start, step, recent = cfg.minutes_unet * 60, time.monotonic(), 0, []
    unet.train()
    text_encoder.train()
    while (elapsed := time.monotonic() - start) < budget:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.unet_lr, elapsed, budget)
        index = torch.randint(len(latents), (cfg.unet_batch,), generator=gen)
        x0, tokens = latents[index], ids[index].clone()
        tokens[torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout] = empty
        t = torch.randint(0, len(alphas), (cfg.unet_batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=gen)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(tokens)[0]).sample
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        loss = (loss_weight(alphas[t] / (1 - alphas[t]), cfg.snr_cap) * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_unet, unet, cfg.ema_decay)
        ema_update(ema_text, text_encoder, cfg.ema_decay)
        step += 1
        recent.append(loss.item())
        if step % cfg.log_every == 0:
            logger.info("unet step %d  %.0fs  %.2fs/it  loss %.4f", step, elapsed, elapsed / step, np.mean(recent))
            recent = []
    return ema_unet, ema_text, {"unet_steps": step, "unet_seconds": round(time.monotonic() - start, 1)}


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    pipe = stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet, build_scheduler())
    pipe.save_pretrained(out, safe_serialization=True)
    return pipe


def weights_megabytes(out: Path) -> float:
    return round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6, 1)


def write_model_card(out: Path, stats: dict, evaluation: dict | None = None) -> None:
    """README.md for the weights directory: exactly how they were made, with the measured numbers."""
    from fastgen.shapes.card import model_card

    (out / "README.md").write_text(model_card(stats, evaluation))


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run(cfg: TrainConfig) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    pixels, captions = make_dataset(cfg.images, cfg.seed)
    tokenizer = build_tokenizer(sorted(set(captions)))
    logger.info("%d images of %d train combinations; vocab %d", len(pixels), len(set(captions)), len(tokenizer))
    vae, unet = build_vae(cfg.latent_channels), build_unet(cfg.latent_channels)
    text_encoder = build_text_encoder(tokenizer)
    stats = {"config": asdict(cfg), "train_combinations": len(set(captions))}
    stats["params"] = {
        "vae": count_params(vae),
        "unet": count_params(unet),
        "text_encoder": count_params(text_encoder),
    }
    logger.info("parameters %s", stats["params"])
    stats |= train_vae(vae, pixels, cfg)
    latents = encode_latents(vae, pixels)
    stats["vae_psnr_db"] = round(vae_psnr(vae, pixels[:2048]), 2)
    stats["scaling_factor"] = round(vae.config.scaling_factor, 4)
    stats["vae_heldout_adherence"] = round(reconstruction_adherence(vae), 4)
    logger.info("vae psnr %.2f dB, scaling factor %.4f", stats["vae_psnr_db"], stats["scaling_factor"])
    ema_unet, ema_text, denoiser_stats = train_denoiser(unet, text_encoder, tokenizer, latents, captions, cfg)
    stats |= denoiser_stats
    save_pipeline(out, vae, ema_text, tokenizer, ema_unet)
    stats["total_minutes"] = round((time.monotonic() - started) / 60, 1)
    stats["size_mb"] = weights_megabytes(out)
    stats["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
    (out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_model_card(out, stats)
    logger.info("saved %s (%.1f MB) after %.1f min", out, stats["size_mb"], stats["total_minutes"])
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes-vae", type=float, default=10.0)
    parser.add_argument("--minutes-unet", type=float, default=32.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run(TrainConfig(out=args.out, minutes_vae=args.minutes_vae, minutes_unet=args.minutes_unet, seed=args.seed))
    try:
        from fastgen.shapes.evaluate import evaluate_and_update_card

        evaluate_and_update_card(Path(args.out))
    except Exception:  # the weights are saved; evaluation can be rerun with python -m fastgen.shapes.evaluate
        logger.exception("evaluation after training failed")


if __name__ == "__main__":
    main()
