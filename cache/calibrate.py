"""``fastgen cache calibrate``: measure how a resumed image's error grows with similarity and K for one model, and
write the table that keeps a fidelity floor (``fastgen.cache.check``).

Each calibration pair is an earlier prompt ``a`` (its own seed) and a later prompt ``b`` (another seed, but see below).
``a`` runs through the service's own engine with a cache that stores its states at every candidate mark (and its
prediction at the check's); ``b`` runs exactly (no cache), is probed on ``a``'s earliest state (the check's distance),
and is resumed from each of ``a``'s marks the way a hit resumes it (reseeded to ``b``'s seed). A resumed image meets
the floor when it keeps the exact image's adherence (captions ``fastgen.shapes.score`` can read) and, for prompts it
cannot read, when its PSNR against the exact image is at least ``psnr_db``. Such a natural pair runs both prompts from
one seed: PSNR against another seed's image would measure the earlier run's randomness, which every hit keeps by design
(exact repeats too: reseeding only moves it nearer) and which no check of the prompts can see (measured: pairs the
model cannot tell apart, layout distance 0, fell to 6-13 dB from K=5 with two seeds); the table is the prompts' say.
Per embedder and candidate fraction, :func:`fit` picks the lowest similarity and the largest distance (or none) that
admit the most pairs while at least ``keep`` of the admitted meet the floor.

The pairs: fastgen-shapes captions of a seeded calibration half of the scenes, each with a repeat, a rewording ("at
the" / "in the") and a neighbour one content word away (colour, shape, position, background); and prompts of real
traces past the rows the benchmark evaluates, each with its nearest neighbour there. Torch: workers' side.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fastgen.cache import resume
from fastgen.cache.approximate import ApproximateCache, CacheConfig, CacheRun, Hit, Lookup
from fastgen.cache.check import Calibration, Rung, distance, file_name
from fastgen.cache.embedder import PipelineEmbedder, load_sentence_embedder
from fastgen.cache.policy import FASTGEN, CachePolicy
from fastgen.cache.states import StateFiles
from fastgen.cache.store import Entry, SqliteCacheStore
from fastgen.engine import Engine, Member, ResolvedRequest
from fastgen.engine.probe import predict
from fastgen.quality import psnr
from fastgen.settings import Settings
from fastgen.shapes import scenes
from fastgen.shapes.score import score

FRACTIONS = (0.08, 0.12, 0.2, 0.32, 0.4, 0.48)  # 2, 3, 5, 8, 10 and 12 of 25 steps
CHECK_AT = FRACTIONS[0]
KINDS = ("repeat", "wording", "color", "shape", "position", "background")
SEED_BASE = 700_000  # the benchmark's requests use seeds from 1000: calibration draws none of them


@dataclass(frozen=True)
class Pair:
    earlier: str
    later: str
    kind: str  # repeat, wording, a content word's field, or natural
    canonical: str | None  # the caption the later image is scored against (None: not scorable, PSNR floor instead)
    seeds: tuple[int, int]


@dataclass
class Measured:
    pair: Pair
    similarity: dict[str, float]  # per embedder
    distance: float
    ok: dict[int, bool]  # per mark K: the resumed image met the floor
    psnr: dict[int, float]


def calibration_scenes(seed: int = 0) -> list[scenes.Scene]:
    """A seeded half of the scenes (the benchmark reports captions outside it separately)."""
    every = scenes.all_scenes()
    return sorted(random.Random(seed).sample(every, len(every) // 2))


def shapes_pairs(bases: int, seed: int = 0) -> list[Pair]:
    """``bases`` calibration scenes, each paired with every kind of later prompt."""
    rng = random.Random(seed)
    chosen = rng.sample(calibration_scenes(seed), bases)
    pairs = []
    for i, scene in enumerate(chosen):
        for j, kind in enumerate(KINDS):
            later, canonical = variant(scene, kind, rng)
            pairs.append(Pair(scenes.caption(scene), later, kind, canonical, _seeds(len(KINDS) * i + j)))
    return pairs


def variant(scene: scenes.Scene, kind: str, rng: random.Random) -> tuple[str, str]:
    """A later prompt of ``kind`` for ``scene``'s caption, and the caption it must be scored against."""
    text = scenes.caption(scene)
    if kind == "repeat":
        return text, text
    if kind == "wording":
        return text.replace(" at the ", " in the "), text
    values = {"color": scenes.COLORS, "shape": scenes.SHAPES, "position": scenes.POSITIONS}
    values["background"] = scenes.COLORS
    while True:
        try:
            other = dataclasses.replace(scene, **{kind: rng.choice(sorted(values[kind]))})
        except ValueError:  # the shape's colour and the background's may not match
            continue
        if other != scene:
            return scenes.caption(other), scenes.caption(other)


