"""Benchmark of LoRA hot-swapping (issue 9): fastgen's resident adapter slots against loading each LoRA per request.

LoRA is Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022). Serving many of them is
SwiftDiffusion's problem (Li et al., "SwiftDiffusion: Efficient Diffusion Model Serving with Add-on Modules", 2024),
which reports up to 5x lower serving latency. Our goals: switching at least 10x faster than the naive path, and
LoRA requests within 5% of the latency of requests without LoRAs.

The model: the Stable Diffusion 1.5 UNet config at seeded random weights (``--width 1``: the real 860M-parameter
layer shapes, so adapters have their real size and layer count) with a 768-wide text encoder and fastgen's tiny VAE
(``fuse_qkv.build_sd15``). The adapters: ``--loras`` random-weight rank-``--rank`` LoRA files written to a temporary
library, a mix of what people share: diffusers/PEFT and Kohya key names, attention projections (to_q, to_k, to_v,
to_out.0 of every transformer block) and some also the feed-forward layers, one Kohya file with alpha = rank / 2.

The workload: ``--requests`` requests with their own prompt and seed, cycling through the LoRAs, every fourth one
without a LoRA. Each request is served by four configurations, interleaved (the order rotates per request) so that
the load of a shared machine hits all alike; each has its own pipeline object over the same, shared base weights:

- ``plain``: the pipeline without any LoRA (every request, without its LoRA: the paired baseline);
- ``naive``: ``load_lora_weights(path on disk)`` before the call, ``unload_lora_weights()`` after it;
- ``fastgen``: ``AdapterSlots`` with one slot per LoRA, all resident after a warm-up cycle (the steady state):
  ``activate`` before the call, ``remove()`` after it, as the engine does;
- ``fastgen-swap``: ``AdapterSlots`` with ``--slots`` slots (default 4) for all the LoRAs cycling: every LoRA
  request hot-swaps weights into a slot (least recently used), the worst case. An adapter's first swap (in the
  warm-up cycle) goes through diffusers; later ones copy what that swap left, kept in host memory.

Per request: switch time (naive: load + unload; fastgen: activate + remove), every denoiser call, the pipeline call
(text encoder, denoising with classifier-free guidance, VAE decode) and end to end (switch + call). Then:

- the per-step cost of an active (unfused) LoRA, from alternated denoiser calls on the same inputs (plain, adapters
  switched off, an attention LoRA active, an attention + feed-forward LoRA active), with the FLOPs of each; this is
  what decides the 5% goal, since switching is paid once per request and the adapter on every step;
- switching alone, many times, at each of ``--switch-threads``, with naive's file read timed apart;
- fidelity: every LoRA image of fastgen against the naive fresh load of the same request, and every no-LoRA image
  (served after LoRA requests) against the plain pipeline's.

A second part (``--part shapes``) measures what adapters do to pictures, with the LoRAs fastgen ships for
``fastgen-shapes`` (``fastgen/models/weights/loras``, listed by a library with no directory, as a fresh service lists
them): over held-out captions (four seeded images each, ``fastgen.shapes.evaluate``), the style-check pass rate and
caption adherence of each adapter loaded fresh (``load_lora_weights`` on its own pipeline), hot-swapped through
fastgen's slots (two slots for the three adapters, cycled twice: the first cycle swaps through diffusers, the second
copies from host memory) and without it; the swapped images must equal the fresh ones, and after them a request
without adapters must get the plain pipeline's pixels.

Run from the repository root (defaults: full width, 128x128, 4 steps, 8 LoRAs, 16 requests, 1 thread; about 13
minutes on 2 shared CPU cores, then the shapes part)::

    HF_HUB_OFFLINE=1 python benchmarks/lora_hotswap.py
    HF_HUB_OFFLINE=1 python benchmarks/lora_hotswap.py --part shapes   # the fidelity part alone (minutes)
    HF_HUB_OFFLINE=1 python benchmarks/lora_hotswap.py --device cuda --size 512 --steps 25 --requests 24

One thread by default: on 2 cores that another job kept busy, 2 threads ran one full-width step 2.5-3.5x slower
than 1 thread (every parallel op waits for the core the other job holds), and that wait also lands on every small
copy of a swap. 128 px and 4 steps keep 64 full-width images within the time budget; the ratios are what count.
Writes ``lora_hotswap.json`` and ``lora_hotswap.md`` (speed), ``lora_hotswap_shapes.json`` and ``.md`` (the shapes
part) to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from fuse_qkv import (
    DEFAULT_PROMPTS,
    _json_safe,
    build_sd15,
    denoiser_step_times,
    load_prompts,
    machine_info,
    prompt_file,
)
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from fastgen.engine import resolve_device, resolve_dtype
from fastgen.lora.hotswap import ActiveLoras, AdapterSlots
from fastgen.lora.library import LoraLibrary
from fastgen.lora.synthetic import ATTENTION, random_lora, write_lora
from fastgen.models.registry import WEIGHTS_DIR
from fastgen.shapes import scenes as sc
from fastgen.shapes.evaluate import STEPS as SHAPES_STEPS
from fastgen.shapes.evaluate import generate, style_results

logger = logging.getLogger("benchmarks.lora_hotswap")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results"
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
GUIDANCE = 7.5
NO_LORA_EVERY = 4  # every fourth request comes without a LoRA
WARMUP_STEPS = 1
CONFIGS = ("plain", "naive", "fastgen", "fastgen-swap")
GOAL_SWITCH_SPEEDUP = 10.0
GOAL_LORA_OVERHEAD = 0.05
PARTS = ("all", "speed", "shapes")
SHAPES_MODEL = WEIGHTS_DIR / "fastgen-shapes"
SHAPES_GUIDANCE = 2.5
SHAPES_SLOTS = 2  # fewer than the shipped adapters, so every adapter is swapped in again on the second cycle


@dataclass(frozen=True)
class LoraKind:
    """How one library file is made: the layers it adapts, its key names, and its alpha as a share of its rank."""

    label: str
    targets: tuple[str, ...]
    kohya: bool = False
    alpha_ratio: float | None = None  # Kohya files carry an alpha; None writes alpha = rank


ATTN = LoraKind("peft attn", ATTENTION)
ATTN_FF = LoraKind("peft attn+ff", ATTENTION + FEED_FORWARD)
KOHYA_ATTN = LoraKind("kohya attn", ATTENTION, kohya=True)
KOHYA_ATTN_FF = LoraKind("kohya attn+ff", ATTENTION + FEED_FORWARD, kohya=True)
KOHYA_HALF_ALPHA = LoraKind("kohya attn, alpha=rank/2", ATTENTION, kohya=True, alpha_ratio=0.5)
# The library, cycled when --loras asks for more files than kinds.
LORA_KINDS = (ATTN, ATTN_FF, KOHYA_ATTN, ATTN, KOHYA_ATTN_FF, ATTN_FF, ATTN, KOHYA_HALF_ALPHA)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="image width and height in pixels")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per image")
    parser.add_argument("--width", type=float, default=1.0, help="UNet channel width (1: the real SD-1.5 shapes)")
    parser.add_argument("--loras", type=int, default=8, help="LoRA files in the library")
    parser.add_argument("--rank", type=int, default=64, help="rank of every LoRA")
    parser.add_argument("--requests", type=int, default=16, help="requests per configuration")
    parser.add_argument("--slots", type=int, default=4, help="slots of the fastgen-swap configuration")
    parser.add_argument("--overhead-rounds", type=int, default=5, help="rounds of alternated denoiser calls")
    parser.add_argument("--switch-cycles", type=int, default=2, help="cycles through the LoRAs, switching only")
    parser.add_argument("--switch-threads", default="1,2", help="torch threads for the switching-only runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights; LoRA and image seeds follow")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the requests")
    parser.add_argument("--device", default="auto", help="cuda when available, else cpu")
    parser.add_argument("--dtype", default="auto", help="float16 on cuda, float32 on cpu")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="a .jsonl file or a folder holding one")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for lora_hotswap.json and .md")
    parser.add_argument("--part", choices=PARTS, default="all", help="speed (SD-1.5), shapes (shipped LoRAs) or all")
    parser.add_argument("--shapes-per-caption", type=int, default=4, help="seeded images per held-out caption")
    args = parser.parse_args(argv)
    args.switch_threads = [int(t) for t in args.switch_threads.split(",") if t.strip()]
    if args.size % 8 or args.steps < 1 or args.requests < NO_LORA_EVERY or args.rank < 1:
        parser.error("--size must be a multiple of 8, --steps and --rank at least 1, --requests at least 4")
    if not 1 <= args.slots < args.loras:
        parser.error("--slots must be at least 1 and fewer than --loras (the swapping configuration)")
    return args


# --- the library ---------------------------------------------------------------------------------------------


def lora_tensors(unet: torch.nn.Module, kind: LoraKind, rank: int, seed: int) -> dict[str, torch.Tensor]:
    tensors = random_lora(unet, rank, seed, kind.targets, kohya=kind.kohya)
    if kind.alpha_ratio is None:
        return tensors
    alpha = float(rank * kind.alpha_ratio)
    return {key: torch.tensor(alpha) if key.endswith(".alpha") else value for key, value in tensors.items()}


def write_library(unet: torch.nn.Module, directory: Path, count: int, rank: int, seed: int) -> list[dict[str, Any]]:
    """``count`` LoRA files in ``directory``; what each one is, in library order."""
    made = []
    for i in range(count):
        kind = LORA_KINDS[i % len(LORA_KINDS)]
        name = f"lora{i:02d}"
        path = write_lora(directory / f"{name}.safetensors", lora_tensors(unet, kind, rank, seed + i), base="sd1")
        alpha = rank * (kind.alpha_ratio or 1.0)
        made.append({"name": name, "kind": kind.label, "alpha": alpha, "size_bytes": path.stat().st_size})
    return made


# --- the pipelines -------------------------------------------------------------------------------------------


def shared_copy(pipe):
    """A pipeline object of its own (modules, adapters) over the same weight tensors: no configuration changes
    base weights in place, and four copies of 860M parameters would not fit beside another engineer's work."""
    memo = {}
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            memo |= {id(t): t for t in (*component.parameters(), *component.buffers())}
    return copy.deepcopy(pipe, memo)


