"""The approximate noise-state cache as the engine uses it: look up, resume, capture, store, evict.

Agarwal et al., "Approximate Caching for Efficiently Serving Text-to-Image Diffusion Models"
(Nirvana, NSDI 2024): a prompt close enough to an earlier one starts from that prompt's stored latent
after K steps and runs only the remaining N-K steps with its own conditioning.

Per request, :meth:`ApproximateCache.begin` returns a :class:`CacheRun`: it embeds the prompt, finds
the best compatible entry (same partition: tenant, embedder, model, size, steps, scheduler, guidance
regime, negative prompt, LoRA set and output-changing accelerations), loads its state and says how many
steps to skip; during the run it captures the states at the policy's marks; :meth:`CacheRun.finish`
stores them, evicts under the byte budget and reports what happened. Any cache failure (a missing or
corrupt state file, a state that does not fit the request, an unreachable store) is logged and turns into a miss;
it never fails the job.

With calibrated tables (``calibrations``: FASTGEN_CACHE_POLICY=quality), a model that has one for this embedder looks
up with its own policy, and a hit whose skip needs it is checked first against what the model itself says about the new
prompt (``fastgen.cache.check``): the check may lower K or turn the hit into a miss, and says so in the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from fastgen.cache import resume
from fastgen.cache.check import Calibration, Verdict, distance, granted
from fastgen.cache.embedder import Embedder, PipelineEmbedder, PromptEmbedding, load_sentence_embedder
from fastgen.cache.index import IndexKind, VectorIndex
from fastgen.cache.policy import CachePolicy
from fastgen.cache.states import StateFiles
from fastgen.cache.store import CacheStore, Entry, Event
from fastgen.schema import GenerationRequest, image_seeds

logger = logging.getLogger(__name__)

SHARED = "shared"


@dataclass(frozen=True)
class CacheConfig:
    budget_bytes: int  # stored states beyond this are evicted, lowest LCBFU score first
    policy: CachePolicy
    embedder: str = "pipeline"  # "pipeline", "minilm", or a sentence-transformers name or directory
    share_across_tenants: bool = False  # True lets one tenant's prompts seed another's images
    index: IndexKind = "flat"
    default_on: bool = False  # for requests that do not say
    calibrations: dict[tuple[str, str], Calibration] = field(default_factory=dict)  # (model, embedder) -> its table


@dataclass(frozen=True)
class Hit:
    entry: Entry
    similarity: float
    skip: int
    state: resume.State


@dataclass
class Lookup:
    """What a lookup found; ``hit`` is None on a miss, with the reason."""

    partition: str
    prompt_id: str
    embedding: np.ndarray
    hit: Hit | None = None
    reason: str = ""
    seconds: float = 0.0
    embedded_at_door: bool = False
    policy: CachePolicy | None = None  # the model's: calibrated, or the cache's
    check: Verdict | None = None  # the quality-aware check's say, where the policy has one


def compatibility_key(spec_name: str, pipe, request: GenerationRequest, adapters: tuple = ()) -> dict[str, Any]:
    """Everything besides the prompt that shapes the denoising trajectory: entries must agree on all of it.

    ``adapters`` are the request's LoRAs as (name, file checksum, scale): a file replaced under the same name is
    another adapter.
    """
    scheduler = pipe.scheduler
    guidance = request.guidance or 0.0
    # How the work is spread over devices does not change what is drawn, so parallel options do not partition.
    accelerations = request.accelerate.model_dump(exclude={"cache", "parallel"})
    return {
        "model": spec_name,
        "size": [request.width, request.height, request.num_frames],
        "steps": request.steps,
        "scheduler": [type(scheduler).__name__, json.dumps(dict(scheduler.config), sort_keys=True, default=str)],
        "guidance": "off" if guidance <= 1.0 else round(guidance * 2) / 2,  # regimes of 0.5
        "negative_prompt": " ".join(request.negative_prompt.lower().split()),
        "loras": sorted(adapters) if adapters else sorted((lora.name, lora.scale) for lora in request.loras),
        "accelerate": {k: v for k, v in accelerations.items() if v},
        "dtype": str(pipe.dtype),
    }


MAX_LINEAGE = 8  # a hit on an entry with this many ancestors stores nothing: long chains drift


def prompt_key(prompt: str) -> str:
    """Names a prompt's text up to spacing: equal keys are repeats of one prompt, whatever an embedder thinks."""
    return digest(" ".join(prompt.split()), 12)