def natural_pairs(traces: list[Path], skip: int, count: int, embedder, seed: int = 0) -> list[Pair]:
    """``count`` prompts from past the first ``skip`` rows of ``traces``, each with its nearest neighbour there."""
    prompts = []
    for path in traces:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        prompts += [row["prompt"][:500] for row in rows[skip:] if row.get("prompt", "").strip()]
    prompts = sorted(set(prompts))
    vectors = np.stack([embedder.embed(text) for text in prompts])
    chosen = random.Random(seed).sample(range(len(prompts)), min(count, len(prompts)))
    pairs = []
    for n, i in enumerate(chosen):
        alike = vectors @ vectors[i]
        alike[i] = -np.inf
        seed = _seeds(10_000 + n)[0]  # one starting noise for both: the PSNR floor then measures the prompt's change
        pairs.append(Pair(prompts[int(np.argmax(alike))], prompts[i], "natural", None, (seed, seed)))
    return pairs


def _seeds(n: int) -> tuple[int, int]:
    return SEED_BASE + 2 * n, SEED_BASE + 2 * n + 1


class Calibrator:
    """Runs the pairs on one model through an engine of its own, whose cache stores every candidate mark."""

    def __init__(self, settings: Settings, model: str, folder: Path, psnr_db: float = 20.0):
        self.policy = calibration_policy()
        config = CacheConfig(budget_bytes=2**40, policy=self.policy, embedder="minilm", default_on=True)
        self.cache = ApproximateCache(config, SqliteCacheStore(folder / "cache.sqlite3"), StateFiles(str(folder)))
        self.engine, self.model, self.psnr_db = Engine(settings, cache=self.cache), model, psnr_db
        self.spec = self.engine.registry.resolve(model)
        self.loaded, _ = self.engine.pool.get(self.spec)
        self.steps = self.spec.steps
        self.earlier: dict[tuple[str, int], tuple[Entry, dict[int, resume.State]]] = {}

    def embedders(self, names: list[str]) -> dict[str, Any]:
        pipe = self.loaded.pipe
        return {n: PipelineEmbedder(pipe, self.model) if n == "pipeline" else load_sentence_embedder(n) for n in names}

    def measure(self, pair: Pair, embedders: dict[str, Any]) -> Measured:
        entry, states = self._stored_states(pair.earlier, pair.seeds[0])
        uncached = {"enabled": False}
        later = self.engine.resolve(
            {"prompt": pair.later, "model": self.model, "seed": pair.seeds[1], "accelerate": {"cache": uncached}}
        )
        exact = self._image(Member(later))
        at = self.policy.check_step(self.steps)
        engine = self.engine
        prediction = predict(
            self.loaded, Member(later), states[at], engine.settings, engine.loras, engine.accelerators
        )
        ok, psnrs = {}, {}
        for k, state in states.items():
            image = self._image(self._resumed(later, entry, state))
            psnrs[k] = psnr(exact, image)
            ok[k] = self._meets_floor(pair, exact, image, psnrs[k])
        similarity = {name: float(e.embed(pair.earlier) @ e.embed(pair.later)) for name, e in embedders.items()}
        stored = states[at]
        return Measured(pair, similarity, distance(prediction, stored.prediction, stored.unconditional), ok, psnrs)

    def _meets_floor(self, pair: Pair, exact: np.ndarray, image: np.ndarray, db: float) -> bool:
        if pair.canonical is not None:
            return score(image, pair.canonical).all >= score(exact, pair.canonical).all
        return db >= self.psnr_db

    def _stored_states(self, prompt: str, seed: int) -> tuple[Entry, dict[int, resume.State]]:
        """``prompt``'s states at every candidate mark as the cache stored them (the check's with its prediction),
        run once per prompt and seed; each run is its own tenant, so it finds nothing to start from."""
        if (prompt, seed) not in self.earlier:
            tenant = f"calibration-{len(self.earlier)}"
            generation = self.engine.run({"prompt": prompt, "model": self.model, "seed": seed}, tenant=tenant)
            cache = next(a.details for a in generation.result.accelerations if a.name == "cache")
            entry = self.cache.store.entry(cache["stored_entry"])
            states = {k: self.cache.files.read(entry.id, k) for k in self.policy.marks(self.steps)}
            self.earlier[prompt, seed] = entry, states
        return self.earlier[prompt, seed]

    def _resumed(self, later: ResolvedRequest, entry: Entry, state: resume.State) -> Member:
        """A member that resumes from ``state`` as a hit on ``entry`` would (reseeded to its own seed), storing no
        states of its own."""
        policy = dataclasses.replace(self.policy, store_on_hit=None)
        lookup = Lookup("", "", np.zeros(0, np.float32), policy=policy, hit=Hit(entry, 1.0, state.step, state))
        member = Member(later, looked_up=True)
        member.cached = CacheRun(self.cache, self.loaded.pipe, self.model, later.request, later.seeds, lookup)
        return member

    def _image(self, member: Member) -> np.ndarray:
        (generation,) = self.engine.run_members([member])
        if isinstance(generation, BaseException):
            raise generation
        return np.asarray(generation.images[0])