@dataclass(frozen=True)
class Request:
    index: int
    prompt: str
    seed: int
    lora: str | None


def workload(prompts: list[str], loras: list[str], seed: int) -> list[Request]:
    """One request per prompt; every fourth without a LoRA, the others cycling through the library."""
    requests, cycled = [], 0
    for i, prompt in enumerate(prompts):
        lora = None
        if i % NO_LORA_EVERY != NO_LORA_EVERY - 1:
            lora, cycled = loras[cycled % len(loras)], cycled + 1
        requests.append(Request(i, prompt, seed + i, lora))
    return requests


@dataclass
class Record:
    """One served request: switch-in and switch-out times, the pipeline call, its denoiser calls, its pixels."""

    config: str
    index: int
    lora: str | None
    switch_in_s: float = 0.0
    switch_out_s: float = 0.0
    call_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    image: np.ndarray | None = None

    @property
    def switch_s(self) -> float:
        return self.switch_in_s + self.switch_out_s

    @property
    def end_to_end_s(self) -> float:
        return self.switch_s + self.call_s

    def public(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "index": self.index,
            "lora": self.lora,
            "switch_in_s": self.switch_in_s,
            "switch_out_s": self.switch_out_s,
            "call_s": self.call_s,
            "end_to_end_s": self.end_to_end_s,
            "step_s": self.step_s,
            **self.details,
        }


