"""Benchmark of different LoRAs in one batch (issue 20): Punica's segmented LoRA against one request at a time.

Punica (Chen et al., "Punica: Multi-Tenant LoRA Serving", MLSys 2024) batches requests whose adapters differ: each
adapted layer computes its base output once for the batch plus each request's own low-rank update
(``fastgen.lora.segmented``). The workload: ``--requests`` requests, each with its own prompt (the drawbench trace in
``../shared/data/prompts``, read at run time) and seed and one of ``--loras`` rank-``--rank`` random-weight LoRAs
over the attention projections (cycling), on the Stable Diffusion 1.5 UNet architecture (``--width`` of its channel
widths, seeded random weights, ``fuse_qkv.build_sd15``) at ``--size`` px, ``--steps`` steps, guidance 7.5, one
thread. Three ways to serve the same requests, timed in rounds whose order rotates (a shared machine's load hits
all alike):

- ``per-request``: fastgen's engine, one request per call, the adapter switched in its slot (every adapter
  resident after a warm-up cycle: the steady state of hot-swapping);
- ``punica``: fastgen's engine, ``--batch`` requests with different adapters per call (``Engine.run_members``);
- ``diffusers-hotswap``: the peer's best path on the same pipeline files: ``enable_lora_hotswap(target_rank)``, then
  ``load_lora_weights(file, hotswap=True)`` before each request's call.

Throughput is images per second of each; fidelity is every punica image against the same request served alone
(per-request) and the diffusers image against it too (PSNR, SSIM, largest pixel difference). Goal: punica at least
1.5x the images/s of per-request swapping, every batched image within float tolerance of its solo image.

Run from the repository root (about 6 minutes on 2 CPU cores)::

    HF_HUB_OFFLINE=1 python benchmarks/lora_batching.py
    HF_HUB_OFFLINE=1 python benchmarks/lora_batching.py --width 1 --size 256 --requests 32 --batch 8

Writes ``lora_batching.json`` and ``lora_batching.md`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from fuse_qkv import build_sd15, machine_info

from fastgen.engine import Engine, Member
from fastgen.lora.library import LoraLibrary
from fastgen.lora.synthetic import ATTENTION, random_lora, write_lora
from fastgen.quality import psnr, ssim
from fastgen.settings import Settings

logger = logging.getLogger("benchmarks.lora_batching")
REPO = Path(__file__).resolve().parents[1]
TRACE = REPO.parent / "shared" / "data" / "prompts" / "drawbench_partial.jsonl"
DEFAULT_OUT = REPO / "benchmarks" / "results"
CONFIGS = ("per-request", "punica", "diffusers-hotswap")
GOAL_SPEEDUP = 1.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=float, default=0.5, help="share of SD-1.5's UNet channel widths")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--loras", type=int, default=8)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def prompts(count: int) -> list[str]:
    with TRACE.open(encoding="utf-8") as f:
        found = [json.loads(line)["prompt"] for line in f if line.strip()]
    return [found[i % len(found)] for i in range(count)]


def requests_of(args, model: str) -> list[dict[str, Any]]:
    return [
        {"prompt": prompt, "model": model, "width": args.size, "height": args.size, "steps": args.steps,
         "guidance": 7.5, "seed": args.seed + i, "loras": [{"name": f"lora{i % args.loras:02d}"}]}
        for i, prompt in enumerate(prompts(args.requests))
    ]  # fmt: skip


def per_request(engine: Engine, requests: list[dict]) -> list[np.ndarray]:
    return [np.asarray(engine.run(request).images[0]) for request in requests]


def punica(engine: Engine, requests: list[dict], batch: int) -> list[np.ndarray]:
    images = []
    for first in range(0, len(requests), batch):
        members = [Member(engine.resolve(request)) for request in requests[first : first + batch]]
        images += [np.asarray(generation.images[0]) for generation in engine.run_members(members)]
    return images


def diffusers_hotswap(pipe: StableDiffusionPipeline, requests: list[dict], files: dict[str, Path]) -> list[np.ndarray]:
    images = []
    for request in requests:
        pipe.load_lora_weights(str(files[request["loras"][0]["name"]]), adapter_name="default_0", hotswap=True)
        generator = torch.Generator("cpu").manual_seed(request["seed"])
        sizes = {"width": request["width"], "height": request["height"], "num_inference_steps": request["steps"]}
        output = pipe(request["prompt"], guidance_scale=request["guidance"], generator=generator, **sizes)
        images.append(np.asarray(output.images[0]))
    return images


def compare(reference: list[np.ndarray], images: list[np.ndarray]) -> dict[str, Any]:
    differences = [int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(reference, images, strict=True)]
    scores = [psnr(a, b) for a, b in zip(reference, images, strict=True)]
    finite = [s for s in scores if np.isfinite(s)]
    return {
        "images": len(images),
        "bit_identical": sum(d == 0 for d in differences),
        "max_abs_of_255": max(differences),
        "psnr_db_min": min(finite) if finite else float("inf"),
        "ssim_min": min(ssim(a, b) for a, b in zip(reference, images, strict=True)),
    }


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(1)
    diffusers_logging.set_verbosity_error()  # one "no text-encoder keys" line per peer swap otherwise
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastgen-lora-batching-") as tmp:
        work = Path(tmp)
        pipe = build_sd15(args.seed, args.width)
        model_dir = work / "sd15"
        pipe.save_pretrained(model_dir)
        files = {}
        for i in range(args.loras):
            tensors = random_lora(pipe.unet, args.rank, args.seed + 100 + i, ATTENTION)
            files[f"lora{i:02d}"] = write_lora(work / "loras" / f"lora{i:02d}.safetensors", tensors, base="sd1")
        settings = Settings(data_dir=work / "data", device="cpu", lora_slots=max(8, args.loras), batch_max=args.batch)
        engine = Engine(settings, loras=LoraLibrary(work / "loras"))
        requests = requests_of(args, str(model_dir))
        peer = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
        peer.set_progress_bar_config(disable=True)
        peer.enable_lora_hotswap(target_rank=args.rank)
        peer.load_lora_weights(str(files["lora00"]), adapter_name="default_0")
        runs = {
            "per-request": lambda: per_request(engine, requests),
            "punica": lambda: punica(engine, requests, args.batch),
            "diffusers-hotswap": lambda: diffusers_hotswap(peer, requests, files),
        }
        logger.info("warm-up: every adapter swapped in once, every path run once")
        images = {name: run() for name, run in runs.items()}
        seconds: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for round_ in range(args.rounds):
            order = CONFIGS[round_ % 3 :] + CONFIGS[: round_ % 3]
            for name in order:
                start = time.perf_counter()
                images[name] = runs[name]()
                seconds[name].append(time.perf_counter() - start)
                logger.info("round %d, %s: %.1f s", round_, name, seconds[name][-1])
    best = {name: min(values) for name, values in seconds.items()}
    throughput = {name: args.requests / best[name] for name in CONFIGS}
    results = {
        "machine": machine_info(torch.device("cpu"), torch.float32),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": seconds,
        "images_per_s": throughput,
        "punica_vs_per_request_x": throughput["punica"] / throughput["per-request"],
        "punica_vs_diffusers_hotswap_x": throughput["punica"] / throughput["diffusers-hotswap"],
        "fidelity": {
            "punica_vs_per_request": compare(images["per-request"], images["punica"]),
            "diffusers_hotswap_vs_per_request": compare(images["per-request"], images["diffusers-hotswap"]),
        },
        "wall_s": time.perf_counter() - started,
    }
    results["goal_met"] = results["punica_vs_per_request_x"] >= GOAL_SPEEDUP
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_batching.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (args.out / "lora_batching.md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    s, f = results["settings"], results["fidelity"]
    lines = [
        f"SD-1.5 UNet at width {s['width']}, {s['size']}², {s['steps']} steps, CFG, {s['requests']} requests over "
        f"{s['loras']} rank-{s['rank']} LoRAs, batches of {s['batch']}, 1 thread",
        "",
        "| serving | images/s | batched vs alone |",
        "|---|---|---|",
    ]
    for name in CONFIGS:
        vs = ""
        if name != "per-request":
            c = f["punica_vs_per_request" if name == "punica" else "diffusers_hotswap_vs_per_request"]
            vs = f"max {c['max_abs_of_255']}/255, {c['bit_identical']}/{c['images']} identical"
            vs += f", SSIM ≥ {c['ssim_min']:.4f}"
        lines.append(f"| {name} | {results['images_per_s'][name]:.3f} | {vs} |")
    lines += [
        "",
        f"- punica: {results['punica_vs_per_request_x']:.2f}x per-request swapping (goal ≥ {GOAL_SPEEDUP}x: "
        f"{'met' if results['goal_met'] else 'NOT met'}), {results['punica_vs_diffusers_hotswap_x']:.2f}x diffusers' "
        "hotswap",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
