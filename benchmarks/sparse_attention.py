"""Benchmark of sparse self-attention (Re-ttention's statistical reshape, Sparse VideoGen's heads) in one run.

Papers: Chen et al., "Re-ttention: Ultra Sparse Visual Generation via Attention Statistical Reshape", NeurIPS 2025;
Xi et al., "Sparse VideoGen: Accelerating Video Diffusion Transformers with Spatial-Temporal Sparsity", ICML 2025;
Dong et al., "Flex Attention: A Programming Model for Generating Optimized Attention Kernels", 2024. fastgen applies
them with ``fastgen.accelerators.sparse_attention``.

What is measured, side by side:

1. The attention op at 4k, 16k and 32k tokens (Wan 2.1's 12 heads x 128 head dim, batch 1, random q/k/v), window
   pattern at about 3% density in 128-token blocks: dense ``F.scaled_dot_product_attention`` against compiled
   FlexAttention with the block mask, timed interleaved (dense, sparse, sparse + reshape, ...). Also one refresh
   (the full attention plus the statistics a Re-ttention full step records), the block mask's build time and the
   first call's compilation time (excluded from the timings). At 4k the sparse output is checked against the
   SDPA-with-mask reference.
2. End to end on a video DiT: the Wan 2.1 T2V 1.3B transformer config (hidden 1536 = 12 heads x 128, FFN 8960, 30
   layers) with ``--layers`` of its layers and seeded random weights, a one-layer 4096-wide UMT5 text encoder and
   fastgen's tiny Wan VAE, at a long token count (default 81 frames at 320x576: 21 x 20 x 36 = 15,120 tokens).
   Each run is the pipeline call up to the final latents (text encoding and every denoising step, guidance off:
   one model call per step), dense first, then each sparse variant with the same seed; the time of each denoiser
   call is recorded, so a projection for a 50-step schedule is derived from the per-kind step times too. The VAE
   decode is left out of the timings (the tiny VAE is not the real one's cost); for the fidelity figures every run's
   first ``--decode-latent-frames`` latent frames are decoded (the VAE is causal in time, so these are exactly the
   first frames of the whole video: 17 of 81 by default, a quarter of the decode's 60 s on 2 cores).
3. Fidelity against the dense run: PSNR and SSIM of the decoded frames (``fastgen.quality``) and the relative L2
   error of the final latents, for plain sparse and for Re-ttention's reshape at the same density. The one-layer
   video config says little here (its output barely depends on one attention layer), so the same comparison also
   runs on fastgen's built-in tiny DiTs (PixArt-Sigma and Wan architectures, 2 layers, random weights) at their
   default sizes with 20 steps and guidance on (Wan: one model call per guidance branch), 8-token blocks at the
   same density.

Random weights make the videos noise, but every layer's shape, and so the cost of every matmul, is the real one.

Run from the repository root (defaults: about 17 minutes on 2 CPU cores)::

    HF_HUB_OFFLINE=1 python benchmarks/sparse_attention.py
    HF_HUB_OFFLINE=1 python benchmarks/sparse_attention.py --device cuda --layers 30 --steps 50 --dense-steps 2 \\
        --refresh-every 10

Writes ``sparse_attention.json`` and ``sparse_attention.md`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import WanPipeline, WanTransformer3DModel
from fuse_qkv import _json_safe, denoiser_step_times, machine_info
from transformers import UMT5Config, UMT5EncoderModel

from fastgen.accelerators import sparse_attention as sa
from fastgen.attention.kernels import FlexKernel, HeadPlan, ReferenceKernel, compiled_flex_attention
from fastgen.attention.patterns import TokenLayout, video_head_candidates, window
from fastgen.attention.reshape import record, reshape
from fastgen.engine import resolve_device, resolve_dtype, to_uint8
from fastgen.models.builtin import _seeded, build_tiny_pixart, build_tiny_wan
from fastgen.models.registry import BUILTIN_SPECS
from fastgen.quality import psnr, ssim

logger = logging.getLogger("benchmarks.sparse_attention")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results"
PROMPT = "a red fox running through fresh snow at dawn"
# The Wan 2.1 T2V 1.3B transformer (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json); layers cut to --layers.
WAN_1_3B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
RUNS = ("window-plain", "window-reshape", "video-heads-plain", "video-heads-reshape")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="4096,16384,32768", help="op benchmark sequence lengths")
    parser.add_argument("--op-repeats", type=int, default=2, help="interleaved dense/sparse repeats per length")
    parser.add_argument("--refresh-max-tokens", type=int, default=16384, help="time a refresh up to this length")
    parser.add_argument("--density", type=float, default=0.03125, help="share of keys each query attends to")
    parser.add_argument("--block", type=int, default=128, help="tokens per block of the block mask")
    parser.add_argument("--layers", type=int, default=1, help="transformer layers of Wan 1.3B's 30")
    parser.add_argument("--frames", type=int, default=81, help="video frames (4k + 1)")
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--steps", type=int, default=6, help="denoising steps of each end-to-end run")
    parser.add_argument("--dense-steps", type=int, default=1, help="full-attention steps at the start")
    parser.add_argument("--refresh-every", type=int, default=0, help="steps between later full steps (0: none)")
    parser.add_argument("--decode-latent-frames", type=int, default=5, help="latent frames decoded for PSNR")
    parser.add_argument("--runs", default="window-plain,window-reshape,video-heads-reshape", help=f"from {RUNS}")
    parser.add_argument("--project-steps", type=int, default=50, help="steps of the projected schedule")
    parser.add_argument("--skip-op", action="store_true", help="leave out the attention-op part")
    parser.add_argument("--skip-e2e", action="store_true", help="leave out the end-to-end part")
    parser.add_argument("--skip-tiny", action="store_true", help="leave out the tiny models' fidelity part")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="cuda when available, else cpu")
    parser.add_argument("--dtype", default="auto", help="bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--name", default="sparse_attention", help="file name of the results (.json and .md)")
    args = parser.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        parser.error(f"--runs: unknown {unknown}; choose from {list(RUNS)}")
    if (args.frames - 1) % 4 or args.height % 16 or args.width % 16:
        parser.error("--frames must be 4k + 1 and --height/--width multiples of 16")
    return args


def timed(function, device: torch.device) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    result = function()
    _sync(device)
    return time.perf_counter() - start, result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- 1. the attention op ---


def bench_op(tokens: int, args, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Dense SDPA against block-sparse FlexAttention (and its reshape) at one sequence length."""
    heads, head_dim = WAN_1_3B["num_attention_heads"], WAN_1_3B["attention_head_dim"]
    generator = torch.Generator().manual_seed(args.seed)
    q, k, v = (torch.randn(1, heads, tokens, head_dim, generator=generator).to(device, dtype) for _ in range(3))
    pattern = window(TokenLayout.flat(tokens), args.density, args.block, device)
    plan = HeadPlan((pattern,), args.block)
    kernel = FlexKernel(compiled=True)
    mask_s, _ = timed(lambda: plan.block_mask, device)
    compile_s, _ = timed(lambda: kernel.sparse(q, k, v, plan), device)
    refresh_s, stats = None, None
    if tokens <= args.refresh_max_tokens:  # a refresh costs more than dense attention: timed once, where affordable
        refresh_s, stats = timed(lambda: _refresh(kernel, q, k, v, plan), device)
    dense_s, sparse_s, reshaped_s = [], [], []
    for _ in range(args.op_repeats):
        dense_s.append(timed(lambda: F.scaled_dot_product_attention(q, k, v), device)[0])
        sparse_s.append(timed(lambda: kernel.sparse(q, k, v, plan), device)[0])
        if stats is not None:
            reshaped_s.append(timed(lambda: reshape(kernel.sparse(q, k, v, plan), stats), device)[0])
        logger.info("%d tokens: dense %.3fs, sparse %.3fs", tokens, dense_s[-1], sparse_s[-1])
    dense, sparse = statistics.median(dense_s), statistics.median(sparse_s)
    return {
        "tokens": tokens,
        "density": pattern.density,
        "block_mask_build_s": mask_s,
        "first_call_with_compile_s": compile_s,
        "dense_s": dense,
        "sparse_s": sparse,
        "sparse_reshape_s": statistics.median(reshaped_s) if reshaped_s else None,
        "refresh_s": refresh_s,
        "speedup": dense / sparse,
        "speedup_with_reshape": dense / statistics.median(reshaped_s) if reshaped_s else None,
        "latency_reduction": 1.0 - sparse / dense,
        "paired_speedups": [d / s for d, s in zip(dense_s, sparse_s, strict=True)],
        "dense_samples_s": dense_s,
        "sparse_samples_s": sparse_s,
        "max_abs_diff_vs_reference": _reference_check(q, k, v, plan) if tokens <= 4096 else None,
    }


