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
  same prompt and seed within each pair; the median of each and their ratio (speedup = plain / fused, above 1
  means fusion helps), the ratio of each pair and of the fastest images, and the median time of one denoiser call
  (one step), which has many more samples and so is the figure least moved by slow spells of a shared machine;
- the time ``apply`` plus ``handle.remove()`` take, which the engine pays on every request that asks for fusion;
- fidelity of each fused image against the plain image of the same seed: PSNR, SSIM (``fastgen.quality``) and
  the largest absolute difference in 8-bit pixel levels;
- whether the pipeline's output after ``handle.remove()`` is bit-identical to its output before any fusion
  (one-step runs of the first prompt, before the warm-up and after the last pair).

Random weights make the images noise, but the layer shapes, and so the cost of every matmul, are the real ones.
So the quality harness (``fastgen.harness``) also runs on the trained ``fastgen-shapes`` model: speed, PSNR/SSIM
and prompt adherence of fused against exact images on every held-out caption.

Run from the repository root (defaults: 256x256, 6 steps, 3 repeats, 2 threads; about 5 minutes on 2 CPU
cores)::

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
from contextlib import contextmanager
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
from fastgen.engine import Engine, resolve_device, resolve_dtype, to_uint8
from fastgen.harness import compare, engine_generate, heldout_captions
from fastgen.models.builtin import _seeded, build_tiny_pixart, build_tiny_sd
from fastgen.quality import psnr, ssim
from fastgen.settings import Settings

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


def sd15_unet(width: float = 1.0) -> UNet2DConditionModel:
    """The Stable Diffusion 1.5 UNet config (runwayml/stable-diffusion-v1-5, unet/config.json); ``width`` scales
    every channel count (0.5: a reduced-width copy with the same structure)."""
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(int(c * width) for c in (320, 640, 1280, 1280)),
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