def may_start_from(policy: CachePolicy, entry: Entry, prompt_id: str, vector: np.ndarray, steps: int) -> bool:
    """An entry a miss stored serves any similar prompt; one a hit stored, only repeats (or fair heirs)."""
    if not entry.lineage:
        return True
    if policy.repeats_only:
        return entry.prompt_id == prompt_id
    return inherits_fairly(policy, entry, vector, steps)


def inherits_fairly(policy: CachePolicy, entry: Entry, vector: np.ndarray, steps: int) -> bool:
    """Whether a prompt may start from ``entry``'s states, given the earlier prompts whose steps they carry.

    An entry stored by a hit carries the first K steps of another prompt (and that one's ancestors'); the new prompt
    must be close enough to each of them to be allowed that many of their steps, or chains of small changes would
    drift from one image to a quite different prompt's.
    """
    return all(policy.skip(float(np.dot(vector, embedding)), steps) >= k for embedding, k in entry.lineage)


def miss_reason(candidates: list[tuple[Entry, float]], floor: float, asked: float | None) -> str:
    """Why nothing was reused, with how close the nearest earlier prompt came and the bar it had to clear."""
    if not candidates:
        return "no earlier prompt with these settings"
    nearest = max(similarity for _, similarity in candidates)
    bar = f"min_similarity {asked:.2f}" if asked is not None and asked >= floor else f"the policy's lowest {floor:.2f}"
    if nearest < floor:
        return f"the nearest earlier prompt is {nearest:.2f} alike, below {bar}"
    return f"the nearest earlier prompt is {nearest:.2f} alike, but none may lend this request steps (policy)"