def _refresh(kernel: FlexKernel, q, k, v, plan: HeadPlan):
    """What a Re-ttention full step computes: full attention, the sparse attention and their statistics."""
    full_out, full_lse = kernel.dense_with_lse(q, k, v)
    sparse_out, sparse_lse = kernel.sparse_with_lse(q, k, v, plan)
    return record(full_out, sparse_out, sparse_lse, full_lse)


def _reference_check(q, k, v, plan: HeadPlan) -> float:
    flex = FlexKernel(compiled=True).sparse(q, k, v, plan).float()
    reference = ReferenceKernel().sparse(q.float(), k.float(), v.float(), plan)
    return float((flex - reference).abs().max())


# --- 2. end to end on the Wan 1.3B config ---


def wan_transformer(layers: int) -> WanTransformer3DModel:
    return WanTransformer3DModel(**{**WAN_1_3B, "num_layers": layers}).eval()


def umt5_text_encoder(vocab_size: int, pad: int, eos: int) -> UMT5EncoderModel:
    # d_model 4096 is what Wan's text projection takes (UMT5-XXL's width); one thin layer keeps it cheap.
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=4096,
        d_kv=64,
        d_ff=256,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    return UMT5EncoderModel(config).eval()


def build_wan(seed: int, layers: int) -> WanPipeline:
    """Tiny Wan's tokenizer, VAE and scheduler around the Wan 2.1 1.3B transformer and a 4096-wide UMT5."""
    tiny = build_tiny_wan(seed)
    tok = tiny.tokenizer
    with _seeded(seed + 10):
        text_encoder = umt5_text_encoder(len(tok), tok.pad_token_id, tok.eos_token_id)
    with _seeded(seed + 11):
        transformer = wan_transformer(layers)
    return WanPipeline(**{**tiny.components, "transformer": transformer, "text_encoder": text_encoder})


