"""Benchmark of the approximate noise-state cache: steps saved, speed and fidelity against no cache, in one run.

The technique is Nirvana's (Agarwal et al., "Approximate Caching for Efficiently Serving Text-to-Image Diffusion
Models", NSDI 2024); fastgen implements it in ``fastgen.cache``.

Each trace is replayed through the engine in its order. Every request runs with no cache and then, per embedder
(``--embedder``, repeatable; by default MiniLM and the model's own text encoder, the service's default), under three
policies, interleaved so a slow spell of the machine hits all alike: the paper's as published (``nirvana``: its
similarity thresholds and K table, the nearest entry only, states stored on misses only); fastgen's (``fastgen``: the
same table, the best of the 8 nearest entries, states stored on hits too but serving only repeats of their prompt,
hits reseeded with the request's own starting noise); and the quality-aware one (``quality``: fastgen's with the
model's calibrated table for that embedder, ``fastgen.cache.check``, and the check at resume time, whose probe counts
in the lookup's and the request's time). ``--thresholds`` and ``--every-hit`` add variants of fastgen's. Each
configuration has its own empty cache at the start of a trace. Seeds are the trace's own where it has them (krea),
else the row number, so repeats of a prompt ask for different images, as they do in real use.

Reported per trace and configuration: share of denoising steps saved, hit rate, end-to-end time ratio (cached /
plain, summed over the trace; also counting the door's embedding), the worker's lookup + state load time per request
(the check's probe included) and, apart, the check's own cost, the door's prompt embedding per request (each
absolute and as a share of a miss), and fidelity of hits against the exact generation of the same prompt and seed
(PSNR, SSIM). As in the service, a prompt is embedded once where its job is submitted (``DoorEmbedder``) and every
configuration with that embedder gets that vector (the pipeline embedder is the workers'); ``--no-door`` makes the
workers embed. The built-in ``shapes`` trace (all 450 fastgen-shapes captions in seeded order, each twice with
different seeds) adds prompt adherence: how often the cached image still shows what its caption asks for, against
the exact images, over every caption and over those outside the calibration half (``held out``). The ``words``
section pairs captions outside the calibration half with a later prompt one change away (a repeat, a rewording "at
the" / "in the", another colour, shape, position or background), each pair in a cache of its own (a tenant), and
reports per kind of change the hit rate, the skip and the later image's adherence against its exact one. The goals
of issue 21 are evaluated per embedder at the end.

The model is ``fastgen-shapes`` (32x32, 25 DDIM steps), the one model here that draws what it is asked, with the
offline all-MiniLM-L6-v2 embedder. Real-trace prompts are far outside what it knows, so for them fidelity is
pixel fidelity only. The calibration tables were made from other rows of the traces (past the first 400) and other
captions, never the ones replayed here. Traces are read at run time (``--trace``, repeatable; by default every
``*.jsonl`` in ``../shared/data/prompts``), never copied into the project.

    HF_HUB_OFFLINE=1 python benchmarks/approximate_cache.py [--trace FILE ...] [--limit 400] [--limit-of TRACE=N]

Writes ``<name>.json`` and ``<name>.md`` to ``--out`` (defaults ``approximate_cache``, ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import collections
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
from fastgen.cache.calibrate import KINDS, calibration_scenes, variant
from fastgen.cache.check import BUILT_IN, load_calibrations
from fastgen.cache.embedder import DoorEmbedder
from fastgen.cache.policy import FASTGEN, NIRVANA, QUALITY, CachePolicy
from fastgen.cache.states import StateFiles
from fastgen.cache.store import SqliteCacheStore
from fastgen.engine import Engine
from fastgen.jobs import DEFAULT_TENANT
from fastgen.quality import psnr, ssim
from fastgen.settings import Settings
from fastgen.shapes import scenes
from fastgen.shapes.score import score

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TRACES = ROOT.parent / "shared" / "data" / "prompts"
DEFAULT_OUT = ROOT / "benchmarks" / "results"
MODEL = "fastgen-shapes"
EMBEDDERS = ("minilm", "pipeline")
MEASURED = ("passed", "lowered", "refused", "unavailable")  # verdicts of a check that ran (or tried to)


@dataclasses.dataclass(frozen=True)
class Configuration:
    """One cached way to serve: a policy with an embedder (and, for ``quality``, the model's table for it)."""

    policy: CachePolicy
    embedder: str

    @property
    def name(self) -> str:
        return f"{self.policy.name} · {self.embedder}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, action="append", help="a .jsonl trace with a 'prompt' field per line")
    parser.add_argument("--limit", type=int, default=400, help="requests replayed per real trace (from its start)")
    parser.add_argument("--limit-of", action="append", default=[], help="TRACE=N: another limit for one trace")
    parser.add_argument("--no-shapes", action="store_true", help="skip the built-in shapes-caption trace")
    parser.add_argument("--only-shapes", action="store_true", help="replay the shapes-caption trace only")
    parser.add_argument("--name", default="approximate_cache", help="results file name (without extension)")
    parser.add_argument("--shapes-limit", type=int, default=900, help="requests replayed of the shapes trace")
    parser.add_argument("--embedder", action="append", help="minilm, pipeline, ... (repeatable; default both)")
    parser.add_argument(
        "--word-bases", type=int, default=10, help="held-out captions of the words section (6 pairs each)"
    )
    parser.add_argument("--thresholds", default="", help="also run fastgen's policy with this table (0.99:0.5,...)")
    parser.add_argument(
        "--every-hit", action="store_true", help="also run fastgen's policy with hit-stored entries serving any prompt"
    )
    parser.add_argument("--budget-mb", type=float, default=1024.0, help="cache byte budget (LCBFU evicts beyond)")
    parser.add_argument(
        "--no-door", action="store_true", help="workers embed prompts (default: embedded where jobs are submitted)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--keep",
        type=Path,
        help="an earlier run's results: its traces not replayed now are kept (each is self-contained)",
    )
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


def make_cache(config: Configuration, budget_bytes: int, folder: Path) -> ApproximateCache:
    tables = load_calibrations([BUILT_IN]) if config.policy.name == QUALITY else {}
    policy = FASTGEN if config.policy.name == QUALITY else config.policy
    settings = CacheConfig(budget_bytes, policy, embedder=config.embedder, default_on=True, calibrations=tables)
    return ApproximateCache(settings, SqliteCacheStore(folder / "cache.sqlite3"), StateFiles(str(folder / "states")))


def configurations(args) -> list[Configuration]:
    """Per embedder: the paper's policy, fastgen's, the quality-aware one, and the variants asked for."""
    variants = []
    if args.every_hit:
        variants.append(dataclasses.replace(FASTGEN, name="fastgen-every-hit", repeats_only=False))
    if args.thresholds:
        table = Settings(cache_thresholds=args.thresholds).cache_threshold_table
        variants.append(dataclasses.replace(FASTGEN, name="fastgen-custom", thresholds=table))
    quality = dataclasses.replace(FASTGEN, name=QUALITY)  # a name only: make_cache gives it the model's table
    return [Configuration(p, e) for e in args.embedder or EMBEDDERS for p in (NIRVANA, FASTGEN, quality, *variants)]


class Replay:
    """The plain engine and one cached engine per configuration over the same warm pipelines."""

    def __init__(self, base: Engine, args, folder: Path):
        self.base, self.configs = base, configurations(args)
        pipe = base.pool.get(base.registry.resolve(MODEL))[0].pipe
        self.engines: dict[str, Engine] = {"plain": base}
        for config in self.configs:
            cache = make_cache(config, int(args.budget_mb * 2**20), folder / config.name.replace(" · ", "-"))
            self.engines[config.name] = Engine(base.settings, registry=base.registry, cache=cache)
            self.engines[config.name].pool = base.pool
            cache.embedder(pipe, MODEL)  # load the embedder before timing
        # The service embeds a cached request's prompt once, where it is submitted; each configuration with that
        # embedder gets that vector. The pipeline embedder is the workers' (it needs the model).
        names = {c.embedder for c in self.configs if c.embedder != "pipeline"}
        self.doors = {} if args.no_door else {name: DoorEmbedder(name, default_on=True) for name in names}

    def request(self, request: dict[str, Any], tenant: str = DEFAULT_TENANT) -> dict[str, dict[str, Any]]:
        """``request`` plain and under every configuration: a record of each."""
        embedded, door_s = {}, {}
        for name, door in self.doors.items():
            start = time.perf_counter()
            embedded[name] = door.embed(request["prompt"], cache_wanted=True)
            door_s[name] = time.perf_counter() - start
        records = {"plain": self._run(self.base, request, tenant, None, 0.0)}
        for config in self.configs:
            engine, e = self.engines[config.name], config.embedder
            records[config.name] = self._run(engine, request, tenant, embedded.get(e), door_s.get(e, 0.0))
        return records

    @staticmethod
    def _run(engine: Engine, request, tenant: str, embedded, door_s: float) -> dict[str, Any]:
        start = time.perf_counter()
        generation = engine.run({**request, "model": MODEL}, tenant=tenant, embedded=embedded)
        seconds = time.perf_counter() - start
        cache = next((a.details for a in generation.result.accelerations if a.name == "cache"), {})
        image = np.asarray(generation.images[0])
        return {"seconds": seconds, "door_s": door_s, "cache": cache, "image": image, "prompt": request["prompt"]}


def replay(replayer: Replay, requests: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every request plain and under each configuration, in trace order; per-request records per configuration."""
    records: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for request in requests:
        for name, record in replayer.request(request).items():
            records[name].append(record)
    return dict(records)


def held_out_scenes() -> list[scenes.Scene]:
    """The scenes outside the calibration half the built-in tables were fitted on."""
    calibrated = set(calibration_scenes())
    return sorted(scene for scene in scenes.all_scenes() if scene not in calibrated)


def held_out_captions() -> set[str]:
    return {scenes.caption(scene) for scene in held_out_scenes()}


def word_pairs(bases: int, seed: int = 21) -> list[dict[str, Any]]:
    """``bases`` captions outside the calibration half, each with a later prompt of every kind of change."""
    rng = random.Random(seed)
    chosen = rng.sample(held_out_scenes(), bases)
    pairs = []
    for scene in chosen:
        for kind in KINDS:
            later, canonical = variant(scene, kind, rng)
            n = len(pairs)
            earlier = {"prompt": scenes.caption(scene), "seed": 5000 + 2 * n}
            pairs.append(
                {
                    "kind": kind,
                    "earlier": earlier,
                    "later": {"prompt": later, "seed": 5001 + 2 * n},
                    "canonical": canonical,
                }
            )
    return pairs


def words(replayer: Replay, pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per configuration and kind of change: the later prompt's hit rate, skip, check verdicts and adherence (its
    image scored against the caption it asks for) beside the exact image's. Each pair is a tenant of its own."""
    laters: dict[str, list[tuple[str, dict[str, Any], str]]] = collections.defaultdict(list)
    for i, pair in enumerate(pairs):
        replayer.request(pair["earlier"], tenant=f"pair-{i}")
        for name, record in replayer.request(pair["later"], tenant=f"pair-{i}").items():
            laters[name].append((pair["kind"], record, pair["canonical"]))
    plain = {kind: [score(r["image"], c).all for k, r, c in laters["plain"] if k == kind] for kind in KINDS}
    summary: dict[str, Any] = {
        "pairs": len(pairs),
        "adherence_plain": {k: statistics.fmean(v) for k, v in plain.items()},
    }
    for name in (n for n in laters if n != "plain"):
        per_kind = {}
        for kind in KINDS:
            runs = [(r, c) for k, r, c in laters[name] if k == kind]
            hits = [r for r, _ in runs if r["cache"].get("hit")]
            adherence = statistics.fmean(score(r["image"], c).all for r, c in runs)
            per_kind[kind] = {
                "hit_rate": len(hits) / len(runs),
                "mean_k": statistics.fmean(r["cache"]["k"] for r in hits) if hits else 0.0,
                "adherence": adherence,
                "adherence_change": adherence - summary["adherence_plain"][kind],
                "verdicts": dict(
                    collections.Counter(r["cache"].get("check", {}).get("verdict", "-") for r, _ in runs)
                ),
            }
        summary[name] = per_kind
    return summary


def summarise(records: dict[str, list[dict[str, Any]]], steps: int, adherence: bool) -> dict[str, Any]:
    """Per configuration (all but plain): steps saved, hit rate, time ratio, overhead, the check, hit fidelity."""
    plain = records["plain"]
    plain_s = sum(r["seconds"] for r in plain)
    summary: dict[str, Any] = {"requests": len(plain), "plain_s_per_request": plain_s / len(plain)}
    held_out = held_out_captions()
    if adherence:
        summary["adherence_plain"] = _adherence(plain)
        summary["adherence_plain_held_out"] = _adherence([r for r in plain if r["prompt"] in held_out])
    for name in (name for name in records if name != "plain"):
        runs = records[name]
        hits = [(r, p) for r, p in zip(runs, plain, strict=True) if r["cache"].get("hit")]
        misses = [r["seconds"] for r in runs if not r["cache"].get("hit")]
        lookups = [r["cache"]["lookup_s"] for r in runs]
        doors = [r["door_s"] for r in runs]
        psnrs = [psnr(p["image"], r["image"]) for r, p in hits]
        checks = [r["cache"]["check"] for r in runs if r["cache"].get("check", {}).get("verdict") in MEASURED]
        check_s = statistics.fmean(c["seconds"] for c in checks) if checks else None
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
            "checks_run": len(checks),
            "check_verdicts": dict(
                collections.Counter(r["cache"]["check"]["verdict"] for r in runs if "check" in r["cache"])
            ),
            "check_ms_mean": None if check_s is None else 1000 * check_s,
            "check_share_of_miss": check_s / statistics.median(misses) if checks and misses else None,
        }
        if adherence:
            result["adherence"] = _adherence(runs)
            result["adherence_change"] = result["adherence"] - summary["adherence_plain"]
            kept = [r for r in runs if r["prompt"] in held_out]
            result["adherence_change_held_out"] = _adherence(kept) - summary["adherence_plain_held_out"]
        summary[name] = result
    return summary


def _adherence(runs: list[dict[str, Any]]) -> float:
    return statistics.fmean(score(r["image"], r["prompt"]).all for r in runs)


def _finite(value: float) -> float | str:
    return "inf" if np.isinf(value) else float(value)


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """Issue 21's goals for the quality-aware policy, per embedder: the numbers measured and whether each is met."""
    traces, met = results["traces"], {}
    for embedder in results["embedders"]:
        quality, nirvana = f"{QUALITY} · {embedder}", f"nirvana · {embedder}"
        goal: dict[str, Any] = {}
        if quality in traces.get("shapes-captions", {}):
            r = traces["shapes-captions"][quality]
            goal["shapes: adherence loss <= 3 pts with >= 20% of steps saved"] = {
                "adherence_change": r["adherence_change"],
                "adherence_change_held_out": r["adherence_change_held_out"],
                "steps_saved": r["steps_saved_share"],
                "met": r["adherence_change"] >= -0.03 and r["steps_saved_share"] >= 0.20,
            }
        if quality in traces.get("civitai_popular", {}):
            q, n = traces["civitai_popular"][quality], traces["civitai_popular"][nirvana]
            higher = isinstance(q["hit_psnr_db_median"], float) and q["hit_psnr_db_median"] > n["hit_psnr_db_median"]
            goal["civitai: >= the paper's steps saved at higher hit PSNR"] = {
                "steps_saved": q["steps_saved_share"],
                "paper_steps_saved": n["steps_saved_share"],
                "hit_psnr_db": q["hit_psnr_db_median"],
                "paper_hit_psnr_db": n["hit_psnr_db_median"],
                "met": q["steps_saved_share"] >= n["steps_saved_share"] and higher,
            }
        shares = [t[quality]["check_share_of_miss"] for t in traces.values() if quality in t]
        shares = [share for share in shares if share is not None]
        if shares:
            goal["the check's cost < 2% of a miss"] = {"worst_trace_share": max(shares), "met": max(shares) < 0.02}
        met[embedder] = goal
    return met


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| trace | requests | policy · embedder | steps saved | hit rate "
        "| time (cached/plain; with the door's embedding) | worker lookup+load per request "
        "| the check (runs; per check) | door embedding per request "
        "| hit PSNR (median) | hit SSIM (mean) | adherence change (all; held out) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for trace, summary in results["traces"].items():
        for name in results["configurations"]:
            r = summary[name]
            lines.append(
                f"| {trace} | {summary['requests']} | {name} | {r['steps_saved_share']:.1%}"
                f" | {r['hit_rate']:.1%} | {r['time_ratio']:.3f}; {r['time_ratio_with_door']:.3f}"
                f" | {r['lookup_ms_mean']:.1f} ms ({_share(r['lookup_share_of_miss'])} of a miss)"
                f" | {_check(r)} | {r['door_ms_mean']:.1f} ms ({_share(r['door_share_of_miss'])})"
                f" | {_num(r['hit_psnr_db_median'])} dB | {_num(r['hit_ssim_mean'], 3)}"
                f" | {_change(r.get('adherence_change'))}; {_change(r.get('adherence_change_held_out'))} |"
            )
    if "words" in results:
        lines += ["", _words_table(results["words"], results["configurations"])]
    if "goals" in results:
        lines += ["", "| embedder | goal | measured | met |", "|---|---|---|---|"]
        for embedder, goal in results["goals"].items():
            for text, numbers in goal.items():
                shown = ", ".join(f"{k} {_any(v)}" for k, v in numbers.items() if k != "met")
                lines.append(f"| {embedder} | {text} | {shown} | {'yes' if numbers['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def _words_table(words: dict[str, Any], names: list[str]) -> str:
    plain = words["adherence_plain"]
    header = " | ".join(f"{kind} (exact {plain[kind]:.0%})" for kind in KINDS)
    lines = [
        f"Word-level changes ({words['pairs']} pairs; hit rate, mean K on hits / 25, adherence change):",
        "",
        f"| policy · embedder | {header} |",
        "|---|" + "---|" * len(KINDS),
    ]
    for name in names:
        cells = [
            f"{r['hit_rate']:.0%}, K {r['mean_k']:.1f}, {_change(r['adherence_change'])}"
            for r in (words[name][kind] for kind in KINDS)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _check(r: dict[str, Any]) -> str:
    if not r["checks_run"]:
        return "-"
    return f"{r['checks_run']}; {r['check_ms_mean']:.1f} ms ({_share(r['check_share_of_miss'])} of a miss)"


def _share(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def _any(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else value if isinstance(value, str) else f"{value:.{digits}f}"


def _change(value) -> str:
    return "-" if value is None else f"{value * 100:+.1f} pts"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    traces = [] if args.only_shapes else args.trace or sorted(DEFAULT_TRACES.glob("*.jsonl"))
    limits = {name: int(n) for name, n in (item.split("=", 1) for item in args.limit_of)}
    workloads = {path.stem: read_trace(path, limits.get(path.stem, args.limit)) for path in traces}
    if not args.no_shapes and args.shapes_limit:  # --shapes-limit 0: the word-level section alone
        workloads["shapes-captions"] = shapes_trace()[: args.shapes_limit]
    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="fastgen-bench-")), device="cpu")
    base = Engine(settings)
    base.run({"prompt": "warm-up", "model": MODEL, "seed": 0})
    steps = base.registry.resolve(MODEL).steps
    configs = configurations(args)
    results: dict[str, Any] = {
        "model": MODEL,
        "steps": steps,
        "embedders": list(args.embedder or EMBEDDERS),
        "embedded_at": "worker" if args.no_door else "door (pipeline: worker)",
        "budget_mb": args.budget_mb,
        "configurations": [c.name for c in configs],
        "policies": {c.policy.name: dataclasses.asdict(c.policy) for c in configs},
        "calibrations": {f"{m} · {e}": dataclasses.asdict(c) for (m, e), c in load_calibrations([BUILT_IN]).items()},
        "machine": {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads},
        "traces": {},
    }
    if args.keep is not None:  # every trace's configurations run interleaved, so a trace's rows stand on their own
        earlier = json.loads(args.keep.read_text())
        results["traces"] = {name: t for name, t in earlier["traces"].items() if name not in workloads}
        results["kept_from_earlier_run"] = sorted(results["traces"])
        if "words" in earlier and (args.no_shapes or not args.word_bases):  # not made again in this run
            results["words"] = earlier["words"]
            results["kept_from_earlier_run"].append("words")
    for name, requests in workloads.items():
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"cache-{name}-") as folder:
            records = replay(Replay(base, args, Path(folder)), requests)
        results["traces"][name] = summarise(records, steps, adherence=name == "shapes-captions")
        print(f"{name}: {time.perf_counter() - started:.0f}s", json.dumps(results["traces"][name], default=str))
        write(results, args.out, args.name)  # after every trace: a long run that stops keeps what it measured
    if args.word_bases and not args.no_shapes:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="cache-words-") as folder:
            results["words"] = words(Replay(base, args, Path(folder)), word_pairs(args.word_bases))
        print(f"words: {time.perf_counter() - started:.0f}s", json.dumps(results["words"], default=str))
    results["goals"] = goals(results)
    write(results, args.out, args.name)
    print(markdown(results))


def write(results: dict[str, Any], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
