"""Benchmark of fused QKV projections: speed and fidelity against the plain pipeline, in one run.

Fusing Q, K and V into one matmul comes from Megatron-LM (Shoeybi et al., 2019, "Megatron-LM: Training
Multi-Billion Parameter Language Models Using Model Parallelism", arXiv:1909.08053); fastgen applies it with
``fastgen.accelerators.fuse_qkv.apply`` and takes it off with ``handle.remove()``.

What is measured, per model:
- the full-size denoisers at seeded random weights, built offline from their published configs: the Stable
  Diffusion 1.5 UNet (860M parameters) and the PixArt-Sigma DiT-XL/2 transformer (611M), each with a one- or
  two-layer text encoder of the width the denoiser expects and fastgen's tiny 8x VAE, so the denoiser dominates;
- seconds per image (text encoding, all denoising steps with classifier-free guidance, VAE decode) for the plain
  and the fused pipeline, timed interleaved (plain, fused, plain, fused, ...) after one warm-up each, with the
  same prompt and seed within each pair; the median of each and their ratio (speedup = plain / fused);
- fidelity of each fused image against the plain image of the same seed: PSNR, SSIM (``fastgen.quality``) and
  the largest absolute difference in 8-bit pixel levels;
- whether the pipeline's output after ``handle.remove()`` is bit-identical to its output before any fusion.

Random weights make the images noise, but the layer shapes, and so the cost of every matmul, are the real ones.

Run from the repository root (defaults: 256x256, 3 steps, 3 repeats, 2 threads; about 9 minutes on 2 CPU cores)::

    HF_HUB_OFFLINE=1 python benchmarks/fuse_qkv.py
    HF_HUB_OFFLINE=1 python benchmarks/fuse_qkv.py --models sd15 --steps 8 --repeats 5 --device cuda

Writes ``fuse_qkv.json`` and ``fuse_qkv.md`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
import transformers
from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from fastgen.accelerators.fuse_qkv import FuseQKVConfig, apply, denoiser
from fastgen.engine import resolve_device, resolve_dtype, to_uint8
from fastgen.models.builtin import _seeded, build_tiny_pixart, build_tiny_sd
from fastgen.quality import psnr, ssim

logger = logging.getLogger("benchmarks.fuse_qkv")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS = REPO.parent / "shared" / "data" / "prompts"
# Curated (PartiPrompts, Apache-2.0), so every run draws the same, licensed prompts.
DEFAULT_PROMPT_FILE = "parti_prompts.jsonl"
DEFAULT_OUT = REPO / "benchmarks" / "results"
# The warm-up and the removal check run one step: enough to go through every layer once, at a fraction of the cost.
CHECK_STEPS = 1


@dataclass(frozen=True)
class ModelCase:
    """A pipeline to benchmark: how to build it and the call arguments specific to it."""

    name: str
    description: str
    build: Callable[[int], Any]
    call_kwargs: dict[str, Any] = field(default_factory=dict)


def sd15_unet() -> UNet2DConditionModel:
    """The Stable Diffusion 1.5 UNet config (runwayml/stable-diffusion-v1-5, unet/config.json)."""
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    ).eval()


def clip_text_encoder(vocab_size: int, bos: int, eos: int, pad: int) -> CLIPTextModel:
    # Width 768 like CLIP ViT-L/14's text tower; two layers only, since the text encoder runs once per image.
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=2,
        num_attention_heads=12,
        max_position_embeddings=77,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return CLIPTextModel(config).eval()


def build_sd15(seed: int) -> StableDiffusionPipeline:
    """Tiny SD's tokenizer, VAE and scheduler around the full SD-1.5 UNet and a 768-wide CLIP text encoder."""
    tiny = build_tiny_sd(seed)
    tok = tiny.tokenizer
    with _seeded(seed + 10):
        text_encoder = clip_text_encoder(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    with _seeded(seed + 11):
        unet = sd15_unet()
    components = {**tiny.components, "unet": unet, "text_encoder": text_encoder}
    return StableDiffusionPipeline(**components, requires_safety_checker=False)


def pixart_sigma_transformer() -> PixArtTransformer2DModel:
    """The PixArt-Sigma XL-2 1024 config (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, transformer/config.json)."""
    return PixArtTransformer2DModel(
        num_layers=28,
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        sample_size=128,
        cross_attention_dim=1152,
        caption_channels=4096,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
        interpolation_scale=2,
    ).eval()


def t5_text_encoder(vocab_size: int, pad: int, eos: int) -> T5EncoderModel:
    # d_model 4096 is what the caption projection takes (T5-XXL's width); one thin layer keeps it cheap.
    config = T5Config(
        vocab_size=vocab_size,
        d_model=4096,
        d_kv=64,
        d_ff=256,
        num_layers=1,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    return T5EncoderModel(config).eval()


def build_pixart_sigma(seed: int) -> PixArtSigmaPipeline:
    """Tiny PixArt's tokenizer, VAE and scheduler around the full PixArt-Sigma transformer and a 4096-wide T5."""
    tiny = build_tiny_pixart(seed)
    tok = tiny.tokenizer
    with _seeded(seed + 10):
        text_encoder = t5_text_encoder(len(tok), tok.pad_token_id, tok.eos_token_id)
    with _seeded(seed + 11):
        transformer = pixart_sigma_transformer()
    return PixArtSigmaPipeline(**{**tiny.components, "transformer": transformer, "text_encoder": text_encoder})


MODELS = {
    "sd15": ModelCase("sd15", "SD-1.5 UNet (860M)", build_sd15, {"guidance_scale": 7.5}),
    "pixart": ModelCase(
        "pixart",
        "PixArt-Sigma DiT-XL/2 (611M)",
        build_pixart_sigma,
        # Binning would snap 256x256 to a 1024-class size; the tiny tokenizer has no caption cleaner's vocabulary.
        {"guidance_scale": 4.5, "use_resolution_binning": False, "clean_caption": False},
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd15,pixart", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per image")
    parser.add_argument("--size", type=int, default=256, help="image width and height in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed plain/fused pairs per model")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="a .jsonl file or a folder holding one")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights; image seeds follow from it")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="cuda when available, else cpu")
    parser.add_argument("--dtype", default="auto", help="float16 on cuda, float32 on cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for fuse_qkv.json and fuse_qkv.md")
    args = parser.parse_args(argv)
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in args.models if name not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    if args.steps < 1 or args.repeats < 1 or args.size % 8:
        parser.error("--steps and --repeats must be at least 1, --size a multiple of 8")
    return args


def prompt_file(path: Path) -> Path:
    return (path / DEFAULT_PROMPT_FILE if path.is_dir() else path).resolve()


def load_prompts(path: Path, count: int) -> list[tuple[int, str]]:
    """``count`` prompts spread evenly through a .jsonl file, with their line numbers (0-based)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    stride = max(len(lines) // count, 1)
    picked = range(0, min(len(lines), stride * count), stride)
    return [(i, json.loads(lines[i])["prompt"]) for i in picked]


def generate(pipe, case: ModelCase, prompt: str, seed: int, steps: int, size: int) -> tuple[float, np.ndarray]:
    """One image: seconds taken and the float pixels. output_type "np" copies to the host, so timing is synced."""
    start = time.perf_counter()
    output = pipe(
        prompt=prompt,
        width=size,
        height=size,
        num_inference_steps=steps,
        # A CPU generator gives the same starting noise on every device, as in the engine.
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **case.call_kwargs,
    )
    return time.perf_counter() - start, np.asarray(output.images[0])


def fused_generate(
    pipe, case: ModelCase, prompt: str, seed: int, steps: int, size: int
) -> tuple[float, np.ndarray, dict[str, Any]]:
    """One image with fused projections: its seconds, its pixels, and the handle's report with attach/remove times.

    The engine attaches and removes per request, so those times are measured too, but apart from the image's.
    """
    start = time.perf_counter()
    handle = apply(pipe, FuseQKVConfig())
    attach_s = time.perf_counter() - start
    try:
        seconds, image = generate(pipe, case, prompt, seed, steps, size)
    finally:
        start = time.perf_counter()
        handle.remove()
        remove_s = time.perf_counter() - start
    return seconds, image, {**handle.report(), "attach_s": attach_s, "remove_s": remove_s}


def run_pairs(pipe, case: ModelCase, prompts: list[tuple[int, str]], args) -> dict[str, list]:
    """Plain and fused runs interleaved, one pair per prompt, each pair with the same seed."""
    runs: dict[str, list] = {"plain_s": [], "fused_s": [], "plain": [], "fused": [], "overhead_s": []}
    for i, (_, prompt) in enumerate(prompts):
        seed = args.seed + i
        plain_s, plain = generate(pipe, case, prompt, seed, args.steps, args.size)
        fused_s, fused, report = fused_generate(pipe, case, prompt, seed, args.steps, args.size)
        logger.info("%s pair %d: plain %.2fs, fused %.2fs", case.name, i, plain_s, fused_s)
        runs["plain_s"].append(plain_s)
        runs["fused_s"].append(fused_s)
        runs["plain"].append(plain)
        runs["fused"].append(fused)
        runs["overhead_s"].append(report["attach_s"] + report["remove_s"])
    return runs


def fidelity(plain: list[np.ndarray], fused: list[np.ndarray]) -> dict[str, Any]:
    """Fused against plain, image by image, in 8-bit pixels; worst cases summarised."""
    pairs = [(to_uint8(p), to_uint8(f)) for p, f in zip(plain, fused, strict=True)]
    psnrs = [psnr(p, f) for p, f in pairs]
    ssims = [ssim(p, f) for p, f in pairs]
    diffs = [int(np.abs(p.astype(np.int16) - f.astype(np.int16)).max()) for p, f in pairs]
    return {
        "psnr_db_min": min(psnrs),
        "psnr_db": psnrs,
        "ssim_min": min(ssims),
        "ssim": ssims,
        "max_abs_diff_uint8": max(diffs),
        "max_abs_diff_float": float(max(np.abs(p - f).max() for p, f in zip(plain, fused, strict=True))),
        "bit_identical_images": sum(bool(np.array_equal(p, f)) for p, f in zip(plain, fused, strict=True)),
    }


def timing(plain_s: list[float], fused_s: list[float], overhead_s: list[float]) -> dict[str, Any]:
    ratios = [p / f for p, f in zip(plain_s, fused_s, strict=True)]
    plain_median, fused_median = statistics.median(plain_s), statistics.median(fused_s)
    overhead = statistics.median(overhead_s)
    return {
        "plain_s_per_image": plain_median,
        "fused_s_per_image": fused_median,
        "speedup": plain_median / fused_median,
        "attach_remove_s": overhead,
        # What a request sees when, like the engine, it attaches and removes the fusion around its own run.
        "speedup_with_attach": plain_median / (fused_median + overhead),
        # Each pair ran back to back, so its ratio is less exposed to drift in machine load than the medians.
        "paired_speedups": ratios,
        "plain_s": plain_s,
        "fused_s": fused_s,
    }


def bench_model(case: ModelCase, prompts: list[tuple[int, str]], args, device, dtype) -> dict[str, Any]:
    """Build, warm up, time interleaved pairs and check that removal restores the exact output."""
    start = time.perf_counter()
    pipe = case.build(args.seed).to(device)
    if dtype != torch.float32:  # built in float32; casting to the same dtype only makes diffusers warn
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - start
    _, first_prompt = prompts[0]
    _, before = generate(pipe, case, first_prompt, args.seed, CHECK_STEPS, args.size)
    *_, warmup = fused_generate(pipe, case, first_prompt, args.seed, CHECK_STEPS, args.size)
    runs = run_pairs(pipe, case, prompts, args)
    _, after = generate(pipe, case, first_prompt, args.seed, CHECK_STEPS, args.size)
    params = sum(p.numel() for p in denoiser(pipe).parameters())
    return {
        "description": case.description,
        "denoiser": type(denoiser(pipe)).__name__,
        "denoiser_parameters": params,
        "call_kwargs": case.call_kwargs,
        "build_s": build_s,
        "fused_attention_layers": warmup["fused_attention_layers"],
        **timing(runs["plain_s"], runs["fused_s"], runs["overhead_s"]),
        **fidelity(runs["plain"], runs["fused"]),
        "removal_bit_identical": bool(np.array_equal(before, after)),
    }


def machine_info(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": str(device),
        "device_name": name,
        "dtype": str(dtype).removeprefix("torch."),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def _num(value: float, digits: int) -> str:
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def markdown_table(results: dict[str, Any]) -> str:
    settings = results["settings"]
    head = (
        "| model | plain s/img | fused s/img | speedup | paired speedups | with attach+remove | min PSNR dB "
        "| min SSIM | max abs diff (0-255) | fused = plain bit-exact | removal bit-identical |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = "".join(_markdown_row(r) for r in results["models"].values())
    machine = results["machine"]
    note = (
        f"\n{settings['size']}x{settings['size']}, {settings['steps']} steps, CFG on, median of {settings['repeats']} "
        f"interleaved pairs; {machine['device']} ({machine['device_name']}), {machine['torch_threads']} threads, "
        f"{machine['dtype']}, torch {machine['torch']}, diffusers {machine['diffusers']}. "
        "Random weights, real layer shapes.\n"
    )
    return head + rows + note


def _markdown_row(r: dict[str, Any]) -> str:
    paired = ", ".join(f"{x:.2f}" for x in r["paired_speedups"])
    return (
        f"| {r['description']} | {r['plain_s_per_image']:.2f} | {r['fused_s_per_image']:.2f} | {r['speedup']:.3f} "
        f"| {paired} | {r['speedup_with_attach']:.3f} | {_num(r['psnr_db_min'], 1)} | {r['ssim_min']:.5f} "
        f"| {r['max_abs_diff_uint8']} | {r['bit_identical_images']}/{len(r['psnr_db'])} "
        f"| {'yes' if r['removal_bit_identical'] else 'NO'} |\n"
    )


def _json_safe(value):
    # JSON has no infinity; identical images' PSNR is written as the string "inf".
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_results(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "fuse_qkv.json", out / "fuse_qkv.md"
    json_path.write_text(json.dumps(_json_safe(results), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown_table(results), encoding="utf-8")
    return json_path, md_path


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    args.prompts = prompt_file(args.prompts)
    prompts = load_prompts(args.prompts, args.repeats)
    start = time.perf_counter()
    models = {}
    for name in args.models:
        logger.info("benchmarking %s", name)
        models[name] = bench_model(MODELS[name], prompts, args, device, dtype)
    settings = {
        "models": args.models,
        "size": args.size,
        "steps": args.steps,
        "check_steps": CHECK_STEPS,
        "repeats": args.repeats,
        "seed": args.seed,
        "prompts_file": str(args.prompts),
        # Line numbers only: the prompts stay in the shared data, not in the repository.
        "prompt_lines": [i for i, _ in prompts],
        "wall_s": time.perf_counter() - start,
    }
    results = {"machine": machine_info(device, dtype), "settings": settings, "models": models}
    paths = write_results(results, args.out)
    print(markdown_table(results))
    print(f"wrote {paths[0]} and {paths[1]} in {settings['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
