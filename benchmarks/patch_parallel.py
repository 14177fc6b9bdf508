"""Benchmark of patch, sequence and CFG parallelism: 1 rank against 2 ranks on one image, speed and fidelity.

Methods: DistriFusion's displaced patch parallelism (Li et al., CVPR 2024, arXiv:2402.19481) and partially
conditioned patches (PCPP, Zhang et al., arXiv:2412.02962), with the exact synchronous split and the naive split
(no exchange) as references, and CFG parallelism (the two guidance branches on two ranks, exact); for DiTs the
split is by token chunks and ``sync`` is Ulysses sequence parallelism (Jacobs et al., arXiv:2309.14509);
``fastgen.parallel``.

What is measured, per latent size:
- ``--model sd15`` (default): a UNet with the Stable Diffusion 1.5 structure (blocks, layers, heads,
  cross-attention) at seeded random weights; ``--width 1`` is the real SD-1.5 (860M), the default 0.5 halves every
  channel count (a reduced-width copy with the same structure, so a CPU run finishes), with fastgen's tiny VAE and
  a 768-wide text encoder; ``--model pixart``: the PixArt-Sigma XL/2 transformer with ``--dit-layers`` of its 28
  layers (every layer full size; default 4 on CPU), a 4096-wide T5 and the tiny VAE;
- inside one 2-process gloo group, interleaved per repeat: the plain pipeline on rank 0 alone (1 rank x 1 thread;
  rank 1 waits), then each mode on both ranks (2 ranks x 1 thread each);
- per-step time: the median UNet call after the warm-up steps (what DistriFusion's speedup is about), and
  end-to-end time (text encoder, all steps, VAE decode: the parts that are not split are replicated);
  speedups are plain / mode, per repeat, median over repeats;
- bytes this rank received per UNet call after warm-up (gathers, neighbour swaps, the output gather);
- fidelity of each mode's image against the plain image of the same seed: PSNR and SSIM;
- the quality harness on the trained ``fastgen-shapes`` (32x32, 8x8 latents cut into two 4-row strips, 25 steps):
  PSNR/SSIM against the single-rank image and prompt adherence on every held-out caption, per mode.

Run from the repository root (defaults: sizes 256 and 512 px, width 0.5, 8 steps, 2 warm-up steps, 2 repeats;
about 8 minutes on 2 CPU cores)::

    HF_HUB_OFFLINE=1 python benchmarks/patch_parallel.py
    HF_HUB_OFFLINE=1 python benchmarks/patch_parallel.py --device cuda --width 1 --sizes 1024,2048

Writes ``patch_parallel.json`` and ``patch_parallel.md`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.distributed as dist
from diffusers import DiffusionPipeline
from fuse_qkv import build_pixart_sigma, build_sd15, denoiser_step_times

from fastgen.accelerators.fuse_qkv import denoiser
from fastgen.engine import to_uint8
from fastgen.harness import fidelity, heldout_captions
from fastgen.parallel.config import ParallelConfig
from fastgen.parallel.groups import ParallelGroups, run_ranks
from fastgen.parallel.layout import split
from fastgen.quality import psnr, ssim

logger = logging.getLogger("benchmarks.patch_parallel")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results"
# Every layout on 2 ranks: the image split two ways in each mode, or the guidance branches split (cfg).
LAYOUTS = {
    "naive": {"patch": 2, "mode": "naive"},
    "sync": {"patch": 2, "mode": "sync"},
    "displaced": {"patch": 2, "mode": "displaced"},
    "pcpp": {"patch": 2, "mode": "pcpp"},
    "cfg": {"cfg": 2},
}
MODES = tuple(LAYOUTS)
GUIDANCE = {"sd15": 7.5, "pixart": 4.5}
PROMPT = "a lighthouse on a cliff above a stormy sea at dusk, oil painting"
SHAPES = REPO / "fastgen" / "models" / "weights" / "fastgen-shapes"
SHAPES_GUIDANCE = 2.5


def build(args) -> DiffusionPipeline:
    if args.model == "pixart":
        pipe = build_pixart_sigma(args.seed, args.dit_layers)
    else:
        pipe = build_sd15(args.seed, args.width)
    pipe = pipe.to(args.device, args.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def apply(pipe, groups: ParallelGroups):
    """UNets by row strips, DiTs by token chunks; guidance is always on here."""
    return split(pipe, groups, guidance_on=True)


def timed_generate(pipe, args, size: int, decode: bool = True) -> tuple[np.ndarray | None, float, list[float]]:
    """One image, its seconds and each denoiser call's; ``decode=False`` stops at the latents, as the ranks after
    the first do in a multi-device worker."""
    extra = {"use_resolution_binning": False, "clean_caption": False} if args.model == "pixart" else {}
    with denoiser_step_times(denoiser(pipe), torch.device(args.device)) as calls:
        started = time.perf_counter()
        image = pipe(
            PROMPT,
            height=size,
            width=size,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE[args.model],
            generator=torch.Generator().manual_seed(args.seed),
            output_type="np" if decode else "latent",
            **extra,
        ).images[0]
        seconds = time.perf_counter() - started
    return (to_uint8(image) if decode else None), seconds, list(calls)


def rank_main(rank: int, world_size: int, args: argparse.Namespace) -> dict:
    """Both ranks run this; rank 0's plain runs happen while rank 1 waits at a barrier."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(message)s")
    if args.device == "cuda":
        args.device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    pipe = build(args)
    groups = {mode: ParallelGroups.build(config(mode, args)) for mode in MODES}
    results = {}
    for size in args.sizes:
        rows = results[size] = {"plain": [], **{mode: [] for mode in MODES}}
        if rank == 0:
            timed_generate(pipe, args, size)  # warm-up of the plain path
        handle = apply(pipe, groups["sync"])  # and of the split path
        try:
            timed_generate(pipe, args, size)
        finally:
            handle.remove()
        dist.barrier()
        for repeat in range(args.repeats):
            if rank == 0:
                rows["plain"].append(timed_generate(pipe, args, size))
            dist.barrier()
            for mode in MODES:
                handle = apply(pipe, groups[mode])
                try:
                    image, seconds, calls = timed_generate(pipe, args, size, decode=rank == 0)
                finally:
                    handle.remove()
                rows[mode].append((image, seconds, calls, handle.report()))
                logger.info("rank %d size %d repeat %d %s %.2fs", rank, size, repeat, mode, seconds)
    shapes = shapes_fidelity(rank, groups) if args.shapes and args.model == "sd15" else None
    return {"sizes": summarise(results, args), "shapes": shapes} if rank == 0 else {}