def run_config(name: str, args) -> sa.SparseAttentionConfig | None:
    if name == "dense":
        return None
    mode, variant = name.rsplit("-", 1)
    return sa.SparseAttentionConfig(
        mode=mode,
        density=args.density,
        block_size=args.block,
        dense_steps=args.dense_steps,
        refresh_every=args.refresh_every,
        reshape=variant == "reshape",
    )


def generate(pipe, config, args, device) -> dict[str, Any]:
    """One pipeline call to the final latents, with sparse attention attached for it when ``config`` is given."""
    handle = sa.apply(pipe, config) if config is not None else None
    try:
        with denoiser_step_times(pipe.transformer, device) as step_s:
            seconds, latents = timed(lambda: _latents(pipe, args), device)
        report = handle.report() if handle is not None else {}
    finally:
        if handle is not None:
            handle.remove()
    kinds = ["dense"] * args.steps
    if config is not None:
        kinds = [sa.step_kind(i, config.dense_steps, config.refresh_every) for i in range(args.steps)]
    return {"seconds": seconds, "step_s": list(step_s), "kinds": kinds, "latents": latents, "report": report}


def _latents(pipe, args) -> torch.Tensor:
    return pipe(
        prompt=PROMPT,
        num_frames=args.frames,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=1.0,  # one model call per step
        generator=torch.Generator("cpu").manual_seed(args.seed),
        output_type="latent",
    ).frames