def calibration_policy() -> CachePolicy:
    """fastgen's policy storing every candidate mark, with the check's prediction (its thresholds are not used)."""
    table = tuple((-i / 100, f) for i, f in enumerate(sorted(FRACTIONS, reverse=True)))
    return dataclasses.replace(FASTGEN, name="calibration", thresholds=table, check=((FRACTIONS[0], 0.0),))


def fit(measured: list[Measured], embedder: str, steps: int, keep: float, least: int = 5) -> tuple[Rung, ...]:
    """Per candidate fraction, the (similarity, distance) bar admitting the most pairs with at least ``keep`` of them
    meeting the floor (and at least ``least`` pairs: fewer prove nothing), its distance no larger than a smaller
    fraction's; a fraction no bar admits is left out."""
    sims = np.array([m.similarity[embedder] for m in measured])
    dists = np.array([m.distance for m in measured])
    rungs, tightest = [], None
    for fraction in FRACTIONS:
        k = round(fraction * steps)
        ok = np.array([m.ok[k] for m in measured], dtype=float)
        best = _best_bar(sims, dists, ok, keep, least)
        if best is not None:
            # Skipping more steps never tolerates a larger distance than skipping fewer: where the pairs say otherwise,
            # that is their noise, and the smaller bar holds.
            limit = best[1] if tightest is None or (best[1] is not None and best[1] < tightest) else tightest
            tightest = limit
            rungs.append(Rung(fraction, best[0], limit))
    return tuple(rungs)


def _best_bar(sims, dists, ok, keep: float, least: int) -> tuple[float, float | None] | None:
    best, admitted = None, least - 1
    for bar in sorted(set(sims.tolist())):
        inside = sims >= bar
        order = np.argsort(dists[inside], kind="stable")
        d, passed = dists[inside][order], ok[inside][order]
        rates = np.cumsum(passed) / np.arange(1, len(passed) + 1)
        ends = np.r_[d[1:] != d[:-1], True]  # a distance bar admits every pair at that distance
        fine = np.flatnonzero((rates >= keep) & ends)
        if len(fine) == 0:
            continue
        last = int(fine[-1])
        count = last + 1
        limit = None if count == len(d) else float(d[last])
        if count > admitted or (count == admitted and limit is None and best is not None and best[1] is not None):
            best, admitted = (round(bar - 1e-6, 6), None if limit is None else round(limit, 4)), count
    return best


def calibrate(
    settings: Settings,
    model: str,
    pairs: list[Pair],
    embedder_names: list[str],
    folder: Path,
    keep: float = 0.97,
    psnr_db: float = 20.0,
    progress=None,
) -> tuple[dict[str, Calibration], list[Measured]]:
    """Measure ``pairs`` on ``model`` and fit one table per embedder; returns (tables by embedder, measurements)."""
    started = time.perf_counter()
    calibrator = Calibrator(settings, model, folder, psnr_db)
    embedders = calibrator.embedders(embedder_names)
    measured = []
    for i, pair in enumerate(pairs):
        measured.append(calibrator.measure(pair, embedders))
        if progress is not None:
            progress(i + 1, len(pairs))
    made = {
        "pairs": {kind: sum(m.pair.kind == kind for m in measured) for kind in (*KINDS, "natural")},
        "seconds": round(time.perf_counter() - started, 1),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "steps": calibrator.steps,
        "how": "fastgen cache calibrate (fastgen.cache.calibrate)",
    }
    floor = {"adherence": "kept where the caption is scorable", "psnr_db": psnr_db}
    tables = {
        name: Calibration(model, name, fit(measured, name, calibrator.steps, keep), keep, floor, CHECK_AT, made)
        for name in embedder_names
    }
    return tables, measured


def write(tables: dict[str, Calibration], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for calibration in tables.values():
        path = out / file_name(calibration.model, calibration.embedder)
        path.write_text(calibration.to_json())
        paths.append(path)
    return paths