def shapes_fidelity(rank: int, groups: dict) -> dict:
    """Every held-out caption on fastgen-shapes, single rank (rank 0 alone) against each mode on both ranks."""
    from fastgen.shapes.evaluate import generate, load

    pipe, captions = load(SHAPES), heldout_captions()
    plain = generate(pipe, captions, SHAPES_GUIDANCE) if rank == 0 else None
    dist.barrier()
    results = {}
    for mode in MODES:
        handle = apply(pipe, groups[mode])
        try:
            images = generate(pipe, captions, SHAPES_GUIDANCE)
        finally:
            handle.remove()
        if rank == 0:
            results[mode] = fidelity(plain, images, captions)
            logger.info("fastgen-shapes %s: %s", mode, results[mode]["adherence_accelerated"])
    return results


def config(layout: str, args) -> ParallelConfig:
    return ParallelConfig(**LAYOUTS[layout], warmup_steps=args.warmup, pcpp_fraction=args.pcpp_fraction)


def summarise(results: dict, args) -> dict:
    summary = {}
    for size, rows in results.items():
        plain = rows["plain"]
        entry = {"latent": size // 8, "plain": _timing(plain, args)}
        for mode in MODES:
            runs = rows[mode]
            timing = _timing(runs, args)
            timing["step_speedup"] = statistics.median(
                statistics.median(p[2][args.warmup + 1 :]) / statistics.median(r[2][args.warmup + 1 :])
                for p, r in zip(plain, runs, strict=True)
            )
            timing["end_to_end_speedup"] = statistics.median(p[1] / r[1] for p, r in zip(plain, runs, strict=True))
            report = runs[0][3]
            timing["bytes_per_step"] = report["bytes_received_per_call_by_phase"].get(
                "stale", report["bytes_received_per_call"]
            )
            timing["bytes_per_warmup_step"] = report["bytes_received_per_call_by_phase"].get("synchronous")
            timing["psnr_db"] = _finite(psnr(plain[0][0], runs[0][0]))
            timing["ssim"] = ssim(plain[0][0], runs[0][0])
            entry[mode] = timing
        displaced = entry["displaced"]["bytes_per_step"]
        entry["pcpp"]["bytes_vs_displaced"] = entry["pcpp"]["bytes_per_step"] / displaced if displaced else None
        summary[str(size)] = entry
    return summary


def _finite(value: float) -> float | str:
    return value if np.isfinite(value) else "inf"  # JSON has no infinity


def _timing(runs: list, args) -> dict:
    steady = [statistics.median(r[2][args.warmup + 1 :]) for r in runs]
    return {"step_s": statistics.median(steady), "end_to_end_s": statistics.median(r[1] for r in runs)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,512", help="comma-separated image sizes in pixels (latent = size/8)")
    parser.add_argument("--model", choices=("sd15", "pixart"), default="sd15")
    parser.add_argument("--width", type=float, default=0.5, help="channel scale of the SD-1.5 structure (1: real)")
    parser.add_argument("--dit-layers", type=int, default=4, help="layers of PixArt-Sigma's 28 (--model pixart)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="synchronous steps after the first")
    parser.add_argument("--pcpp-fraction", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (gloo, 1 thread per rank) or cuda (NCCL, a GPU per rank)")
    parser.add_argument("--no-shapes", dest="shapes", action="store_false", help="skip the fastgen-shapes harness")
    parser.add_argument("--name", default="patch_parallel", help="output file stem")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    if args.steps <= args.warmup + 1:
        parser.error(f"--steps must exceed --warmup + 1 ({args.warmup + 1}) so some steps run displaced")
    return args


def markdown(summary: dict, shapes: dict | None, meta: dict) -> str:
    lines = [
        f"Parallelism, {meta['ranks']} ranks x 1 thread against 1 rank x 1 thread ({meta['device']}); "
        f"{meta['model_description']}, {meta['steps']} steps ({meta['warmup']} warm-up), "
        f"median of {meta['repeats']} interleaved repeats.",
    ]
    if summary:
        lines += [
            "",
            "| size (latent) | mode | step speedup | end-to-end speedup | bytes / step | PSNR vs 1 rank | SSIM |",
            "|---|---|---|---|---|---|---|",
        ]
    for size, entry in summary.items():
        for mode in MODES:
            r = entry[mode]
            psnr_text = "exact" if r["psnr_db"] == "inf" else f"{r['psnr_db']:.1f} dB"
            lines.append(
                f"| {size} ({entry['latent']}) | {mode} | {r['step_speedup']:.2f}x | {r['end_to_end_speedup']:.2f}x "
                f"| {r['bytes_per_step'] / 2**20:.2f} MiB | {psnr_text} | {r['ssim']:.3f} |"
            )
    for size, entry in summary.items():
        ratio = entry["pcpp"]["bytes_vs_displaced"]
        lines.append(f"\nAt {size} px PCPP moves {100 * ratio:.0f}% of DistriFusion's (displaced) bytes per step.")
    if shapes:
        lines += [
            "",
            "| fastgen-shapes, 45 held-out captions | PSNR dB median / min vs 1 rank | SSIM mean | adherence 1 rank | "
            "adherence split | change |",
            "|---|---|---|---|---|---|",
        ]
        for mode, r in shapes.items():
            exact, split = r["adherence_exact"]["all"], r["adherence_accelerated"]["all"]
            lines.append(
                f"| {mode} | {_db(r['psnr_db_median'])} / {_db(r['psnr_db_min'])} | {r['ssim_mean']:.3f} "
                f"| {100 * exact:.1f}% | {100 * split:.1f}% | {100 * (split - exact):+.1f} pts |"
            )
    return "\n".join(lines) + "\n"


def _db(value) -> str:
    return value if isinstance(value, str) else f"{value:.1f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.time()
    backend = "nccl" if args.device == "cuda" else "gloo"
    result = run_ranks(rank_main, 2, args, threads=1, backend=backend, timeout_s=6 * 3600)[0]
    summary, shapes = result["sizes"], result["shapes"]
    meta = {
        "ranks": 2,
        "device": args.device,
        "model": args.model,
        "model_description": (
            f"PixArt-Sigma XL/2 transformer, {args.dit_layers} of 28 layers"
            if args.model == "pixart"
            else f"SD-1.5-structure UNet at width {args.width}"
        ),
        "width": args.width,
        "dit_layers": args.dit_layers if args.model == "pixart" else None,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "pcpp_fraction": args.pcpp_fraction,
        "seconds": round(time.time() - started, 1),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "results": summary, "shapes": shapes}
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(summary, shapes, meta))
    print(markdown(summary, shapes, meta))


if __name__ == "__main__":
    main()