def decode(pipe, latents: torch.Tensor) -> np.ndarray:
    """The latents as uint8 frames, decoded as WanPipeline does."""
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
    with torch.no_grad():
        video = vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0]
    frames = pipe.video_processor.postprocess_video(video, output_type="np")[0]
    return to_uint8(np.asarray(frames))


def warm_up_kernels(layout: TokenLayout, args, device, dtype) -> dict[str, float]:
    """Compile FlexAttention for the shapes the runs will use (a window plan and a per-head plan), outside them."""
    heads, head_dim = WAN_1_3B["num_attention_heads"], WAN_1_3B["attention_head_dim"]
    # Three distinct tensors: the compiled kernel is specialised to whether query and key are the same tensor.
    q, k, v = (torch.randn(1, heads, layout.total, head_dim, device=device, dtype=dtype) for _ in range(3))
    kernel, seconds = FlexKernel(compiled=True), {}
    plans = {"window": HeadPlan((window(layout, args.density, args.block, device),), args.block)}
    if any(r.startswith("video-heads") for r in args.runs):
        candidates = video_head_candidates(layout, args.density, device)
        plans["video-heads"] = HeadPlan(candidates, args.block, torch.zeros(heads, dtype=torch.long, device=device))
    with torch.no_grad():  # as inside the pipeline: the compiled kernel is specialised to grad mode too
        for name, plan in plans.items():
            seconds[name], _ = timed(lambda plan=plan: kernel.sparse(q, k, v, plan), device)
    return seconds