def digest(value: Any, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


class SharedIndex:
    """This process's view of the shared entries, kept current from the log.

    Per partition, a vector index of the entries similarity finds. With ``repeats_only``, entries stored by hits
    serve only repeats of their prompt, so they are kept by prompt key instead: in the vector index they would crowd
    the nearest candidates with entries the prompt may not start from (shapes captions a word apart are 0.99 alike).
    """

    def __init__(self, store: CacheStore, kind: IndexKind, repeats_only: bool = False):
        self.store, self.kind, self.repeats_only = store, kind, repeats_only
        self.entries: dict[int, Entry] = {}
        self.partitions: dict[str, VectorIndex] = {}
        self.repeats: dict[tuple[str, str], set[int]] = {}  # (partition, prompt key) -> entries found by key
        self.cursor: str | None = None
        self.lock = threading.Lock()

    def sync(self) -> None:
        with self.lock:
            if self.cursor is not None:
                events, cursor = self.store.events(self.cursor)
                if cursor is not None:
                    self.cursor = cursor
                    for event in events:
                        self._apply(event)
                    return
            self._reload()

    def _reload(self) -> None:
        entries, self.cursor = self.store.snapshot()
        self.entries, self.partitions, self.repeats = {}, {}, {}
        for entry in entries:
            self._add(entry)

    def _apply(self, event: Event) -> None:
        if event.op == "add" and event.entry_id not in self.entries:
            entry = self.store.entry(event.entry_id)
            if entry is not None and entry.marks:
                self._add(entry)
        elif event.op == "drop" and event.entry_id in self.entries:
            entry = self.entries[event.entry_id]
            entry.marks.pop(event.k, None)
            if not entry.marks:
                self._remove(entry)

    def _by_key(self, entry: Entry) -> bool:
        return self.repeats_only and bool(entry.lineage)

    def _add(self, entry: Entry) -> None:
        self.entries[entry.id] = entry
        if self._by_key(entry):
            self.repeats.setdefault((entry.partition, entry.prompt_id), set()).add(entry.id)
        else:
            index = self.partitions.get(entry.partition)
            if index is None:
                index = self.partitions[entry.partition] = VectorIndex(len(entry.embedding), self.kind)
            index.add(entry.id, entry.embedding)

    def _remove(self, entry: Entry) -> None:
        del self.entries[entry.id]
        if self._by_key(entry):
            self.repeats[entry.partition, entry.prompt_id].discard(entry.id)
        else:
            self.partitions[entry.partition].remove(entry.id)

    def candidates(self, partition: str, prompt_id: str, vector: np.ndarray, k: int) -> list[tuple[Entry, float]]:
        """The ``k`` nearest entries by similarity, and those kept for repeats of this very prompt."""
        with self.lock:
            index = self.partitions.get(partition)
            found = dict(index.search(vector, k)) if index is not None else {}
            for entry_id in self.repeats.get((partition, prompt_id), ()):
                found.setdefault(entry_id, float(np.dot(vector, self.entries[entry_id].embedding)))
            return [(self.entries[i], s) for i, s in found.items() if i in self.entries]


class ApproximateCache:
    """Shared by every worker through ``store`` (records) and ``files`` (state tensors)."""

    def __init__(self, config: CacheConfig, store: CacheStore, files: StateFiles):
        self.config, self.store, self.files = config, store, files
        self.index = SharedIndex(store, config.index, config.policy.repeats_only)
        self._embedders: dict[str, Embedder] = {}
        self._policies = {  # built once: every lookup asks
            model: calibration.policy(config.policy)
            for (model, embedder), calibration in config.calibrations.items()
            if embedder == config.embedder
        }
        self._embedder_lock = threading.Lock()

    def policy_for(self, model: str) -> CachePolicy:
        """The model's calibrated policy for this cache's embedder, or the cache's own where it has no table."""
        return self._policies.get(model, self.config.policy)

    def enabled_for(self, request: GenerationRequest) -> bool:
        wanted = request.accelerate.cache.enabled
        return self.config.default_on if wanted is None else wanted

    def embedder(self, pipe, model: str) -> Embedder:
        key = model if self.config.embedder == "pipeline" else self.config.embedder
        with self._embedder_lock:
            if key not in self._embedders:
                if self.config.embedder == "pipeline":
                    self._embedders[key] = PipelineEmbedder(pipe, model)
                else:
                    self._embedders[key] = load_sentence_embedder(self.config.embedder)
            return self._embedders[key]

    def begin(
        self,
        pipe,
        model: str,
        request: GenerationRequest,
        seed: int,
        tenant: str,
        adapters: tuple = (),
        embedded: PromptEmbedding | None = None,
        probe: Callable[[resume.State], Any] | None = None,
    ) -> CacheRun | None:
        """Look the request up; None when the request does not use the cache or the scheduler cannot resume.

        ``adapters``: the request's LoRAs as (name, checksum, scale), part of what entries must agree on.
        ``embedded``: the prompt's vector if the door computed it (used when it comes from this cache's embedder).
        ``probe``: the denoiser's conditional prediction for this request from a stored state's latents, for the
        quality-aware check (without it, a skip that needs the check is not granted).
        """
        if not self.enabled_for(request):
            return None
        reason = resume.resumable(pipe.scheduler)
        if reason is not None:
            return CacheRun.unusable(self, model, reason)
        try:
            lookup = self.lookup(pipe, model, request, tenant, adapters, embedded, probe)
        except Exception as exc:  # the cache is an optimisation: never fail a job for it
            logger.exception("cache lookup failed; running uncached")
            return CacheRun.unusable(self, model, f"cache unavailable: {type(exc).__name__}")
        return CacheRun(self, pipe, model, request, image_seeds(seed, request.num_images), lookup)

    def lookup(
        self,
        pipe,
        model: str,
        request: GenerationRequest,
        tenant: str,
        adapters: tuple = (),
        embedded: PromptEmbedding | None = None,
        probe: Callable[[resume.State], Any] | None = None,
    ) -> Lookup:
        started = time.perf_counter()
        embedder = self.embedder(pipe, model)
        owner = SHARED if self.config.share_across_tenants else f"tenant:{tenant}"
        partition = digest([owner, embedder.name, compatibility_key(model, pipe, request, adapters)])
        at_door = embedded is not None and embedded.usable_for(embedder, request.prompt)
        vector = embedded.vector if at_door else embedder.embed(request.prompt)
        policy, steps = self.policy_for(model), request.steps
        lookup = Lookup(partition, prompt_key(request.prompt), vector, embedded_at_door=at_door, policy=policy)
        self.index.sync()
        floor = max(policy.lowest_similarity, request.accelerate.cache.min_similarity or 0.0)
        best: tuple[int, float, Entry] | None = None
        candidates = self.index.candidates(partition, lookup.prompt_id, vector, policy.candidates)
        for entry, similarity in candidates:
            if similarity < floor or not may_start_from(policy, entry, lookup.prompt_id, vector, steps):
                continue
            allowed = policy.skip(similarity, steps)
            usable = [k for k in entry.marks if k <= allowed]
            if usable and (best is None or (max(usable), similarity) > best[:2]):
                best = (max(usable), similarity, entry)
        if best is not None and policy.check:
            best = self._checked(lookup, best, steps, probe)
        if best is None:
            lookup.reason = lookup.reason or miss_reason(candidates, floor, request.accelerate.cache.min_similarity)
        else:
            wanted = resume.expected(pipe, request.width, request.height, request.num_frames)
            lookup.hit, lookup.reason = self._load(model, best, wanted)
        lookup.seconds = time.perf_counter() - started
        return lookup

    def _checked(
        self, lookup: Lookup, best: tuple[int, float, Entry], steps: int, probe
    ) -> tuple[int, float, Entry] | None:
        """``best`` with the skip the quality-aware check grants (None: refused), its verdict kept in ``lookup``."""
        k_asked, similarity, entry = best
        policy = lookup.policy
        usable = [k for k in entry.marks if k <= policy.skip(similarity, steps)]
        if policy.max_distance(k_asked, steps) is None:
            lookup.check = Verdict("not needed", k_asked, k_asked)
        elif entry.prompt_id == lookup.prompt_id:  # the same text: the model says the same, nothing to compare
            lookup.check = Verdict("repeat", k_asked, k_asked)
        else:
            lookup.check = self._measure(policy, entry, usable, steps, k_asked, probe)
        k = lookup.check.k
        if k == 0:
            lookup.reason = f"the nearest earlier prompt is {similarity:.2f} alike, but the check refused it: " + (
                lookup.check.reason or f"the model's layouts for the two prompts differ by {lookup.check.distance:.3f}"
            )
            return None
        return k, similarity, entry

    def _measure(
        self, policy: CachePolicy, entry: Entry, usable: list[int], steps: int, k_asked: int, probe
    ) -> Verdict:
        """Probe the new prompt on the entry's earliest stored latents and grant the marks its distance allows."""
        started, at = time.perf_counter(), policy.check_step(steps)
        measured, reason, limit = None, "", policy.max_distance(k_asked, steps)
        try:
            if probe is None:
                reason = "this worker cannot run the check"
            elif at not in entry.marks:
                reason = f"the state the check compares against (step {at}) was evicted"
            else:
                state = self.files.read(entry.id, at)
                if state.prediction is None:
                    reason = f"the state of step {at} holds no prediction to compare against"
                else:
                    measured = distance(probe(state), state.prediction, state.unconditional)
        except Exception as exc:  # a failed check grants only what needs none; it never fails the job
            logger.exception("cache check failed")
            reason = f"the check failed ({type(exc).__name__})"
        k = granted(policy, usable, steps, measured)
        verdict = "unavailable" if measured is None else "passed" if k == k_asked else "lowered" if k else "refused"
        return Verdict(verdict, k_asked, k, at, measured, limit, time.perf_counter() - started, reason)

    def _load(self, model: str, best: tuple[int, float, Entry], wanted: resume.Expected) -> tuple[Hit | None, str]:
        skip, similarity, entry = best
        try:
            state = self.files.read(entry.id, skip)
            if state.step != skip or state.total != entry.total_steps:
                raise ValueError(f"state file holds step {state.step} of {state.total}")
        except Exception as exc:
            logger.warning("cache entry %d step %d unreadable (%s): a miss", entry.id, skip, exc)
            self.store.drop(entry.id, skip)
            self.store.count(model, bad_states=1)
            return None, f"stored state unreadable ({type(exc).__name__})"
        misfit = resume.fits(state, wanted)
        if misfit is not None:
            logger.warning("cache entry %d step %d does not fit the request (%s): a miss", entry.id, skip, misfit)
            self._discard(entry)
            self.store.count(model, bad_states=1)
            return None, f"stored state does not fit: {misfit}"
        return Hit(entry, similarity, skip, state), ""

    def _discard(self, entry: Entry) -> None:
        """Drop every state of ``entry`` and delete its files: one misfit shows its record does not describe them."""
        for k in list(entry.marks):  # a copy: syncing the index pops marks from this very dict
            self.store.drop(entry.id, k)
            self.files.delete(entry.id, k)

    def store_states(self, lookup: Lookup, request: GenerationRequest, seed: int, states: list[resume.State]) -> int:
        """Write captured states as a new entry and evict down to the budget; return the new entry's id."""
        entry_id = self.store.new_id()
        marks = {state.step: self.files.write(entry_id, state) for state in states}
        hit = lookup.hit
        entry = Entry(
            entry_id,
            lookup.partition,
            lookup.prompt_id,
            seed,
            request.steps,
            lookup.embedding,
            marks,
            lineage=hit.entry.lineage + [(hit.entry.embedding, hit.skip)] if hit else [],
        )
        self.store.add(entry)
        for evicted_id, k in self.store.evict(self.config.budget_bytes):
            self.files.delete(evicted_id, k)
        return entry_id


@dataclass
class CacheRun:
    """One request's use of the cache: the resume state going in, the states captured coming out.

    Each of the request's images (``seeds``) is a request of its own to the cache: on a hit each resumes from the
    matched state reseeded to its own seed, and each stores its own entry. They share the prompt, so the one lookup
    is the one each would make."""

    cache: ApproximateCache
    pipe: Any
    model: str
    request: GenerationRequest | None
    seeds: list[int]
    lookup: Lookup
    captured: list[resume.State] = field(default_factory=list)

    @classmethod
    def unusable(cls, cache: ApproximateCache, model: str, reason: str) -> CacheRun:
        return cls(cache, None, model, None, [0], Lookup("", "", np.zeros(0, np.float32), reason=reason))

    @property
    def hit(self) -> Hit | None:
        return self.lookup.hit

    @property
    def skipped(self) -> int:
        return self.hit.skip if self.hit else 0

    @cached_property
    def marks(self) -> tuple[int, ...]:
        """The steps whose states this run stores (computed once: it is asked after every denoising step)."""
        if self.request is None or (self.hit and not self._stores_after_hit()):
            return ()
        return tuple(k for k in self.lookup.policy.marks(self.request.steps) if k > self.skipped)

    @cached_property
    def prediction_step(self) -> int | None:
        """The mark whose state also keeps the run's own prediction, for later requests' checks (None: no check)."""
        step = self.lookup.policy.check_step(self.request.steps) if self.request is not None else None
        return step if step in self.marks else None

    def _stores_after_hit(self) -> bool:
        hit = self.hit
        return self.lookup.policy.stores_after_hit(hit.similarity) and len(hit.entry.lineage) < MAX_LINEAGE

    def start_states(self) -> list[resume.State]:
        """On a hit, each image's state to resume from: the matched one, reseeded to the image's seed where the policy
        says so; nothing on a miss."""
        if self.hit is None:
            return []
        stored, reseed = self.hit.state, self.lookup.policy.reseed
        return [
            resume.reseed(stored, self.pipe.scheduler, self.hit.entry.seed, seed) if reseed else stored
            for seed in self.seeds
        ]

    def finish(self) -> dict[str, Any]:
        """After a completed run: store what was captured, count, and report."""
        report = self.report()
        if self.request is None:  # unusable: nothing was looked up, nothing to store or count
            return report
        images = len(self.seeds)
        try:
            if self.captured:
                per_image = zip(*(resume.split(state, images) for state in self.captured), strict=True)
                entries = [
                    self.cache.store_states(self.lookup, self.request, seed, list(states))
                    for seed, states in zip(self.seeds, per_image, strict=True)
                ]
                report["stored_entry"], report["stored_entries"] = entries[0], entries
                report["stored_steps"] = [state.step for state in self.captured]
            outcome = {"hits": images} if self.hit else {"misses": images}
            steps_run = self.request.steps - self.skipped
            self.cache.store.count(
                self.model, **outcome, steps_saved=self.skipped * images, steps_run=steps_run * images
            )
            for _ in range(images if self.hit else 0):
                self.cache.store.hit(self.hit.entry.id, self.hit.skip)
        except Exception:
            logger.exception("storing cache states failed; the result is unaffected")
        return report

    def report(self) -> dict[str, Any]:
        hit = self.hit
        report: dict[str, Any] = {"hit": hit is not None, "steps_saved": self.skipped}
        if hit is not None:
            report |= {
                "matched_prompt_id": hit.entry.prompt_id,
                "matched_entry": hit.entry.id,
                "similarity": round(hit.similarity, 4),
                "k": hit.skip,
                "start_seed": hit.entry.seed,
            }
        else:
            report["reason"] = self.lookup.reason
        if self.lookup.check is not None:
            report["check"] = self.lookup.check.report()
        report["lookup_s"] = round(self.lookup.seconds, 6)
        report["embedded_at_door"] = self.lookup.embedded_at_door
        return report
