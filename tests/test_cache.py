"""The approximate noise-state cache: exact resumption, matching rules, eviction, sharing, isolation, failures."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import small
from services import service_env, wait_until

from fastgen.cache import resume
from fastgen.cache.approximate import ApproximateCache, CacheConfig, inherits_fairly, may_start_from
from fastgen.cache.embedder import DoorEmbedder, PromptEmbedding
from fastgen.cache.index import VectorIndex
from fastgen.cache.policy import FASTGEN, NIRVANA, CachePolicy
from fastgen.cache.states import StateFiles
from fastgen.cache.store import Entry, RedisCacheStore, SqliteCacheStore
from fastgen.engine import Engine
from fastgen.metrics import render_metrics

SHAPES = {"model": "fastgen-shapes", "seed": 5}
CAPTION = "a red circle at the top left on a blue background"
NEAR_DUPLICATE = "a red circle in the top left on a blue background"


def make_cache(tmp_path, embedder="minilm", **config) -> ApproximateCache:
    config = {"budget_bytes": 10**9, "policy": FASTGEN, "embedder": embedder, "default_on": True, **config}
    store = SqliteCacheStore(tmp_path / "cache.sqlite3")
    return ApproximateCache(CacheConfig(**config), store, StateFiles(str(tmp_path / "states")))


def cached_engine(engine: Engine, cache: ApproximateCache | None) -> Engine:
    """An engine over the session's warm pipelines with its own cache."""
    other = Engine(engine.settings, registry=engine.registry, cache=cache)
    other.pool = engine.pool
    return other


def cache_report(generation) -> dict:
    (report,) = [a.details for a in generation.result.accelerations if a.name == "cache"]
    return report


def pixels(generation) -> np.ndarray:
    return np.stack([np.asarray(x) for x in (generation.frames or generation.images)])


@pytest.fixture(scope="module")
def minilm_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("minilm-cache")