def bench_e2e(args, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    start = time.perf_counter()
    pipe = build_wan(args.seed, args.layers).to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - start
    latent_frames = (args.frames - 1) // 4 + 1
    layout = TokenLayout(latent_frames, args.height // 16, args.width // 16)
    compile_s = warm_up_kernels(layout, args, device, dtype)
    runs = {}
    for name in ["dense", *args.runs]:
        logger.info("end to end: %s", name)
        runs[name] = generate(pipe, run_config(name, args), args, device)
        logger.info("%s: %.1fs, steps %s", name, runs[name]["seconds"], [round(s, 1) for s in runs[name]["step_s"]])
    dense_frames = decode(pipe, runs["dense"]["latents"][:, :, : args.decode_latent_frames])
    results = {name: _summary(run, runs["dense"], dense_frames, pipe, args) for name, run in runs.items()}
    return {
        "config": "Wan 2.1 T2V 1.3B transformer (12 heads x 128, FFN 8960), random weights",
        "layers": args.layers,
        "layers_of_full_model": WAN_1_3B["num_layers"],
        "frames": args.frames,
        "height": args.height,
        "width": args.width,
        "token_grid": [layout.frames, layout.height, layout.width],
        "tokens": layout.total,
        "steps": args.steps,
        "schedule": {"dense_steps": args.dense_steps, "refresh_every": args.refresh_every},
        "guidance": "off (one model call per step)",
        "decoded_latent_frames": args.decode_latent_frames,
        "build_s": build_s,
        "flex_compile_s": compile_s,
        "runs": results,
    }


def _summary(run, dense_run, dense_frames, pipe, args) -> dict[str, Any]:
    """Speed against the dense run, per-kind step times, a projection, and fidelity of the decoded frames."""
    by_kind: dict[str, list[float]] = {}
    for kind, seconds in zip(run["kinds"], run["step_s"], strict=True):
        by_kind.setdefault(kind, []).append(seconds)
    dense_step = statistics.median(dense_run["step_s"])
    first = args.decode_latent_frames
    frames = dense_frames if run is dense_run else decode(pipe, run["latents"][:, :, :first])
    latents, reference = run["latents"].float(), dense_run["latents"].float()
    summary = {
        "seconds": run["seconds"],
        "speedup": dense_run["seconds"] / run["seconds"],
        "step_s_by_kind": {kind: statistics.median(times) for kind, times in by_kind.items()},
        "step_s": run["step_s"],
        "psnr_db": psnr(dense_frames, frames),
        "ssim": ssim(dense_frames, frames),
        "latent_relative_l2": float((latents - reference).norm() / reference.norm()),
        "report": run["report"],
    }
    if run is not dense_run:
        summary["projected_speedup"] = _projection(summary["step_s_by_kind"], dense_step, args.project_steps)
    return summary


def _projection(step_s: dict[str, float], dense_step: float, steps: int) -> dict[str, Any]:
    """Speedup of the denoising loop for ``steps`` steps with the default schedule (2 dense steps, a refresh every
    10), from this run's median step time of each kind. Dense steps cost what the dense run's do."""
    kinds = [sa.step_kind(i, 2, 10) for i in range(steps)]
    cost = {"dense": dense_step, "refresh": step_s.get("refresh", dense_step), "sparse": step_s.get("sparse")}
    if cost["sparse"] is None:
        return {}
    total = sum(cost[kind] for kind in kinds)
    return {"steps": steps, "dense_steps": 2, "refresh_every": 10, "speedup": steps * dense_step / total}


# --- 3b. fidelity on the built-in tiny DiTs ---

TINY_STEPS = 20
TINY = {"tiny-pixart": (build_tiny_pixart, ("window",)), "tiny-wan": (build_tiny_wan, ("window", "video-heads"))}


def bench_tiny_fidelity(args, device: torch.device) -> list[dict[str, Any]]:
    """Plain sparse against Re-ttention's reshape on the built-in tiny DiTs, each against its own dense output."""
    rows = []
    for name, (build, modes) in TINY.items():
        spec = BUILTIN_SPECS[name]
        pipe = build(args.seed).to(device)
        pipe.set_progress_bar_config(disable=True)
        dense, _ = _tiny_frames(pipe, spec, None, args.seed)
        for mode in modes:
            row = {"model": name, "mode": mode, "width": spec.width, "height": spec.height, "steps": TINY_STEPS}
            for variant in ("plain", "reshape"):
                config = _tiny_config(mode, variant == "reshape", args.density)
                frames, report = _tiny_frames(pipe, spec, config, args.seed)
                row[variant] = {"psnr_db": psnr(dense, frames), "ssim": ssim(dense, frames), "report": report}
            row["density"] = row["reshape"]["report"]["density_achieved"]
            rows.append(row)
            plain, reshaped = row["plain"]["psnr_db"], row["reshape"]["psnr_db"]
            logger.info("tiny fidelity %s %s: plain %.2f dB, reshape %.2f dB", name, mode, plain, reshaped)
    return rows


def _tiny_config(mode: str, reshape_on: bool, density: float) -> sa.SparseAttentionConfig:
    # The tiny models' own schedule (2 dense steps, a refresh every 5) with blocks small enough for their tokens.
    return sa.SparseAttentionConfig(
        mode=mode, density=density, block_size=8, dense_steps=2, refresh_every=5, reshape=reshape_on
    )


def _tiny_frames(pipe, spec, config, seed: int) -> tuple[np.ndarray, dict]:
    handle = sa.apply(pipe, config) if config is not None else None
    try:
        output = pipe(
            prompt=PROMPT,
            width=spec.width,
            height=spec.height,
            num_inference_steps=TINY_STEPS,
            guidance_scale=spec.guidance,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            **({"num_frames": spec.num_frames} if spec.kind == "video" else {}),
            **spec.call_kwargs,
        )
        report = handle.report() if handle is not None else {}
    finally:
        if handle is not None:
            handle.remove()
    images = output.frames[0] if spec.kind == "video" else output.images
    return to_uint8(np.asarray(images)), report


# --- output ---


def markdown(results: dict[str, Any]) -> str:
    parts = []
    if results.get("op"):
        parts.append(_op_table(results["op"], results["settings"]))
    if results.get("e2e"):
        parts.append(_e2e_table(results["e2e"]))
    if results.get("tiny"):
        parts.append(_tiny_table(results["tiny"]))
    machine = results["machine"]
    parts.append(
        f"{machine['device']} ({machine['device_name']}, {machine['cpu_count']} CPUs), {machine['torch_threads']} "
        f"threads, {machine['dtype']}, torch {machine['torch']}, diffusers {machine['diffusers']}; "
        f"total wall time {results['settings']['wall_s']:.0f} s.\n"
    )
    return "\n".join(parts)


def _op_table(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    head = (
        f"Attention op, 12 heads x 128, batch 1, window of {settings['block']}-token blocks at density "
        f"{settings['density']:.4f}, {settings['op_repeats']} interleaved repeats (medians):\n\n"
        "| tokens | density | dense SDPA s | sparse s | speedup | sparse + reshape s | refresh s | latency cut "
        "| block mask build s | first call (compile) s |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['tokens']} | {r['density']:.4f} | {r['dense_s']:.3f} | {r['sparse_s']:.4f} | {r['speedup']:.1f}x "
        f"| {_num(r['sparse_reshape_s'], 4)} | {_num(r['refresh_s'], 2)} | {r['latency_reduction']:.1%} "
        f"| {r['block_mask_build_s']:.2f} | {r['first_call_with_compile_s']:.1f} |\n"
        for r in rows
    )
    return head + body


def _e2e_table(e2e: dict[str, Any]) -> str:
    grid = "x".join(str(n) for n in e2e["token_grid"])
    head = (
        f"End to end: {e2e['config']}, {e2e['layers']} of {e2e['layers_of_full_model']} layers, "
        f"{e2e['frames']} frames at {e2e['width']}x{e2e['height']} ({grid} = {e2e['tokens']} tokens), "
        f"{e2e['steps']} steps, guidance off, schedule {e2e['schedule']}; "
        f"pipeline call to the final latents (VAE decode excluded; PSNR/SSIM over the first "
        f"{e2e['decoded_latent_frames']} latent frames decoded):\n\n"
        "| run | density | s | speedup | dense / refresh / sparse step s | projected 50-step speedup "
        "| PSNR dB vs dense | SSIM | latent rel. L2 |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(_e2e_row(name, r) for name, r in e2e["runs"].items())
    return head + body


def _e2e_row(name: str, r: dict[str, Any]) -> str:
    kinds = r["step_s_by_kind"]
    steps = " / ".join(f"{kinds[k]:.1f}" if k in kinds else "-" for k in ("dense", "refresh", "sparse"))
    density = r["report"].get("density_achieved")
    projected = r.get("projected_speedup", {}).get("speedup")
    return (
        f"| {name} | {'1' if density is None else f'{density:.4f}'} | {r['seconds']:.1f} | {r['speedup']:.2f}x "
        f"| {steps} | {'-' if projected is None else f'{projected:.2f}x'} | {_db(r['psnr_db'])} | {r['ssim']:.4f} "
        f"| {r['latent_relative_l2']:.4f} |\n"
    )


def _tiny_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"Fidelity on the built-in tiny DiTs (2 layers, random weights, default sizes, {TINY_STEPS} steps, guidance "
        "on, 8-token blocks, 2 dense steps and a refresh every 5), each against its own dense output:\n\n"
        "| model | mode | density | PSNR dB plain | PSNR dB reshape | SSIM plain | SSIM reshape |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['model']} {r['width']}x{r['height']} | {r['mode']} | {r['density']:.4f} "
        f"| {_db(r['plain']['psnr_db'])} | {_db(r['reshape']['psnr_db'])} | {r['plain']['ssim']:.4f} "
        f"| {r['reshape']['ssim']:.4f} |\n"
        for r in rows
    )
    return head + body


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


def write_results(results: dict[str, Any], out: Path, name: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(_json_safe(results), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown(results), encoding="utf-8")
    return json_path, md_path


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if args.dtype == "auto" and device.type == "cuda" else resolve_dtype(args.dtype, device)
    compiled_flex_attention()  # one compiled wrapper for the whole run
    start = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(device, dtype)}
    if not args.skip_op:
        results["op"] = [bench_op(tokens, args, device, dtype) for tokens in args.tokens]
    if not args.skip_e2e:
        results["e2e"] = bench_e2e(args, device, dtype)
    if not args.skip_tiny:
        results["tiny"] = bench_tiny_fidelity(args, device)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    results["settings"] = {**settings, "wall_s": time.perf_counter() - start}
    paths = write_results(results, args.out, args.name)
    print(markdown(results))
    print(f"wrote {paths[0]} and {paths[1]} in {results['settings']['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