def build_sd15(seed: int, width: float = 1.0) -> StableDiffusionPipeline:
    """Tiny SD's tokenizer, VAE and scheduler around the SD-1.5 UNet (at ``width``) and a 768-wide CLIP text
    encoder."""
    tiny = build_tiny_sd(seed)
    tok = tiny.tokenizer
    with _seeded(seed + 10):
        text_encoder = clip_text_encoder(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    with _seeded(seed + 11):
        unet = sd15_unet(width)
    components = {**tiny.components, "unet": unet, "text_encoder": text_encoder}
    return StableDiffusionPipeline(**components, requires_safety_checker=False)


def pixart_sigma_transformer(layers: int = 28) -> PixArtTransformer2DModel:
    """The PixArt-Sigma XL-2 1024 config (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, transformer/config.json);
    ``layers`` below 28 keeps every layer's shape and cuts their number (a shallower copy, so a CPU run finishes)."""
    return PixArtTransformer2DModel(
        num_layers=layers,
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


def build_pixart_sigma(seed: int, layers: int = 28) -> PixArtSigmaPipeline:
    """Tiny PixArt's tokenizer, VAE and scheduler around the PixArt-Sigma transformer and a 4096-wide T5."""
    tiny = build_tiny_pixart(seed)
    tok = tiny.tokenizer
    with _seeded(seed + 10):
        text_encoder = t5_text_encoder(len(tok), tok.pad_token_id, tok.eos_token_id)
    with _seeded(seed + 11):
        transformer = pixart_sigma_transformer(layers)
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
    parser.add_argument("--steps", type=int, default=6, help="denoising steps per image")
    parser.add_argument("--size", type=int, default=256, help="image width and height in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed plain/fused pairs per model")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="a .jsonl file or a folder holding one")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights; image seeds follow from it")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="cuda when available, else cpu")
    parser.add_argument("--dtype", default="auto", help="float16 on cuda, float32 on cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for fuse_qkv.json and fuse_qkv.md")
    parser.add_argument(
        "--adherence-captions", type=int, default=0, help="held-out captions for fastgen-shapes (0: all)"
    )
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


@dataclass
class Run:
    """One generated image: its wall time, the time of each denoiser call (one per step), and its float pixels."""

    seconds: float
    step_s: list[float]
    image: np.ndarray


@contextmanager
def denoiser_step_times(model: torch.nn.Module, device: torch.device):
    """Collect the wall time of every forward of ``model``; hooks come off again on exit."""
    times: list[float] = []
    started: list[float] = []

    def before(*_) -> None:
        _sync(device)
        started.append(time.perf_counter())

    def after(*_) -> None:
        _sync(device)
        times.append(time.perf_counter() - started.pop())

    hooks = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    try:
        yield times
    finally:
        for hook in hooks:
            hook.remove()


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously; without a sync the step times would measure only the launches.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(pipe, case: ModelCase, prompt: str, seed: int, steps: int, size: int) -> Run:
    """One image. output_type "np" copies the pixels to the host, so the image's wall time is synced."""
    with denoiser_step_times(denoiser(pipe), pipe.device) as step_s:
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
        seconds = time.perf_counter() - start
    return Run(seconds, list(step_s), np.asarray(output.images[0]))


def fused_generate(pipe, case: ModelCase, prompt: str, seed: int, steps: int, size: int) -> tuple[Run, dict]:
    """One image with fused projections, and the handle's report with the attach and remove times.

    The engine attaches and removes per request, so those times are measured too, but apart from the image's.
    """
    start = time.perf_counter()
    handle = apply(pipe, FuseQKVConfig())
    attach_s = time.perf_counter() - start
    try:
        run = generate(pipe, case, prompt, seed, steps, size)
    finally:
        start = time.perf_counter()
        handle.remove()
        remove_s = time.perf_counter() - start
    return run, {**handle.report(), "attach_s": attach_s, "remove_s": remove_s}


def run_pairs(pipe, case: ModelCase, prompts: list[tuple[int, str]], args) -> tuple[list[Run], list[Run], list[float]]:
    """Plain and fused runs interleaved, one pair per prompt, each pair with the same seed."""
    plain_runs, fused_runs, overhead_s = [], [], []
    for i, (_, prompt) in enumerate(prompts):
        seed = args.seed + i
        plain = generate(pipe, case, prompt, seed, args.steps, args.size)
        fused, report = fused_generate(pipe, case, prompt, seed, args.steps, args.size)
        logger.info("%s pair %d: plain %.2fs, fused %.2fs", case.name, i, plain.seconds, fused.seconds)
        plain_runs.append(plain)
        fused_runs.append(fused)
        overhead_s.append(report["attach_s"] + report["remove_s"])
    return plain_runs, fused_runs, overhead_s


def fidelity(plain: list[Run], fused: list[Run]) -> dict[str, Any]:
    """Fused against plain, image by image, in 8-bit pixels; worst cases summarised."""
    floats = [(p.image, f.image) for p, f in zip(plain, fused, strict=True)]
    pairs = [(to_uint8(p), to_uint8(f)) for p, f in floats]
    psnrs = [psnr(p, f) for p, f in pairs]
    ssims = [ssim(p, f) for p, f in pairs]
    diffs = [int(np.abs(p.astype(np.int16) - f.astype(np.int16)).max()) for p, f in pairs]
    return {
        "psnr_db_min": min(psnrs),
        "psnr_db": psnrs,
        "ssim_min": min(ssims),
        "ssim": ssims,
        "max_abs_diff_uint8": max(diffs),
        "max_abs_diff_float": float(max(np.abs(p - f).max() for p, f in floats)),
        "bit_identical_images": sum(bool(np.array_equal(p, f)) for p, f in floats),
    }


def timing(plain: list[Run], fused: list[Run], overhead_s: list[float]) -> dict[str, Any]:
    """Medians and ratios of image and denoiser-step times."""
    plain_s, fused_s = [r.seconds for r in plain], [r.seconds for r in fused]
    plain_steps = [t for r in plain for t in r.step_s]
    fused_steps = [t for r in fused for t in r.step_s]
    plain_median, fused_median = statistics.median(plain_s), statistics.median(fused_s)
    overhead = statistics.median(overhead_s)
    return {
        "plain_s_per_image": plain_median,
        "fused_s_per_image": fused_median,
        "speedup": plain_median / fused_median,
        # Each pair ran back to back, so its ratio is less exposed to drift in machine load than the medians.
        "paired_speedups": [p / f for p, f in zip(plain_s, fused_s, strict=True)],
        # Slow spells on a shared machine only ever add time, so the fastest image is the least disturbed one.
        "speedup_best_of": min(plain_s) / min(fused_s),
        # Many more samples than images: a slow spell that hits a few steps barely moves this median.
        "plain_s_per_step": statistics.median(plain_steps),
        "fused_s_per_step": statistics.median(fused_steps),
        "step_speedup": statistics.median(plain_steps) / statistics.median(fused_steps),
        "attach_remove_s": overhead,
        # What a request sees when, like the engine, it attaches and removes the fusion around its own run.
        "speedup_with_attach": plain_median / (fused_median + overhead),
        "plain_s": plain_s,
        "fused_s": fused_s,
        "plain_step_s": plain_steps,
        "fused_step_s": fused_steps,
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
    before = generate(pipe, case, first_prompt, args.seed, CHECK_STEPS, args.size)
    _, warmup = fused_generate(pipe, case, first_prompt, args.seed, CHECK_STEPS, args.size)
    plain, fused, overhead_s = run_pairs(pipe, case, prompts, args)
    after = generate(pipe, case, first_prompt, args.seed, CHECK_STEPS, args.size)
    return {
        "description": case.description,
        "denoiser": type(denoiser(pipe)).__name__,
        "denoiser_parameters": sum(p.numel() for p in denoiser(pipe).parameters()),
        "call_kwargs": case.call_kwargs,
        "build_s": build_s,
        "fused_attention_layers": warmup["fused_attention_layers"],
        **timing(plain, fused, overhead_s),
        **fidelity(plain, fused),
        "removal_bit_identical": bool(np.array_equal(before.image, after.image)),
    }


def shapes_adherence(captions: int, device: str, dtype: str) -> dict[str, Any]:
    """The quality harness on the trained fastgen-shapes model: speed, PSNR/SSIM and adherence, fused vs exact."""
    engine = Engine(Settings(device=device, dtype=dtype))
    return compare(engine_generate(engine), engine_generate(engine, {"fuse_qkv": True}), heldout_captions(captions))


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


SPEED_HEAD = (
    "| model | plain s/img | fused s/img | speedup | paired speedups | best-of speedup | plain s/step | fused s/step "
    "| step speedup | speedup incl. attach+remove |\n|---|---|---|---|---|---|---|---|---|---|\n"
)
FIDELITY_HEAD = (
    "| model | fused layers | min PSNR dB | min SSIM | max abs diff (0-255) | fused = plain bit-exact "
    "| removal bit-identical |\n|---|---|---|---|---|---|---|\n"
)


def markdown_table(results: dict[str, Any]) -> str:
    """Speed and fidelity, one table each; speedup = plain time / fused time, so above 1 means fusion helps."""
    models = results["models"].values()
    speed = SPEED_HEAD + "".join(_speed_row(r) for r in models)
    fidelity = FIDELITY_HEAD + "".join(_fidelity_row(r) for r in models)
    settings, machine = results["settings"], results["machine"]
    note = (
        f"{settings['size']}x{settings['size']}, {settings['steps']} steps, CFG on, {settings['repeats']} interleaved "
        f"plain/fused pairs (medians); {machine['device']} ({machine['device_name']}, {machine['cpu_count']} CPUs), "
        f"{machine['torch_threads']} threads, {machine['dtype']}, torch {machine['torch']}, "
        f"diffusers {machine['diffusers']}. Random weights, real layer shapes.\n"
    )
    return f"{speed}\n{fidelity}\n{note}\n{shapes_table(results['shapes'])}"


def shapes_table(r: dict[str, Any]) -> str:
    """The quality harness row: the trained model, held-out captions, fused vs exact with the same seeds."""
    exact, fused = r["adherence_exact"]["all"], r["adherence_accelerated"]["all"]
    return (
        "| fastgen-shapes (trained), held-out captions | speedup | PSNR dB median / min | SSIM min "
        "| adherence exact | adherence fused | change |\n|---|---|---|---|---|---|---|\n"
        f"| {r['images']} images, 32x32 | {r['speedup']:.3f} | {r['psnr_db_median']} / {r['psnr_db_min']} "
        f"| {r['ssim_min']:.5f} | {exact:.1%} | {fused:.1%} | {r['adherence_change']:+.1%} |\n"
    )


def _speed_row(r: dict[str, Any]) -> str:
    paired = ", ".join(f"{x:.2f}" for x in r["paired_speedups"])
    return (
        f"| {r['description']} | {r['plain_s_per_image']:.2f} | {r['fused_s_per_image']:.2f} | {r['speedup']:.3f} "
        f"| {paired} | {r['speedup_best_of']:.3f} | {r['plain_s_per_step']:.3f} | {r['fused_s_per_step']:.3f} "
        f"| {r['step_speedup']:.3f} | {r['speedup_with_attach']:.3f} |\n"
    )


def _fidelity_row(r: dict[str, Any]) -> str:
    return (
        f"| {r['description']} | {r['fused_attention_layers']} | {_num(r['psnr_db_min'], 1)} | {r['ssim_min']:.5f} "
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
    logger.info("adherence on fastgen-shapes")
    shapes = shapes_adherence(args.adherence_captions, args.device, args.dtype)
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
    results = {"machine": machine_info(device, dtype), "settings": settings, "models": models, "shapes": shapes}
    paths = write_results(results, args.out)
    print(markdown_table(results))
    print(f"wrote {paths[0]} and {paths[1]} in {settings['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