@pytest.mark.parametrize("model", ["fastgen-shapes", "tiny-sd", "tiny-pixart", "tiny-wan"])
def test_resuming_a_prompt_from_its_own_state_reproduces_the_full_run(engine, tmp_path, model):
    # DDIM, Euler, DPM-Solver++ (multistep history) and UniPC (history + corrector): all exact.
    request = {"prompt": CAPTION, **SHAPES} if model == "fastgen-shapes" else small(model, steps=10)
    run = cached_engine(engine, make_cache(tmp_path, embedder="pipeline"))
    first = run.run(request)
    again = run.run(request)
    assert cache_report(first)["hit"] is False
    report = cache_report(again)
    assert report["hit"] is True and report["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert report["k"] == report["steps_saved"] == round(0.5 * first.result.steps)
    np.testing.assert_array_equal(pixels(again), pixels(first))


def test_near_duplicate_starts_at_the_expected_k_and_runs_the_remaining_steps(engine, minilm_cache_dir):
    run = cached_engine(engine, make_cache(minilm_cache_dir))
    miss = run.run({"prompt": CAPTION, **SHAPES})
    assert cache_report(miss)["hit"] is False
    assert cache_report(miss)["stored_steps"] == list(FASTGEN.marks(25))
    steps = []
    hit = run.run({"prompt": NEAR_DUPLICATE, **SHAPES, "seed": 9}, on_step=lambda p: steps.append((p.step, p.total)))
    report = cache_report(hit)
    k = FASTGEN.skip(report["similarity"], 25)
    assert report["hit"] and report["k"] == k > 0 and report["start_seed"] == 5
    assert steps == [(step, 25) for step in range(k + 1, 26)]  # only N-K steps ran
    assert hit.result.steps == 25


def test_a_prompt_embedded_at_the_door_is_used_as_is_and_gives_the_same_image(engine, tmp_path):
    door = DoorEmbedder("minilm", default_on=False)
    worker = cached_engine(engine, make_cache(tmp_path / "worker"))
    helped = cached_engine(engine, make_cache(tmp_path / "helped"))
    embedder = helped.cache.embedder(None, "fastgen-shapes")
    embedded_by_worker = []
    embed = embedder.embed
    embedder.embed = lambda text: embedded_by_worker.append(text) or embed(text)
    for prompt in (CAPTION, NEAR_DUPLICATE):  # a miss that stores, then a hit on it
        alone = worker.run({"prompt": prompt, **SHAPES})
        with_door = helped.run({"prompt": prompt, **SHAPES}, embedded=door.embed(prompt, cache_wanted=True))
        assert cache_report(with_door)["embedded_at_door"] and not cache_report(alone)["embedded_at_door"]
        assert cache_report(with_door)["hit"] == cache_report(alone)["hit"] == (prompt == NEAR_DUPLICATE)
        assert np.array_equal(pixels(alone), pixels(with_door))
    assert embedded_by_worker == []
    # A vector for another prompt, or from another embedder, is not trusted: the worker embeds itself.
    captioned = door.embed(CAPTION, cache_wanted=True)
    stranger = PromptEmbedding("sentence-transformers:another-model", "a green square", captioned.vector)
    for given in (captioned, stranger):
        report = cache_report(helped.run({"prompt": "a green square", **SHAPES}, embedded=given))
        assert report["embedded_at_door"] is False
    assert embedded_by_worker == ["a green square"] * 2


def test_the_door_embeds_only_cached_requests_and_gives_way_when_it_cannot(tmp_path, caplog):
    door = DoorEmbedder("minilm", default_on=False)
    assert door.embed(CAPTION, cache_wanted=None) is None and door.embed(CAPTION, cache_wanted=False) is None
    warmed = DoorEmbedder("minilm", default_on=False)
    warmed.warm()
    wait_until(lambda: warmed.ready, 60, "the door embedder to load in the background", 0.1)
    embedded = door.embed(CAPTION, cache_wanted=True)
    assert embedded.embedder == "sentence-transformers:all-MiniLM-L6-v2" and embedded.prompt == CAPTION
    assert DoorEmbedder("minilm", default_on=True).embed(CAPTION, cache_wanted=None) is not None
    received = PromptEmbedding.from_message(json.loads(json.dumps(embedded.message())))
    assert (received.embedder, received.prompt) == (embedded.embedder, CAPTION)
    assert np.array_equal(received.vector, embedded.vector)  # exactly what the door computed
    broken = [{"embedder": "x"}, {"embedder": "x", "prompt": "p", "vector": [0, 2]}, "vector", None]
    broken += [{"embedder": "x", "prompt": "p", "vector": v} for v in ("abc", [[1.0]], [float("nan"), 1.0])]
    for message in broken:
        assert PromptEmbedding.from_message(message) is None, message
    missing = DoorEmbedder(str(tmp_path / "no-such-model"), default_on=True)
    assert missing.embed(CAPTION, None) is None and missing.embed(CAPTION, None) is None
    assert sum("not available at the door" in r.getMessage() for r in caplog.records) == 1  # tried once


def test_a_dissimilar_prompt_misses(engine, minilm_cache_dir):
    run = cached_engine(engine, make_cache(minilm_cache_dir))
    run.run({"prompt": CAPTION, **SHAPES})
    report = cache_report(run.run({"prompt": "an astronaut riding a horse on the moon, oil painting", **SHAPES}))
    assert report["hit"] is False and report["reason"].startswith("the nearest earlier prompt is 0."), report
    assert "alike, below the policy's lowest 0.65" in report["reason"], report
    strict = run.run(
        {"prompt": CAPTION.replace("red", "blue"), **SHAPES, "accelerate": {"cache": {"min_similarity": 1.0}}}
    )
    assert "below min_similarity 1.00" in cache_report(strict)["reason"], cache_report(strict)


@pytest.mark.parametrize(
    "change",
    [
        {"width": 64, "height": 64},
        {"steps": 20},
        {"guidance": 5.0},
        {"negative_prompt": "green"},
        small("tiny-sd", seed=5),
    ],
    ids=["size", "steps", "guidance", "negative-prompt", "model"],
)
def test_incompatible_settings_never_match(engine, minilm_cache_dir, change):
    run = cached_engine(engine, make_cache(minilm_cache_dir))
    run.run({"prompt": CAPTION, **SHAPES})
    report = cache_report(run.run({"prompt": CAPTION, **SHAPES, **change}))
    assert report["hit"] is False


def test_a_request_can_demand_a_closer_match(engine, minilm_cache_dir):
    run = cached_engine(engine, make_cache(minilm_cache_dir))
    run.run({"prompt": CAPTION, **SHAPES})
    strict = {"prompt": NEAR_DUPLICATE, **SHAPES, "accelerate": {"cache": {"min_similarity": 0.9999}}}
    assert cache_report(run.run(strict))["hit"] is False


def test_with_the_cache_off_output_is_bit_identical_to_no_cache(engine, tmp_path):
    request = {"prompt": CAPTION, **SHAPES}
    plain = engine.run(request)
    with_cache = cached_engine(engine, make_cache(tmp_path, embedder="pipeline"))
    with_cache.run(request)
    with_cache.run(request)  # a hit: resumed, then detached
    off = with_cache.run({**request, "accelerate": {"cache": {"enabled": False}}})
    assert [a.name for a in off.result.accelerations] == []
    np.testing.assert_array_equal(pixels(off), pixels(plain))
    np.testing.assert_array_equal(pixels(engine.run(request)), pixels(plain))


def test_the_service_default_applies_when_a_request_does_not_say(engine, tmp_path):
    run = cached_engine(engine, make_cache(tmp_path, embedder="pipeline", default_on=False))
    assert run.run({"prompt": CAPTION, **SHAPES}).result.accelerations == []
    on = run.run({"prompt": CAPTION, **SHAPES, "accelerate": {"cache": {"enabled": True}}})
    assert cache_report(on)["hit"] is False


def test_tenants_do_not_see_each_others_entries_unless_shared(engine, tmp_path):
    isolated = cached_engine(engine, make_cache(tmp_path / "a", embedder="pipeline"))
    isolated.run({"prompt": CAPTION, **SHAPES}, tenant="alice")
    assert cache_report(isolated.run({"prompt": CAPTION, **SHAPES}, tenant="bob"))["hit"] is False
    assert cache_report(isolated.run({"prompt": CAPTION, **SHAPES}, tenant="alice"))["hit"] is True
    shared = cached_engine(engine, make_cache(tmp_path / "b", embedder="pipeline", share_across_tenants=True))
    shared.run({"prompt": CAPTION, **SHAPES}, tenant="alice")
    assert cache_report(shared.run({"prompt": CAPTION, **SHAPES}, tenant="bob"))["hit"] is True


def test_a_corrupt_or_missing_state_is_a_logged_miss_not_a_failure(engine, tmp_path, caplog):
    cache = make_cache(tmp_path, embedder="pipeline")
    run = cached_engine(engine, cache)
    run.run({"prompt": CAPTION, **SHAPES})
    for path in (tmp_path / "states").rglob("*.safetensors"):
        path.write_bytes(b"not a safetensors file")
    generation = run.run({"prompt": CAPTION, **SHAPES})
    report = cache_report(generation)
    assert report["hit"] is False and report["reason"].startswith("stored state unreadable")
    assert "unreadable" in caplog.text
    assert generation.images and cache.store.counters()["bad_states"] == {"fastgen-shapes": 1}
    (entry,) = cache.store.snapshot()[0][:1]
    assert 12 not in entry.marks  # the bad mark is dropped; a later lookup uses another or misses
    for path in (tmp_path / "states").rglob("*.safetensors"):
        path.unlink()
    assert cache_report(run.run({"prompt": CAPTION, **SHAPES}))["hit"] is False


def grow_frames(state: resume.State) -> resume.State:
    """One more latent frame in the latents and in every history tensor shaped like them (still self-consistent)."""

    def grow(value):
        if isinstance(value, list):
            return [grow(v) for v in value]
        if isinstance(value, torch.Tensor) and value.shape == state.latents.shape:
            return torch.cat([value, value[:, :, -1:]], dim=2)
        return value

    return replace(state, latents=grow(state.latents), history={n: grow(v) for n, v in state.history.items()})


def with_last_model_output(value: torch.Tensor):
    def change(state: resume.State) -> resume.State:
        outputs = state.history["model_outputs"]
        return replace(state, history={**state.history, "model_outputs": [*outputs[:-1], value]})

    return change


def with_value_at_origin(value: float):
    def change(state: resume.State) -> resume.State:
        latents = state.latents.clone()
        latents.view(-1)[0] = value
        return replace(state, latents=latents)

    return change


MISFITS = {  # id: (model, how the stored state is rewritten, what the miss reason says)
    "channels": ("tiny-sd", lambda s: replace(s, latents=torch.randn(1, 8, 8, 8)), "latents of shape [1, 8, 8, 8]"),
    "size": ("tiny-sd", lambda s: replace(s, latents=torch.randn(1, 4, 16, 16)), "latents of shape [1, 4, 16, 16]"),
    "batch": ("tiny-sd", lambda s: replace(s, latents=torch.randn(2, 4, 8, 8)), "latents of shape [2, 4, 8, 8]"),
    "dtype": ("tiny-sd", lambda s: replace(s, latents=s.latents.half()), "latents in torch.float16"),
    "nan": ("tiny-sd", with_value_at_origin(float("nan")), "not finite"),
    "inf": ("tiny-sd", with_value_at_origin(float("inf")), "not finite"),
    "video-frames": ("tiny-wan", grow_frames, "latents of shape [1, 16, 3, 4, 4]"),
    "history-shape": ("tiny-pixart", with_last_model_output(torch.randn(1, 4, 16, 16)), "model_outputs"),
    "history-nan": ("tiny-pixart", with_last_model_output(torch.full((1, 4, 8, 8), float("nan"))), "not finite"),
    "history-of-another-scheduler": ("tiny-pixart", lambda s: replace(s, history={}), "scheduler history"),
}


@pytest.mark.parametrize(("model", "change", "reason"), MISFITS.values(), ids=MISFITS.keys())
def test_a_readable_state_that_does_not_fit_the_request_is_a_logged_miss_and_its_entry_is_dropped(
    engine, tmp_path, caplog, model, change, reason
):
    request = small(model, steps=10)
    cache = make_cache(tmp_path, embedder="pipeline")
    run = cached_engine(engine, cache)
    first = run.run(request)
    ((bad, k),) = [(entry.id, max(entry.marks)) for entry in cache.store.snapshot()[0]]
    cache.files.write(bad, change(cache.files.read(bad, k)))  # the file a repeat resumes from, as states.py writes it
    generation = run.run(request)
    assert pixels(generation).shape[1:3] == (request["height"], request["width"])
    assert len(pixels(generation)) == request.get("num_frames", 1)
    np.testing.assert_array_equal(pixels(generation), pixels(first))  # every step ran, exactly as uncached
    report = cache_report(generation)
    assert report["hit"] is False and report["reason"].startswith("stored state does not fit: "), report
    assert reason in report["reason"], report
    assert f"cache entry {bad} step {k} does not fit" in caplog.text
    assert bad not in [entry.id for entry in cache.store.snapshot()[0]]
    assert cache.files.fs.glob(f"{cache.files.root}/{bad}/*.safetensors") == []
    assert cache.store.counters()["bad_states"] == {model: 1}
    again = run.run(request)  # resumes from the state the miss stored, never from the dropped entry
    assert cache_report(again)["hit"] is True and cache_report(again)["matched_entry"] != bad
    np.testing.assert_array_equal(pixels(again), pixels(first))


def test_a_pixart_that_bins_its_size_may_resume_at_the_binned_size_too(engine):
    """PixArt draws at its nearest trained size unless its call turns binning off, which the cache cannot see: both
    shapes fit, any other does not."""
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    tiny = engine.pool.get(engine.registry.resolve("tiny-pixart"))[0].pipe
    transformer = PixArtTransformer2DModel.from_config({**tiny.transformer.config, "sample_size": 32})
    pipe = PixArtSigmaPipeline(**{**tiny.components, "transformer": transformer})
    shapes = resume.latent_shapes(pipe, width=200, height=264, num_frames=None)  # bins to 224 x 288 at 256 px
    assert shapes == {(1, 4, 264 // 8, 200 // 8), (1, 4, 288 // 8, 224 // 8)}, shapes
    sd = engine.pool.get(engine.registry.resolve("tiny-sd"))[0].pipe
    assert resume.latent_shapes(sd, width=64, height=96, num_frames=None) == {(1, 4, 12, 8)}  # SD never bins


def test_counters_and_metrics(engine, tmp_path):
    cache = make_cache(tmp_path, embedder="pipeline")
    run = cached_engine(engine, cache)
    run.run({"prompt": CAPTION, **SHAPES})
    run.run({"prompt": CAPTION, **SHAPES})
    counters = cache.store.counters()
    assert counters["hits"] == counters["misses"] == {"fastgen-shapes": 1}
    assert counters["steps_saved"] == {"fastgen-shapes": 12}
    assert counters["steps_run"] == {"fastgen-shapes": 25 + 13}

    class NoJobs:
        def queue_depths(self):
            return {}

        def state_counts(self):
            return {}

        def latency(self):
            from fastgen.jobs import LATENCY_BUCKETS, Histogram

            return Histogram(LATENCY_BUCKETS, (0,) * len(LATENCY_BUCKETS), 0.0, 0)

    text = render_metrics(NoJobs(), lambda: counters)
    assert 'fastgen_cache_hits_total{model="fastgen-shapes"} 1' in text
    assert 'fastgen_cache_steps_saved_total{model="fastgen-shapes"} 12' in text


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return SqliteCacheStore(tmp_path / "cache.sqlite3")
    return RedisCacheStore(request.getfixturevalue("redis_url"), prefix=f"test:{uuid.uuid4().hex}")


def add_entry(store, marks: dict[int, int], partition: str = "p") -> int:
    entry_id = store.new_id()
    store.add(Entry(entry_id, partition, "prompt", 0, 50, np.ones(4, np.float32) / 2, marks))
    return entry_id


def test_lcbfu_evicts_lowest_steps_saved_times_frequency_first(store):
    a = add_entry(store, {5: 100, 25: 100})
    b = add_entry(store, {5: 100, 10: 100})
    for _ in range(3):
        store.hit(b, 5)  # b@5 scores 5 x 4 = 20
    store.hit(a, 25)  # a@25 scores 25 x 2 = 50
    # Scores: a@5 5, b@10 10, b@5 20, a@25 50; equal scores would go oldest first.
    assert store.stored_bytes() == 400
    assert store.evict(budget_bytes=250) == [(a, 5), (b, 10)]
    assert store.stored_bytes() == 200
    assert store.evict(budget_bytes=0) == [(b, 5), (a, 25)]
    assert store.snapshot()[0] == []


def test_equal_scores_evict_the_older_state_first(store):
    old = add_entry(store, {10: 1})
    new = add_entry(store, {10: 1})
    assert store.evict(budget_bytes=1) == [(old, 10)]
    assert [e.id for e in store.snapshot()[0]] == [new]


def test_eviction_in_one_worker_reaches_the_others_through_the_log(store, tmp_path):
    from fastgen.cache.approximate import SharedIndex

    first, second = SharedIndex(store, "flat"), SharedIndex(store, "flat")
    second.sync()
    entry_id = add_entry(store, {5: 10, 10: 10})
    second.sync()
    assert second.entries[entry_id].marks == {5: 10, 10: 10}
    first.sync()
    store.evict(budget_bytes=10)
    second.sync()
    assert second.entries[entry_id].marks == {10: 10}
    store.evict(budget_bytes=0)
    second.sync()
    assert entry_id not in second.entries and second.candidates("p", "id", np.ones(4, np.float32) / 2, 3) == []


def test_two_processes_share_entries_through_redis(engine, redis_url, tmp_path):
    """Two separate processes: the second, started after the first exited, resumes from the first's state."""
    env = service_env(
        tmp_path / "data",
        broker_url=redis_url,
        model_dir=str(engine.settings.model_dir),
        cache_embedder="minilm",
        cache_url=str(tmp_path / "shared-states"),
    )

    def generate(prompt: str) -> dict:
        out = str(tmp_path / "out.png")
        args = [sys.executable, "-m", "fastgen", "generate", prompt, "--seed", "5", "--cache", "on", "--json"]
        args += ["-o", out]
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
        result = json.loads(out[out.index("{") :])
        (report,) = [a["details"] for a in result["accelerations"] if a["name"] == "cache"]
        return report

    assert generate(CAPTION)["hit"] is False
    report = generate(NEAR_DUPLICATE)
    assert report["hit"] is True and report["k"] == FASTGEN.skip(report["similarity"], 25)


def test_entries_stored_by_hits_are_found_by_their_prompt_and_never_crowd_out_the_nearest(tmp_path):
    from fastgen.cache.approximate import SharedIndex

    store = SqliteCacheStore(tmp_path / "cache.sqlite3")
    query = unit(1, 0, 0)
    source = store.new_id()
    store.add(Entry(source, "p", "a", 0, 25, unit(0.9, 0.44, 0), {5: 1}))  # a miss's entry, 0.9 alike
    derived = []
    for i, prompt_id in enumerate(["b", "c", "q"]):  # stored by hits, nearer to the query than the source
        derived.append(store.new_id())
        store.add(Entry(derived[-1], "p", prompt_id, i, 25, unit(0.99, 0.1, i), {12: 1}, lineage=[(unit(0, 1, 0), 5)]))
    index = SharedIndex(store, "flat", repeats_only=True)
    index.sync()
    found = {entry.id for entry, _ in index.candidates("p", "q", query, 1)}
    assert found == {source, derived[2]}  # the nearest by similarity, and the one stored for this very prompt
    every_hit = SharedIndex(store, "flat")
    every_hit.sync()
    assert [entry.id for entry, _ in every_hit.candidates("p", "q", query, 1)] == [derived[0]]


def test_hnsw_finds_what_flat_finds_and_forgets_removed_entries():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    flat, hnsw = VectorIndex(32, "flat"), VectorIndex(32, "hnsw")
    for i, v in enumerate(vectors):
        flat.add(i, v)
        hnsw.add(i, v)
    for q in vectors[:20] + 0.05:
        assert hnsw.search(q, 1)[0][0] == flat.search(q, 1)[0][0]
    for i in range(200):
        flat.remove(i)
        hnsw.remove(i)
    assert len(hnsw) == 300 and all(i >= 200 for i, _ in hnsw.search(vectors[0], 5))
    assert hnsw.search(vectors[300], 1)[0][0] == flat.search(vectors[300], 1)[0][0] == 300


def test_policy_tables():
    assert NIRVANA.marks(50) == (5, 10, 15, 20, 25)
    assert NIRVANA.marks(25) == (2, 5, 8, 10, 12)
    assert [NIRVANA.skip(s, 50) for s in (0.99, 0.93, 0.86, 0.8, 0.7, 0.6)] == [25, 20, 15, 10, 5, 0]
    assert NIRVANA.skip(0.95, 50) == 20  # thresholds are strict: "above 0.95"
    with pytest.raises(ValueError, match="thresholds"):
        CachePolicy("bad", thresholds=((0.5, 0.1), (0.9, 0.4)))


def unit(*components: float) -> np.ndarray:
    vector = np.asarray(components, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def test_an_entry_stored_by_a_hit_serves_repeats_of_its_prompt_or_prompts_close_to_every_ancestor():
    ancestor = unit(1, 0, 0)
    # Stored by a hit at K = 10 on the ancestor (similarity 0.95 allows 40% of 25 steps).
    derived = Entry(7, "p", "id", 1, 25, unit(0.95, 0.31, 0), {12: 1}, lineage=[(ancestor, 10)])
    assert inherits_fairly(FASTGEN, derived, unit(0.93, 0.37, 0), 25)  # 0.93 to the ancestor allows its 10 steps
    assert not inherits_fairly(FASTGEN, derived, unit(0.8, 0.6, 0), 25)  # 0.8 allows 5: the chain has drifted
    assert inherits_fairly(FASTGEN, replace(derived, lineage=[]), unit(0, 0, 1), 25)  # a miss's own entry
    near = unit(0.95, 0.31, 0.02)  # 0.9998 alike, but other text: not a repeat
    assert not may_start_from(FASTGEN, derived, "other prompt", near, 25)
    assert may_start_from(FASTGEN, derived, "id", derived.embedding, 25)  # a repeat of the derived entry's own prompt
    every_hit = replace(FASTGEN, repeats_only=False)  # then any prompt that inherits fairly
    assert may_start_from(every_hit, derived, "other prompt", unit(0.93, 0.37, 0), 25)
    assert not may_start_from(every_hit, derived, "other prompt", unit(0.8, 0.6, 0), 25)
    again = Entry.from_json(derived.to_json())
    assert again.lineage[0][1] == 10 and np.allclose(again.lineage[0][0], ancestor)
    old = json.loads(derived.to_json())
    del old["lineage"]  # entries written before lineage existed
    assert Entry.from_json(json.dumps(old)).lineage == []


def test_a_hit_stores_its_later_states_with_the_lineage_of_what_it_started_from(engine, tmp_path):
    # Marks at 5 and 12 of 25 steps; the near duplicate (similarity about 0.98) may skip 5, then stores step 12.
    cache = make_cache(tmp_path, policy=replace(FASTGEN, thresholds=((0.999, 0.5), (0.5, 0.2))))
    run = cached_engine(engine, cache)
    run.run({"prompt": CAPTION, **SHAPES})
    hit = cache_report(run.run({"prompt": NEAR_DUPLICATE, **SHAPES, "seed": 9}))
    assert hit["k"] == 5 and hit["stored_steps"] == [12], hit
    ((embedding, k),) = cache.store.entry(hit["stored_entry"]).lineage
    assert k == 5 and embedding.shape == (384,)


def test_a_repeat_of_a_hit_starts_from_its_own_stored_states_and_a_neighbour_does_not(engine, tmp_path):
    # Marks at 5 and 12 of 25: the near duplicate may skip 5 from the caption, then stores its own step 12.
    cache = make_cache(tmp_path, policy=replace(FASTGEN, thresholds=((0.999, 0.5), (0.5, 0.2))))
    run = cached_engine(engine, cache)
    run.run({"prompt": CAPTION, **SHAPES})
    stored = cache_report(run.run({"prompt": NEAR_DUPLICATE, **SHAPES, "seed": 9}))["stored_entry"]
    repeat = cache_report(run.run({"prompt": "  " + NEAR_DUPLICATE.replace(" ", "  "), **SHAPES, "seed": 10}))
    assert repeat["matched_entry"] == stored and repeat["k"] == 12, repeat
    # MiniLM lower-cases, so this reads as identical (similarity 1.0), but it is other text: not a repeat.
    neighbour = cache_report(run.run({"prompt": "A" + NEAR_DUPLICATE[1:], **SHAPES}))
    assert neighbour["similarity"] < 0.999 and neighbour["matched_entry"] != stored and neighbour["k"] == 5, neighbour


@pytest.mark.parametrize("model", ["fastgen-shapes", "tiny-pixart"])
def test_each_image_of_a_request_is_a_request_of_its_own_to_the_cache(engine, tmp_path, model):
    """Several images miss and store one entry each, as one-image requests with their seeds would; on a hit each
    resumes from the matched state reseeded to its own seed, as a one-image request with its seed would."""
    base = {"prompt": CAPTION, **SHAPES} if model == "fastgen-shapes" else small(model, steps=10, prompt=CAPTION)
    batched = cached_engine(engine, make_cache(tmp_path / "batched", embedder="pipeline"))
    miss = cache_report(batched.run({**base, "seed": 5, "num_images": 3}))
    assert miss["hit"] is False and len(miss["stored_entries"]) == 3
    stored = [batched.cache.store.entry(entry) for entry in miss["stored_entries"]]
    assert [entry.seed for entry in stored] == [5, 6, 7]
    solo = cached_engine(engine, make_cache(tmp_path / "solo", embedder="pipeline"))
    alone = solo.cache.store.entry(cache_report(solo.run({**base, "seed": 6}))["stored_entry"])
    k = max(alone.marks)
    state, state_alone = (run.cache.files.read(entry.id, k) for run, entry in ((batched, stored[1]), (solo, alone)))
    torch.testing.assert_close(state.latents, state_alone.latents, rtol=1e-4, atol=1e-4)

    hit = batched.run({**base, "seed": 20, "num_images": 2})
    report = cache_report(hit)
    assert report["hit"] and report["k"] > 0
    counters = batched.cache.store.counters()
    assert counters["misses"] == {model: 3} and counters["hits"] == {model: 2}
    for image, seed in zip(hit.images, (20, 21), strict=True):
        # Alone: a cache holding only the entry the batch matched.
        cache = make_cache(tmp_path / f"alone-{seed}", embedder="pipeline")
        only = cached_engine(engine, cache)
        matched = batched.cache.store.entry(report["matched_entry"])
        only.run({**base, "seed": matched.seed})
        alone_hit = only.run({**base, "seed": seed})
        assert cache_report(alone_hit)["k"] == report["k"]
        difference = np.abs(np.asarray(image).astype(int) - pixels(alone_hit)[0].astype(int))
        assert difference.max() <= 2, (seed, difference.max())


def test_reseeding_a_hit_lands_nearer_the_requests_own_image(engine, tmp_path):
    """Repeats with new seeds: the stored state with its starting noise swapped for each request's own."""
    from fastgen.quality import psnr

    seeds = (6, 7, 8, 9)
    exact = {seed: pixels(engine.run({"prompt": CAPTION, **SHAPES, "seed": seed})) for seed in seeds}
    fidelity = {}
    for policy in (NIRVANA, FASTGEN):
        run = cached_engine(engine, make_cache(tmp_path / policy.name, embedder="pipeline", policy=policy))
        run.run({"prompt": CAPTION, **SHAPES})  # stored from seed 5
        scores = []
        for seed in seeds:
            hit = run.run({"prompt": CAPTION, **SHAPES, "seed": seed})
            assert cache_report(hit)["k"] == 12
            scores.append(psnr(exact[seed], pixels(hit)))
        fidelity[policy.name] = float(np.mean(scores))
    assert fidelity["fastgen"] > fidelity["nirvana"] + 1.0, fidelity


@pytest.mark.parametrize("model", ["fastgen-shapes", "tiny-sd", "tiny-pixart", "tiny-wan"])
def test_noise_level_falls_through_the_schedule_and_reseed_is_identity_for_the_same_seed(engine, model):
    import torch

    from fastgen.cache import resume

    scheduler = engine.pool.get(engine.registry.resolve(model))[0].pipe.scheduler
    levels = [resume.noise_level(scheduler, 10, k) for k in range(10)]
    assert all(a > b for a, b in zip(levels[:-1], levels[1:], strict=True)) and levels[-1] > 0
    state = resume.State(4, 10, torch.randn(1, 4, 8, 8), {})
    assert resume.reseed(state, scheduler, 3, 3) is state
    moved = resume.reseed(state, scheduler, 3, 4).latents - state.latents
    expected = levels[4] * (
        resume.starting_noise(state.latents.shape, 4, torch.float32)
        - resume.starting_noise(state.latents.shape, 3, torch.float32)
    )
    torch.testing.assert_close(moved, expected)


def test_a_scheduler_that_cannot_resume_exactly_is_a_reported_miss(engine, tmp_path):
    from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    from fastgen.cache import resume

    assert "cannot resume exactly" in resume.resumable(EulerAncestralDiscreteScheduler())
    assert "stochastic" in resume.resumable(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"))
    pipe = engine.pool.get(engine.registry.resolve("tiny-sd"))[0].pipe
    original = pipe.scheduler
    pipe.__dict__["scheduler"] = EulerAncestralDiscreteScheduler.from_config(original.config)
    try:
        generation = cached_engine(engine, make_cache(tmp_path, embedder="pipeline")).run(small("tiny-sd"))
    finally:
        pipe.__dict__["scheduler"] = original
    report = cache_report(generation)
    assert report["hit"] is False and "EulerAncestralDiscreteScheduler cannot resume exactly" in report["reason"]


def test_threshold_table_from_the_environment(tmp_path):
    from fastgen.cache import open_cache
    from fastgen.settings import Settings

    settings = Settings.from_env({"FASTGEN_CACHE_THRESHOLDS": "0.97:0.6, 0.9:0.2", "FASTGEN_DATA_DIR": str(tmp_path)})
    assert settings.cache_threshold_table == ((0.97, 0.6), (0.9, 0.2))
    assert open_cache(settings).config.policy.skip(0.98, 50) == 30
    with pytest.raises(ValueError, match="FASTGEN_CACHE_THRESHOLDS must look like"):
        Settings.from_env({"FASTGEN_CACHE_THRESHOLDS": "high"})
    with pytest.raises(ValueError, match="FASTGEN_CACHE_DEFAULT must be true or false"):
        Settings.from_env({"FASTGEN_CACHE_DEFAULT": "maybe"})
    assert (
        Settings.from_env({"FASTGEN_CACHE_BYTES": "0"}).cache_bytes == 0
        and open_cache(Settings(cache_bytes=0)) is None
    )


def test_batched_requests_run_one_call_per_cache_start_step(engine, tmp_path):
    from fastgen.engine import Member

    run = cached_engine(engine, make_cache(tmp_path, embedder="pipeline"))
    run.run({"prompt": CAPTION, **SHAPES})  # stored: its repeats start at step 12
    requests = [
        {"prompt": CAPTION, **SHAPES, "seed": 8},
        {"prompt": "a green square", **SHAPES},
        {"prompt": CAPTION, **SHAPES, "seed": 9},
    ]
    members = [Member(run.resolve(request), result_id=str(i)) for i, request in enumerate(requests)]
    repeat, other, second_repeat = run.run_members(members)
    for hit in (repeat, second_repeat):
        assert cache_report(hit)["hit"] and cache_report(hit)["k"] == 12
        assert hit.result.batch.jobs == 2 and hit.result.batch.shared["cache_start_step"] == 12
    assert repeat.result.batch.others == ["2"] and second_repeat.result.batch.others == ["0"]
    assert cache_report(other).get("k") != 12 and other.result.batch is None  # another start: a call of its own
    solo = cached_engine(engine, make_cache(tmp_path / "solo", embedder="pipeline"))
    solo.run({"prompt": CAPTION, **SHAPES})
    alone = solo.run({"prompt": CAPTION, **SHAPES, "seed": 9})
    assert cache_report(alone)["k"] == 12
    assert np.abs(pixels(second_repeat).astype(int) - pixels(alone).astype(int)).max() <= 2
