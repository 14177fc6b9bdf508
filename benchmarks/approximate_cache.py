"""Benchmark of the approximate noise-state cache: steps saved, speed and fidelity against no cache, in one run.

The technique is Nirvana's (Agarwal et al., "Approximate Caching for Efficiently Serving Text-to-Image Diffusion
Models", NSDI 2024); fastgen implements it in ``fastgen.cache``.

Each trace is replayed through the engine in its order. Every request runs three ways, interleaved so a slow spell
of the machine hits all alike: with no cache; with the paper's policy as published (``nirvana``: its similarity
thresholds and K table, the nearest entry only, states stored on misses only); and with fastgen's policy
(``fastgen``: the same table, the best of the 8 nearest entries, states stored on hits too but serving only repeats
of their prompt, hits reseeded with the request's own starting noise); ``--thresholds`` adds fastgen's policy with
another table. Each policy has its own empty cache at the start of a trace. Seeds are the trace's own where it has
them (krea), else the row number, so repeats of a prompt ask for different images, as they do in real use.

Reported per trace and policy: share of denoising steps saved, hit rate, end-to-end time ratio (cached / plain,
summed over the trace; also counting the door's embedding), the worker's lookup + state load time per request and
the door's prompt embedding per request (absolute and as a share of a miss), and fidelity of hits against the exact
generation of the same prompt and seed (PSNR, SSIM). As in the service, a prompt is embedded once where its job is
submitted (``DoorEmbedder``) and every policy's worker gets that vector; ``--no-door`` makes the workers embed.
The built-in ``shapes`` trace (all 450 fastgen-shapes captions in seeded order, each twice with different seeds)
adds prompt adherence: how often the cached image still shows what its caption asks for, against the exact images.

The model is ``fastgen-shapes`` (32x32, 25 DDIM steps), the one model here that draws what it is asked, with the
offline all-MiniLM-L6-v2 embedder. Real-trace prompts are far outside what it knows, so for them fidelity is
pixel fidelity only. Traces are read at run time (``--trace``, repeatable; by default every ``*.jsonl`` in
``../shared/data/prompts``), never copied into the project.

    HF_HUB_OFFLINE=1 python benchmarks/approximate_cache.py [--trace FILE ...] [--limit 400]

Writes ``<name>.json`` and ``<name>.md`` to ``--out`` (defaults ``approximate_cache``, ``benchmarks/results``). The
shapes trace with the model's own text encoder as the embedder:

    HF_HUB_OFFLINE=1 python benchmarks/approximate_cache.py --only-shapes --shapes-limit 300 --embedder pipeline \
        --name approximate_cache_pipeline_embedder
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastgen.cache.approximate import ApproximateCache, CacheConfig
from fastgen.cache.embedder import DoorEmbedder
from fastgen.cache.policy import FASTGEN, NIRVANA, CachePolicy
from fastgen.cache.states import StateFiles
from fastgen.cache.store import SqliteCacheStore
from fastgen.engine import Engine
from fastgen.quality import psnr, ssim
from fastgen.settings import Settings
from fastgen.shapes import scenes
from fastgen.shapes.score import score

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TRACES = ROOT.parent / "shared" / "data" / "prompts"
DEFAULT_OUT = ROOT / "benchmarks" / "results"
MODEL = "fastgen-shapes"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, action="append", help="a .jsonl trace with a 'prompt' field per line")
    parser.add_argument("--limit", type=int, default=400, help="requests replayed per real trace (from its start)")
    parser.add_argument("--no-shapes", action="store_true", help="skip the built-in shapes-caption trace")
    parser.add_argument("--only-shapes", action="store_true", help="replay the shapes-caption trace only")
    parser.add_argument("--name", default="approximate_cache", help="results file name (without extension)")
    parser.add_argument("--shapes-limit", type=int, default=900, help="requests replayed of the shapes trace")
    parser.add_argument("--embedder", default="minilm")
    parser.add_argument("--thresholds", default="", help="also run fastgen's policy with this table (0.99:0.5,...)")
    parser.add_argument(
        "--every-hit", action="store_true", help="also run fastgen's policy with hit-stored entries serving any prompt"
    )
    parser.add_argument("--budget-mb", type=float, default=1024.0, help="cache byte budget (LCBFU evicts beyond)")
    parser.add_argument(
        "--no-door", action="store_true", help="workers embed prompts (default: embedded where jobs are submitted)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def read_trace(path: Path, limit: int) -> list[dict[str, Any]]:
    """Requests in trace order: the prompt (cut to the service's length limit), the trace's seed or the row number."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row.get("prompt", "").strip()][:limit]  # blank prompts are refused at the door
    longest = Settings().limits.max_prompt_chars
    return [
        {"prompt": row["prompt"][:longest], "seed": int(row.get("seed") or i) % 2**31} for i, row in enumerate(rows)
    ]


def shapes_trace(seed: int = 0) -> list[dict[str, Any]]:
    """Every caption twice, in seeded random order, each time with its own seed."""
    captions = [scenes.caption(scene) for scene in scenes.all_scenes()] * 2
    random.Random(seed).shuffle(captions)
    return [{"prompt": text, "seed": 1000 + i} for i, text in enumerate(captions)]


def make_cache(policy: CachePolicy, embedder: str, budget_bytes: int, folder: Path) -> ApproximateCache:
    config = CacheConfig(budget_bytes=budget_bytes, policy=policy, embedder=embedder, default_on=True)
    return ApproximateCache(config, SqliteCacheStore(folder / "cache.sqlite3"), StateFiles(str(folder / "states")))


def policies(args) -> tuple[CachePolicy, ...]:
    """The paper's, fastgen's, and the variants asked for."""
    variants = []
    if args.every_hit:
        variants.append(dataclasses.replace(FASTGEN, name="fastgen-every-hit", repeats_only=False))
    if args.thresholds:
        table = Settings(cache_thresholds=args.thresholds).cache_threshold_table
        variants.append(dataclasses.replace(FASTGEN, name="fastgen-custom", thresholds=table))
    return NIRVANA, FASTGEN, *variants


def replay(base: Engine, requests: list[dict[str, Any]], args, folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Every request plain and under each policy, interleaved; per-request records per configuration."""
    engines = {"plain": base}
    pipe = base.pool.get(base.registry.resolve(MODEL))[0].pipe
    for policy in policies(args):
        cache = make_cache(policy, args.embedder, int(args.budget_mb * 2**20), folder / policy.name)
        engines[policy.name] = Engine(base.settings, registry=base.registry, cache=cache)
        engines[policy.name].pool = base.pool
        cache.embedder(pipe, MODEL)  # load the embedder before timing
    # The service embeds a cached request's prompt once, where it is submitted; every policy gets that vector.
    door = None if args.no_door or args.embedder == "pipeline" else DoorEmbedder(args.embedder, default_on=True)
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    for request in requests:
        start = time.perf_counter()
        embedded = door.embed(request["prompt"], cache_wanted=True) if door else None
        door_s = time.perf_counter() - start if door else 0.0
        for name, engine in engines.items():
            start = time.perf_counter()
            generation = engine.run({**request, "model": MODEL}, embedded=None if name == "plain" else embedded)
            seconds = time.perf_counter() - start
            cache = next((a.details for a in generation.result.accelerations if a.name == "cache"), {})
            image = np.asarray(generation.images[0])
            record = {"seconds": seconds, "door_s": door_s, "cache": cache, "image": image}
            records[name].append(record | {"prompt": request["prompt"]})
    return records


def summarise(records: dict[str, list[dict[str, Any]]], steps: int, adherence: bool) -> dict[str, Any]:
    """Per policy (every configuration but plain): steps saved, hit rate, time ratio, overhead, hit fidelity."""
    plain = records["plain"]
    plain_s = sum(r["seconds"] for r in plain)
    summary: dict[str, Any] = {"requests": len(plain), "plain_s_per_request": plain_s / len(plain)}
    if adherence:
        summary["adherence_plain"] = _adherence(plain)
    for name in (name for name in records if name != "plain"):
        runs = records[name]
        hits = [(r, p) for r, p in zip(runs, plain, strict=True) if r["cache"].get("hit")]
        misses = [r["seconds"] for r in runs if not r["cache"].get("hit")]
        lookups = [r["cache"]["lookup_s"] for r in runs]
        doors = [r["door_s"] for r in runs]
        psnrs = [psnr(p["image"], r["image"]) for r, p in hits]
        result = {
            "hit_rate": len(hits) / len(runs),
            "steps_saved_share": sum(r["cache"]["steps_saved"] for r in runs) / (steps * len(runs)),
            "time_ratio": sum(r["seconds"] for r in runs) / plain_s,
            "time_ratio_with_door": sum(r["seconds"] + r["door_s"] for r in runs) / plain_s,
            "lookup_ms_mean": 1000 * statistics.fmean(lookups),
            "lookup_share_of_miss": statistics.fmean(lookups) / statistics.median(misses) if misses else None,
            "embedded_at_door_share": statistics.fmean(bool(r["cache"].get("embedded_at_door")) for r in runs),
            "door_ms_mean": 1000 * statistics.fmean(doors),
            "door_share_of_miss": statistics.fmean(doors) / statistics.median(misses) if misses else None,
            "hits": len(hits),
            "hit_psnr_db_median": _finite(statistics.median(psnrs)) if psnrs else None,
            "hit_psnr_db_mean": _finite(statistics.fmean(min(p, 100.0) for p in psnrs)) if psnrs else None,
            "hit_ssim_mean": statistics.fmean(ssim(p["image"], r["image"]) for r, p in hits) if hits else None,
            "mean_k_on_hits": statistics.fmean(r["cache"]["k"] for r, _ in hits) if hits else None,
        }
        if adherence:
            result["adherence"] = _adherence(runs)
            result["adherence_change"] = result["adherence"] - summary["adherence_plain"]
        summary[name] = result
    return summary


def _adherence(runs: list[dict[str, Any]]) -> float:
    return statistics.fmean(score(r["image"], r["prompt"]).all for r in runs)


def _finite(value: float) -> float | str:
    return "inf" if np.isinf(value) else float(value)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| trace | requests | policy | steps saved | hit rate | time (cached/plain; with the door's embedding) "
        "| worker lookup+load per request | door embedding per request | hit PSNR (median) | hit SSIM (mean) "
        "| adherence change |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for trace, summary in results["traces"].items():
        for name in results["policies"]:
            r = summary[name]
            lines.append(
                f"| {trace} | {summary['requests']} | {name} | {r['steps_saved_share']:.1%}"
                f" | {r['hit_rate']:.1%} | {r['time_ratio']:.3f}; {r['time_ratio_with_door']:.3f}"
                f" | {r['lookup_ms_mean']:.1f} ms ({r['lookup_share_of_miss']:.1%} of a miss)"
                f" | {r['door_ms_mean']:.1f} ms ({r['door_share_of_miss']:.1%})"
                f" | {_num(r['hit_psnr_db_median'])} dB | {_num(r['hit_ssim_mean'], 3)}"
                f" | {_change(r.get('adherence_change'))} |"
            )
    return "\n".join(lines) + "\n"


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else value if isinstance(value, str) else f"{value:.{digits}f}"


def _change(value) -> str:
    return "-" if value is None else f"{value * 100:+.1f} pts"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    traces = [] if args.only_shapes else args.trace or sorted(DEFAULT_TRACES.glob("*.jsonl"))
    workloads = {path.stem: read_trace(path, args.limit) for path in traces}
    if not args.no_shapes:
        workloads["shapes-captions"] = shapes_trace()[: args.shapes_limit]
    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="fastgen-bench-")), device="cpu")
    base = Engine(settings)
    base.run({"prompt": "warm-up", "model": MODEL, "seed": 0})
    steps = base.registry.resolve(MODEL).steps
    results: dict[str, Any] = {
        "model": MODEL,
        "steps": steps,
        "embedder": args.embedder,
        "embedded_at": "worker" if args.no_door or args.embedder == "pipeline" else "door",
        "budget_mb": args.budget_mb,
        "policies": {p.name: dataclasses.asdict(p) for p in policies(args)},
        "machine": {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads},
        "traces": {},
    }
    for name, requests in workloads.items():
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"cache-{name}-") as folder:
            records = replay(base, requests, args, Path(folder))
        results["traces"][name] = summarise(records, steps, adherence=name == "shapes-captions")
        print(f"{name}: {time.perf_counter() - started:.0f}s", json.dumps(results["traces"][name], default=str))
        write(results, args.out, args.name)  # after every trace: a long run that stops keeps what it measured
    print(markdown(results))


def write(results: dict[str, Any], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