class Plain:
    """Serves every request without its LoRA."""

    def __init__(self, pipe):
        self.pipe = pipe

    def switch_in(self, lora: str | None) -> dict[str, Any]:
        return {}

    def switch_out(self) -> None:
        pass


class Naive:
    """A fresh load from disk per LoRA request, unloaded after it: what a server without adapter management does."""

    def __init__(self, pipe, directory: Path):
        self.pipe, self.directory, self.loaded = pipe, directory, False

    def switch_in(self, lora: str | None) -> dict[str, Any]:
        if lora is not None:
            self.pipe.load_lora_weights(str(self.directory / f"{lora}.safetensors"), adapter_name=lora)
            self.loaded = True
        return {}

    def switch_out(self) -> None:
        if self.loaded:
            self.pipe.unload_lora_weights()
            self.loaded = False


class Fastgen:
    """fastgen's adapter slots, used as ``Engine._activate`` does (synchronous swap, switched off after the run)."""

    def __init__(self, pipe, library: LoraLibrary, slots: int):
        self.pipe, self.library = pipe, library
        self.slots = AdapterSlots(pipe, library, slots)
        self.active: ActiveLoras | None = None

    def switch_in(self, lora: str | None) -> dict[str, Any]:
        if lora is None:  # the engine activates nothing for a request without adapters
            return {}
        self.active = self.slots.activate([(self.library.get(lora), 1.0)])
        (adapter,) = self.active.report()["adapters"]
        return {"resident": adapter["resident"], "swap_s": adapter.get("swap_s", 0.0), "swap": adapter.get("swap")}

    def switch_out(self) -> None:
        if self.active is not None:
            self.active.remove()
            self.active = None


def build_configs(pipe, directory: Path, library: LoraLibrary, args) -> dict[str, Any]:
    return {
        "plain": Plain(pipe),
        "naive": Naive(shared_copy(pipe), directory),
        "fastgen": Fastgen(shared_copy(pipe), library, args.loras),
        "fastgen-swap": Fastgen(shared_copy(pipe), library, args.slots),
    }


# --- serving -------------------------------------------------------------------------------------------------


def serve(name: str, config, request: Request, args, device: torch.device, steps: int) -> Record:
    """One request end to end: switch in, the pipeline call (timed with its denoiser calls), switch out."""
    lora = None if name == "plain" else request.lora
    record = Record(name, request.index, lora)
    started = time.perf_counter()
    record.details = config.switch_in(lora)
    record.switch_in_s = time.perf_counter() - started
    try:
        with denoiser_step_times(config.pipe.unet, device) as step_s:
            started = time.perf_counter()
            record.image = call(config.pipe, request, args, steps)
            record.call_s = time.perf_counter() - started
        record.step_s = list(step_s)
    finally:
        started = time.perf_counter()
        config.switch_out()
        record.switch_out_s = time.perf_counter() - started
    return record


def call(pipe, request: Request, args, steps: int) -> np.ndarray:
    """The image as float pixels; output_type "np" copies them to the host, so the call's time is synced."""
    output = pipe(
        prompt=request.prompt,
        width=args.size,
        height=args.size,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        generator=torch.Generator("cpu").manual_seed(request.seed),  # the same noise on every device
        output_type="np",
    )
    return np.asarray(output.images[0])


def warm_up(configs: dict[str, Any], requests: list[Request], loras: list[str], args, device) -> dict[str, Any]:
    """One short image per configuration, and a first cycle through the LoRAs (fastgen: fills its slots).

    Returns the switch times of that first cycle, and of the very first switch-in (fastgen builds its slots then).
    """
    first = next(r for r in requests if r.lora is not None)
    first_in = {
        name: serve(name, config, first, args, device, WARMUP_STEPS).switch_in_s for name, config in configs.items()
    }
    cold = {}
    for name in ("naive", "fastgen", "fastgen-swap"):
        times = [switch_once(configs[name], lora) for lora in loras]
        cold[name] = {
            "first_switch_in_s": first_in[name],
            "first_cycle_median_s": statistics.median(times),
            "s": times,
        }
    return cold


def switch_once(config, lora: str) -> float:
    started = time.perf_counter()
    config.switch_in(lora)
    config.switch_out()
    return time.perf_counter() - started


def run_workload(configs: dict[str, Any], requests: list[Request], args, device) -> list[Record]:
    """Every request through every configuration, the order of configurations rotating per request."""
    records = []
    for request in requests:
        shift = request.index % len(CONFIGS)
        for name in CONFIGS[shift:] + CONFIGS[:shift]:
            record = serve(name, configs[name], request, args, device, args.steps)
            records.append(record)
            logger.info(
                "request %d %-12s lora=%-7s switch %.3fs call %.2fs",
                request.index,
                name,
                record.lora,
                record.switch_s,
                record.call_s,
            )
    return records


# --- the cost of an active adapter per step ------------------------------------------------------------------


def denoiser_inputs(pipe, args, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A guided step's inputs: two latents (unconditional and conditional) and two text embeddings."""
    generator = torch.Generator("cpu").manual_seed(args.seed)
    side = args.size // pipe.vae_scale_factor
    latents = torch.randn(2, pipe.unet.config.in_channels, side, side, generator=generator)
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    return latents.to(device, dtype), text.to(device, dtype)


def denoiser_call_s(unet, inputs, device) -> float:
    latents, text = inputs
    with torch.no_grad(), denoiser_step_times(unet, device) as times:
        unet(latents, 500, encoder_hidden_states=text)
    return times[0]


def denoiser_flops(unet, inputs) -> int:
    latents, text = inputs
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(latents, 500, encoder_hidden_states=text)
    return counter.get_total_flops()


def step_overhead(configs: dict[str, Any], library_made: list[dict], args, device, dtype) -> dict[str, Any]:
    """Alternated denoiser calls on the same inputs: plain; naive with an attention LoRA loaded; fastgen with its
    adapters off, an attention LoRA active, an attention + feed-forward LoRA active."""
    plain, naive, fastgen = configs["plain"], configs["naive"], configs["fastgen"]
    by_kind = {item["kind"]: item["name"] for item in reversed(library_made)}  # the first of each kind
    variants = {"plain": (plain, None), "naive: peft attn loaded": (naive, by_kind.get(ATTN.label))}
    variants["fastgen: adapters off"] = (fastgen, None)
    for kind in (ATTN, ATTN_FF):
        if kind.label in by_kind:
            variants[f"fastgen: {kind.label} active"] = (fastgen, by_kind[kind.label])
    inputs = denoiser_inputs(plain.pipe, args, device, dtype)
    times: dict[str, list[float]] = {name: [] for name in variants}
    flops = {}
    for round_ in range(args.overhead_rounds):
        names = list(variants)[round_ % len(variants) :] + list(variants)[: round_ % len(variants)]
        for name in names:
            config, lora = variants[name]
            config.switch_in(lora)
            try:
                times[name].append(denoiser_call_s(config.pipe.unet, inputs, device))
                if round_ == 0:
                    flops[name] = denoiser_flops(config.pipe.unet, inputs)
            finally:
                config.switch_out()
    return overhead_summary(times, flops)


def overhead_summary(times: dict[str, list[float]], flops: dict[str, int]) -> dict[str, Any]:
    plain_s, plain_flops = statistics.median(times["plain"]), flops["plain"]
    return {
        name: {
            "median_s": statistics.median(samples),
            "vs_plain": statistics.median(samples) / plain_s - 1,
            "flops": flops[name],
            "flops_vs_plain": flops[name] / plain_flops - 1,
            "s": samples,
        }
        for name, samples in times.items()
    }


# --- switching alone -----------------------------------------------------------------------------------------


def switching_only(configs: dict[str, Any], directory: Path, loras: list[str], args) -> dict[str, Any]:
    """Switch in and out many times without denoising, at each thread count; naive's file read timed apart."""
    results = {}
    restore = torch.get_num_threads()
    try:
        for threads in args.switch_threads:
            torch.set_num_threads(threads)
            results[str(threads)] = switch_samples(configs, directory, loras, args.switch_cycles)
    finally:
        torch.set_num_threads(restore)
    return results


def switch_samples(configs: dict[str, Any], directory: Path, loras: list[str], cycles: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {"file_read": []}
    for _ in range(cycles):
        for lora in loras:
            started = time.perf_counter()
            load_file(str(directory / f"{lora}.safetensors"))
            samples["file_read"].append(time.perf_counter() - started)
            for name in ("naive", "fastgen", "fastgen-swap"):
                for part, seconds in switch_parts(configs[name], lora).items():
                    samples.setdefault(f"{name} {part}", []).append(seconds)
    return {name: {"median_s": statistics.median(s), "s": s} for name, s in samples.items()}


def switch_parts(config, lora: str) -> dict[str, float]:
    started = time.perf_counter()
    details = config.switch_in(lora)
    switched_in = time.perf_counter()
    config.switch_out()
    ended = time.perf_counter()
    parts = {"in": switched_in - started, "out": ended - switched_in, "total": ended - started}
    if "swap_s" in details:
        parts["swap"] = details["swap_s"]
    return parts


# --- summaries -----------------------------------------------------------------------------------------------


def median_of(records: list[Record], value) -> float | None:
    values = [value(r) for r in records]
    return statistics.median(values) if values else None


def config_summary(records: list[Record], plain: dict[int, Record]) -> dict[str, Any]:
    """Medians over one configuration's requests, LoRA and no-LoRA apart; paired ratios against plain."""
    with_lora = [r for r in records if r.lora is not None]
    without = [r for r in records if r.lora is None]
    swapped = [r for r in with_lora if not r.details.get("resident", True)]
    return {
        "lora_requests": len(with_lora),
        "swapped_requests": len(swapped),
        "switch_s": median_of(with_lora, lambda r: r.switch_s),
        "switch_in_s": median_of(with_lora, lambda r: r.switch_in_s),
        "switch_out_s": median_of(with_lora, lambda r: r.switch_out_s),
        "swap_s": median_of(swapped, lambda r: r.details["swap_s"]),
        "swaps_by_copy": sum(r.details.get("swap") == "copy" for r in swapped),
        "step_s_lora": median_of([t for r in with_lora for t in r.step_s], lambda t: t),
        "step_s_no_lora": median_of([t for r in without for t in r.step_s], lambda t: t),
        "denoise_s_lora": median_of(with_lora, lambda r: sum(r.step_s)),
        "end_to_end_s_lora": median_of(with_lora, lambda r: r.end_to_end_s),
        "end_to_end_s_no_lora": median_of(without, lambda r: r.end_to_end_s),
        # Same prompt, seed and moment as the plain run of the request: the least noisy comparison.
        "paired_end_to_end_vs_plain_lora": median_of(with_lora, lambda r: r.end_to_end_s / plain[r.index].call_s),
        "paired_step_vs_plain_lora": median_of(
            with_lora, lambda r: statistics.median(r.step_s) / statistics.median(plain[r.index].step_s)
        ),
        "paired_end_to_end_vs_plain_no_lora": median_of(without, lambda r: r.end_to_end_s / plain[r.index].call_s),
    }


def fidelity(records: list[Record], requests: list[Request], made: list[dict[str, Any]]) -> dict[str, Any]:
    """fastgen's LoRA images against the naive fresh load's, per LoRA; no-LoRA images against plain's."""
    image = {(r.config, r.index): r.image for r in records}
    lora_of = {request.index: request.lora for request in requests}
    per_lora = {item["name"]: {**item, "requests": 0} for item in made}
    no_lora = {name: {"requests": 0, "bit_identical": 0, "max_abs_diff": 0.0} for name in CONFIGS[1:]}
    for index, lora in lora_of.items():
        if lora is None:
            for name, row in no_lora.items():
                _compare(row, "", image[(name, index)], image[("plain", index)])
            continue
        row = per_lora[lora]
        row["requests"] += 1
        _compare(row, "naive_vs_plain", image[("naive", index)], image[("plain", index)])
        for name in ("fastgen", "fastgen-swap"):
            _compare(row, f"{name}_vs_naive", image[(name, index)], image[("naive", index)])
    return {"loras": list(per_lora.values()), "no_lora_vs_plain": no_lora}


def _compare(row: dict[str, Any], prefix: str, image: np.ndarray, reference: np.ndarray) -> None:
    key = f"{prefix}_" if prefix else ""
    diff = float(np.abs(image.astype(np.float64) - reference).max())
    row[f"{key}max_abs_diff"] = max(row.get(f"{key}max_abs_diff", 0.0), diff)
    row[f"{key}bit_identical"] = row.get(f"{key}bit_identical", 0) + int(np.array_equal(image, reference))
    if prefix == "":
        row["requests"] += 1


def goals(summary: dict[str, Any], switching: dict[str, Any], threads: int) -> dict[str, Any]:
    naive, steady, swap = summary["naive"], summary["fastgen"], summary["fastgen-swap"]
    alone = switching.get(str(threads), {})
    return {
        "switch_speedup_steady": naive["switch_s"] / steady["switch_s"],
        "switch_speedup_swapping": naive["switch_s"] / swap["switch_s"],
        "switch_speedup_steady_switching_only": _ratio(alone, "naive total", "fastgen total"),
        "switch_speedup_swapping_switching_only": _ratio(alone, "naive total", "fastgen-swap total"),
        "fastgen_lora_vs_no_lora_paired": steady["paired_end_to_end_vs_plain_lora"] - 1,
        "fastgen_lora_vs_no_lora_medians": steady["end_to_end_s_lora"] / summary["plain"]["end_to_end_s_no_lora"] - 1,
        "fastgen_swap_lora_vs_no_lora_paired": swap["paired_end_to_end_vs_plain_lora"] - 1,
        "naive_vs_fastgen_end_to_end": naive["end_to_end_s_lora"] / steady["end_to_end_s_lora"],
        "naive_vs_fastgen_swap_end_to_end": naive["end_to_end_s_lora"] / swap["end_to_end_s_lora"],
        # What the 5% goal is spent on: switching (once per request) against the adapter's cost on every step.
        "fastgen_switch_share_of_end_to_end": steady["switch_s"] / steady["end_to_end_s_lora"],
        "fastgen_step_vs_plain_paired": steady["paired_step_vs_plain_lora"] - 1,
    }


def _ratio(samples: dict[str, Any], numerator: str, denominator: str) -> float | None:
    if numerator not in samples or denominator not in samples:
        return None
    return samples[numerator]["median_s"] / samples[denominator]["median_s"]


# --- output --------------------------------------------------------------------------------------------------


def _s(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


REQUESTS_HEAD = (
    "| configuration | LoRA requests (swapped) | switch s (in + out) | s/step, LoRA | s/step, no LoRA "
    "| end-to-end s, LoRA | end-to-end s, no LoRA | LoRA e2e vs plain (paired) | LoRA step vs plain (paired) |\n"
    "|---|---|---|---|---|---|---|---|---|\n"
)
CONFIG_LABELS = {
    "plain": "plain (no LoRA ever)",
    "naive": "naive: load from disk + unload",
    "fastgen": "fastgen, one slot per LoRA (resident)",
    "fastgen-swap": "fastgen, fewer slots (every LoRA request swaps)",
}


def requests_table(summary: dict[str, Any]) -> str:
    rows = []
    for name, r in summary.items():
        switch = f"{_s(r['switch_s'])} ({_s(r['switch_in_s'])} + {_s(r['switch_out_s'])})"
        if r["switch_s"] is None:
            switch = "-"
        rows.append(
            f"| {CONFIG_LABELS[name]} | {r['lora_requests']} ({r['swapped_requests']}) | {switch} "
            f"| {_s(r['step_s_lora'])} | {_s(r['step_s_no_lora'])} | {_s(r['end_to_end_s_lora'], 2)} "
            f"| {_s(r['end_to_end_s_no_lora'], 2)} | {_pct(_minus_one(r['paired_end_to_end_vs_plain_lora']))} "
            f"| {_pct(_minus_one(r['paired_step_vs_plain_lora']))} |\n"
        )
    return REQUESTS_HEAD + "".join(rows)


def _minus_one(value: float | None) -> float | None:
    return None if value is None else value - 1


SPEED_GOALS = (  # (row, key in goals): switching at least GOAL_SWITCH_SPEEDUP times faster than naive
    ("switching >= 10x faster than naive, steady state (in requests)", "switch_speedup_steady"),
    ("same, switching only (more samples)", "switch_speedup_steady_switching_only"),
    ("switching >= 10x faster than naive, every request swapping (in requests)", "switch_speedup_swapping"),
    ("same, switching only (more samples)", "switch_speedup_swapping_switching_only"),
)
OVERHEAD_GOALS = (  # (row, key in goals): a LoRA request at most GOAL_LORA_OVERHEAD slower than without
    ("fastgen LoRA request within 5% of the same request without LoRA (paired)", "fastgen_lora_vs_no_lora_paired"),
    ("same, median LoRA request vs median plain request", "fastgen_lora_vs_no_lora_medians"),
    ("same, fewer slots (paired)", "fastgen_swap_lora_vs_no_lora_paired"),
)


def goals_table(g: dict[str, Any]) -> str:
    rows = [(label, _x(g[key]), (g[key] or 0) >= GOAL_SWITCH_SPEEDUP) for label, key in SPEED_GOALS]
    rows += [(label, _pct(g[key]), g[key] <= GOAL_LORA_OVERHEAD) for label, key in OVERHEAD_GOALS]
    body = "".join(f"| {goal} | {value} | {_met(ok)} |\n" for goal, value, ok in rows)
    info = (
        f"| (no goal) naive / fastgen end to end, LoRA requests | {g['naive_vs_fastgen_end_to_end']:.3f}x "
        f"(fewer slots: {g['naive_vs_fastgen_swap_end_to_end']:.3f}x) | |\n"
        f"| (no goal) fastgen LoRA request: switching's share of end to end / denoiser step vs plain (paired) "
        f"| {g['fastgen_switch_share_of_end_to_end']:.1%} / {g['fastgen_step_vs_plain_paired']:+.1%} | |\n"
    )
    return "| goal | measured | met |\n|---|---|---|\n" + body + info


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


def overhead_table(overhead: dict[str, Any]) -> str:
    head = "| denoiser call (one guided step) | median s | vs plain | FLOPs vs plain |\n|---|---|---|---|\n"
    rows = "".join(
        f"| {name} | {r['median_s']:.3f} | {r['vs_plain']:+.1%} | {r['flops_vs_plain']:+.2%} |\n"
        for name, r in overhead.items()
    )
    return head + rows


SWITCH_PARTS = (
    ("file_read", "naive: file read (safetensors)"),
    ("naive in", "naive: load_lora_weights"),
    ("naive out", "naive: unload_lora_weights"),
    ("fastgen in", "fastgen resident: activate"),
    ("fastgen out", "fastgen resident: remove"),
    ("fastgen-swap in", "fastgen swapping: activate"),
    ("fastgen-swap swap", "... of which the swap (a copy from host memory after an adapter's first)"),
    ("fastgen-swap out", "fastgen swapping: remove"),
    ("naive total", "naive: switch (load + unload)"),
    ("fastgen total", "fastgen resident: switch"),
    ("fastgen-swap total", "fastgen swapping: switch"),
)


def switching_table(switching: dict[str, Any]) -> str:
    threads = list(switching)
    head = "| switching only, median s | " + " | ".join(f"{t} thread(s)" for t in threads) + " |\n"
    head += "|---|" + "---|" * len(threads) + "\n"
    rows = "".join(
        f"| {label} | " + " | ".join(_s(switching[t].get(key, {}).get("median_s"), 4) for t in threads) + " |\n"
        for key, label in SWITCH_PARTS
    )
    return head + rows


def fidelity_table(f: dict[str, Any]) -> str:
    head = (
        "| LoRA | kind | alpha | requests | max abs diff naive vs plain (LoRA effect) | fastgen vs naive "
        "| fastgen fewer slots vs naive |\n|---|---|---|---|---|---|---|\n"
    )
    rows = "".join(
        f"| {r['name']} | {r['kind']} | {r['alpha']:g} | {r['requests']} | {_s(r.get('naive_vs_plain_max_abs_diff'))} "
        f"| {_fidelity(r, 'fastgen')} | {_fidelity(r, 'fastgen-swap')} |\n"
        for r in f["loras"]
        if r["requests"]
    )
    no_lora = "; ".join(
        f"{name} {r['bit_identical']}/{r['requests']} bit-identical (max abs diff {r['max_abs_diff']:.3g})"
        for name, r in f["no_lora_vs_plain"].items()
    )
    return head + rows + f"\nNo-LoRA requests (each after LoRA requests) against the plain pipeline: {no_lora}.\n"


def _fidelity(row: dict[str, Any], name: str) -> str:
    identical, diff = row[f"{name}_vs_naive_bit_identical"], row[f"{name}_vs_naive_max_abs_diff"]
    return f"{identical}/{row['requests']} bit-identical" + ("" if diff == 0 else f", max abs diff **{diff:.3g}**")


def markdown(results: dict[str, Any]) -> str:
    s, m = results["settings"], results["machine"]
    note = (
        f"SD-1.5 UNet config at width {s['width']} ({s['unet_parameters'] / 1e6:.0f}M parameters, random weights), "
        f"{s['size']}x{s['size']}, {s['steps']} steps, CFG {GUIDANCE}; {s['loras']} rank-{s['rank']} LoRAs "
        f"({s['library_mb']:.0f} MB on disk, page-cached: written just before), {s['requests']} requests per "
        f"configuration ({s['lora_requests']} with a LoRA), interleaved; fewer slots: {s['slots']}. "
        f"{m['device']} ({m['device_name']}, {m['cpu_count']} CPUs shared with other work), {m['torch_threads']} "
        f"thread(s), {m['dtype']}, torch {m['torch']}, diffusers {m['diffusers']}. Medians; wall {s['wall_s']:.0f} s. "
        "Switch = activate + remove (fastgen) or load + unload (naive); end to end = switch + pipeline call "
        "(text encoder, denoising, VAE decode). Paired = against the plain run of the same request (same prompt "
        "and seed, served back to back).\n"
    )
    if m["device"] == "cpu":
        note += f"\n{CPU_DEFAULTS}\n"
    return (
        f"{requests_table(results['requests'])}\n{goals_table(results['goals'])}\n"
        f"{overhead_table(results['step_overhead'])}\n{switching_table(results['switching_only'])}\n"
        f"{fidelity_table(results['fidelity'])}\n{first_cycle_line(results['first_cycle'])}\n{note}"
    )


CPU_DEFAULTS = (
    "Why these settings on CPU: full width so that adapters have their real size and layer count (what switching "
    "costs depend on); 128 px and 4 steps so that 64 full-width images fit in about 13 minutes on 2 cores shared "
    "with other work; 1 thread because, in a check while this benchmark was written, one step ran 2.5-3.5x "
    "slower with 2 threads on cores another job kept busy (every parallel op waits for the held core), as the "
    "hot-swap's many small copies do in the 2-thread column above. Ratios come from interleaved runs; absolute "
    "seconds are this machine's."
)


def first_cycle_line(cold: dict[str, Any]) -> str:
    """The warm-up's switches: the very first one (fastgen builds its slots there) and the first cycle's median."""
    parts = "; ".join(
        f"{CONFIG_LABELS[name]}: first switch-in {r['first_switch_in_s']:.2f} s, first cycle median switch "
        f"{r['first_cycle_median_s']:.3f} s"
        for name, r in cold.items()
    )
    return f"Warm-up (not in the tables above): {parts}.\n"


def write_results(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "lora_hotswap.json", out / "lora_hotswap.md"
    json_path.write_text(json.dumps(_json_safe(results), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown(results), encoding="utf-8")
    return json_path, md_path


# --- main ----------------------------------------------------------------------------------------------------


def code_version() -> dict[str, Any]:
    """The commit measured, and the files of fastgen/lora that differed from it (others edit them meanwhile)."""

    def git(*command: str) -> str:
        result = subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True, check=False)
        return result.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_lora_files": git("diff", "--name-only", "HEAD", "--", "fastgen/lora").split(),
    }


def build_pipe(args, device, dtype):
    pipe = build_sd15(args.seed, args.width).to(device)
    if dtype != torch.float32:  # built in float32; casting to the same dtype only makes diffusers warn
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(args, directory: Path) -> dict[str, Any]:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    started = time.perf_counter()
    pipe = build_pipe(args, device, dtype)
    logger.info("writing %d rank-%d LoRAs to %s", args.loras, args.rank, directory)
    made = write_library(pipe.unet, directory, args.loras, args.rank, args.seed + 100)
    library = LoraLibrary(directory, shipped=None)  # the shipped adapters are for fastgen-shapes, not this model
    configs = build_configs(pipe, directory, library, args)
    names = [item["name"] for item in made]
    prompts = [prompt for _, prompt in load_prompts(prompt_file(args.prompts), args.requests)]
    requests = workload(prompts, names, args.seed)
    logger.info("warm-up, and a first cycle through the LoRAs")
    cold = warm_up(configs, requests, names, args, device)
    records = run_workload(configs, requests, args, device)
    logger.info("per-step cost of an active adapter")
    overhead = step_overhead(configs, made, args, device, dtype)
    logger.info("switching only, threads %s", args.switch_threads)
    switching = switching_only(configs, directory, names, args)
    plain = {r.index: r for r in records if r.config == "plain"}
    summary = {name: config_summary([r for r in records if r.config == name], plain) for name in CONFIGS}
    settings = {
        **{key: getattr(args, key) for key in ("size", "steps", "width", "loras", "rank", "requests", "slots")},
        **{key: getattr(args, key) for key in ("seed", "overhead_rounds", "switch_cycles", "switch_threads")},
        "lora_requests": sum(r.lora is not None for r in requests),
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "library_mb": sum(item["size_bytes"] for item in made) / 1e6,
        "prompts_file": str(prompt_file(args.prompts)),
        "code": code_version(),
        "wall_s": time.perf_counter() - started,
    }
    return {
        "machine": machine_info(device, dtype),
        "settings": settings,
        "library": made,
        "requests": summary,
        "goals": goals(summary, switching, args.threads),
        "step_overhead": overhead,
        "switching_only": switching,
        "first_cycle": cold,
        "fidelity": fidelity(records, requests, made),
        "records": [r.public() for r in records],
    }


# --- the shipped adapters on fastgen-shapes: what they draw, fresh and hot-swapped ------------------------------


def shapes_pipe():
    pipe = DiffusionPipeline.from_pretrained(SHAPES_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shapes_images(pipe, captions: list[str]) -> list[np.ndarray]:
    """evaluate.py's images: one per caption, image i seeded with i, 25 DDIM steps, guidance 2.5."""
    return [np.asarray(image) for image in generate(pipe, captions, SHAPES_GUIDANCE)]


def fresh_images(pipe, info, captions: list[str]) -> list[np.ndarray]:
    """The adapter loaded by diffusers on its own pipeline (scale 1), then unloaded."""
    pipe.load_lora_weights(str(info.path), adapter_name=info.name)
    try:
        return shapes_images(pipe, captions)
    finally:
        pipe.unload_lora_weights()


def swapped_images(slots: AdapterSlots, info, captions: list[str]) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The adapter switched on through fastgen's slots as the engine does (activate, the call, remove)."""
    active = slots.activate([(info, 1.0)])
    (report,) = active.report()["adapters"]
    try:
        return shapes_images(slots.pipe, captions), report
    finally:
        active.remove()


def identical(images: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, Any]:
    diffs = [float(np.abs(a.astype(np.int16) - b).max()) for a, b in zip(images, reference, strict=True)]
    return {"bit_identical": sum(d == 0 for d in diffs), "of": len(diffs), "max_abs_diff": max(diffs)}


def shapes_run(args) -> dict[str, Any]:
    started = time.perf_counter()
    library = LoraLibrary(None)  # no directory: the shipped adapters only
    names = [name for name in library.names() if name in sc.STYLES]
    captions = [sc.caption(scene) for scene in sc.heldout_scenes()] * args.shapes_per_caption
    plain_pipe, fresh_pipe = shapes_pipe(), shapes_pipe()
    slots = AdapterSlots(shapes_pipe(), library, SHAPES_SLOTS)
    plain = shapes_images(plain_pipe, captions)
    rows, fresh = {}, {}
    for name in names:
        logger.info("shapes: %s loaded fresh", name)
        info = library.get(name)
        fresh[name] = fresh_images(fresh_pipe, info, captions)
        rows[name] = {
            "rank": info.rank,
            "targets": list(info.targets),
            "without": style_results(plain, captions, name),
            "fresh": style_results(fresh[name], captions, name),
        }
    for cycle in (1, 2):
        for name in names:
            logger.info("shapes: %s through the slots, cycle %d", name, cycle)
            images, report = swapped_images(slots, library.get(name), captions)
            row = {**style_results(images, captions, name), "swap": report.get("swap"), "resident": report["resident"]}
            rows[name][f"swapped_{cycle}"] = row | {"vs_fresh": identical(images, fresh[name])}
    after = identical(shapes_images(slots.pipe, captions), plain)
    return {
        "machine": machine_info(torch.device("cpu"), torch.float32),
        "settings": {
            "model": "fastgen-shapes",
            "captions": len(sc.heldout_scenes()),
            "per_caption": args.shapes_per_caption,
            "steps": SHAPES_STEPS,
            "guidance": SHAPES_GUIDANCE,
            "slots": SHAPES_SLOTS,
            "code": code_version(),
            "wall_s": time.perf_counter() - started,
        },
        "adapters": rows,
        "no_lora_after_vs_plain": after,
    }


def _scores(r: dict[str, Any]) -> str:
    return f"{r['style_pass']:.1%} / {r['styled_adherence']['all']:.1%}"


def _same(r: dict[str, Any]) -> str:
    return f"{r['vs_fresh']['bit_identical']}/{r['vs_fresh']['of']}"


def shapes_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    head = (
        "| adapter (rank, layers) | without: style / plain adherence | fresh load: style / adherence "
        "| fastgen swap, 1st (diffusers): style / adherence | same images as fresh | fastgen swap, 2nd (copy) "
        "| same images as fresh |\n|---|---|---|---|---|---|---|\n"
    )
    rows = ""
    for name, r in results["adapters"].items():
        first, second = r["swapped_1"], r["swapped_2"]
        rows += (
            f"| {name} (rank {r['rank']}, {len(r['targets'])} kinds) "
            f"| {r['without']['style_pass']:.1%} / {r['without']['plain_adherence']['all']:.1%} "
            f"| {_scores(r['fresh'])} | {_scores(first)} ({first['swap']}) "
            f"| {_same(first)} | {_scores(second)} ({second['swap']}) | {_same(second)} |\n"
        )
    after = results["no_lora_after_vs_plain"]
    return (
        head
        + rows
        + f"\nNo adapter, after all of them through the slots: {after['bit_identical']}/{after['of']} images "
        f"bit-identical to the plain pipeline's.\n\nfastgen-shapes, {s['captions']} held-out captions x "
        f"{s['per_caption']} seeded images, {s['steps']} DDIM steps, guidance {s['guidance']}, 32x32; adapters at "
        f"scale 1; {s['slots']} slots. Style: `fastgen.shapes.score.style_check`; adherence: all four attributes "
        "right as the style draws the caption (without an adapter: the plain caption). "
        f"{results['machine']['torch_threads']} thread(s); wall {s['wall_s']:.0f} s.\n"
    )


def write_shapes(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "lora_hotswap_shapes.json", out / "lora_hotswap_shapes.md"
    json_path.write_text(json.dumps(_json_safe(results), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(shapes_markdown(results), encoding="utf-8")
    return json_path, md_path


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    diffusers_logging.set_verbosity_error()  # one "no text-encoder LoRA keys" warning per naive load otherwise
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part in ("all", "speed"):
        with tempfile.TemporaryDirectory(prefix="fastgen-loras-") as directory:
            results = run(args, Path(directory))
        paths = write_results(results, args.out)
        print(markdown(results))
        print(f"wrote {paths[0]} and {paths[1]} in {results['settings']['wall_s']:.0f}s")
    if args.part in ("all", "shapes"):
        shapes = shapes_run(args)
        paths = write_shapes(shapes, args.out)
        print(shapes_markdown(shapes))
        print(f"wrote {paths[0]} and {paths[1]} in {shapes['settings']['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
