"""LoRA library and hot-swapped adapters: per-request LoRAs with no reload, and no trace once a request is done."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastgen.engine import Engine
from fastgen.errors import InvalidRequest
from fastgen.lora.library import SHIPPED_DIR, LoraLibrary
from fastgen.lora.synthetic import random_lora, write_lora
from fastgen.schema import GenerationRequest, parse_request
from fastgen.settings import Limits

CAPTION = "a red circle at the top left on a blue background"
SHAPES = {"prompt": CAPTION, "model": "fastgen-shapes", "steps": 6, "seed": 3}


def pixels(generation) -> np.ndarray:
    return np.stack([np.asarray(image) for image in generation.images]).astype(np.float64)


def lora_report(generation) -> dict:
    (report,) = [a.details for a in generation.result.accelerations if a.name == "loras"]
    return report


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, engine):
    """Adapters for fastgen-shapes (diffusers and Kohya files of the same weights, other ranks and targets), one made
    for tiny-sd, one with text-encoder layers, one corrupt."""
    folder = tmp_path_factory.mktemp("loras")
    shapes_unet = engine.pool.get(engine.registry.resolve("fastgen-shapes"))[0].pipe.unet
    sd_unet = engine.pool.get(engine.registry.resolve("tiny-sd"))[0].pipe.unet
    write_lora(folder / "style.safetensors", random_lora(shapes_unet, 8, seed=1), base="fastgen-shapes")
    write_lora(folder / "style-kohya.safetensors", random_lora(shapes_unet, 8, seed=1, kohya=True))
    for i in range(3):
        other = random_lora(shapes_unet, 4, seed=10 + i, targets=("to_q", "to_v"))
        write_lora(folder / f"other{i}.safetensors", other)
    write_lora(folder / "wide.safetensors", random_lora(shapes_unet, 16, seed=20, targets=("to_q", "ff.net.2")))
    half_alpha = random_lora(shapes_unet, 6, seed=21, kohya=True, alpha=3.0, strength=2.0)  # alpha / rank = 0.5
    write_lora(folder / "half-alpha.safetensors", half_alpha)
    write_lora(folder / "for-tiny-sd.safetensors", random_lora(sd_unet, 4, seed=30))
    with_text = random_lora(shapes_unet, 4, seed=40) | {"text_encoder.x.lora_A.weight": torch.zeros(4, 8)}
    write_lora(folder / "with-text.safetensors", with_text)
    (folder / "corrupt.safetensors").write_bytes((folder / "style.safetensors").read_bytes()[:5000])
    (folder / "not a name.safetensors").write_bytes(b"")  # a request could never name it
    return folder


@pytest.fixture(scope="module")
def lora_engine(settings, lora_dir):
    """An engine with its own pipelines (LoRA layers stay out of the session's shared pool) and slots for 3."""
    return Engine(dataclasses.replace(settings, lora_slots=4), loras=LoraLibrary(lora_dir))


def test_the_library_describes_each_file_from_its_header(lora_dir):
    library = LoraLibrary(lora_dir, shipped=None)
    listing = {entry["name"]: entry for entry in library.listing()}
    assert set(listing) == {
        "style", "style-kohya", "other0", "other1", "other2", "wide", "half-alpha", "for-tiny-sd", "with-text",
        "corrupt",
    }  # fmt: skip
    style, kohya = listing["style"], listing["style-kohya"]
    assert (style["format"], kohya["format"]) == ("peft", "kohya")
    assert style["rank"] == kohya["rank"] == 8 and style["layers"] == kohya["layers"] > 0
    assert "attn1.to_q" in style["targets"] and style["base"] == "fastgen-shapes"
    assert kohya["base"] == "cross-attention 64"  # inferred from the cross-attention width
    assert listing["wide"]["rank"] == 16 and "ff.net.2" in listing["wide"]["targets"]
    assert style["size_bytes"] == (lora_dir / "style.safetensors").stat().st_size and len(style["sha256"]) == 64
    assert listing["with-text"]["text_encoder_layers"] == 1
    assert "error" in listing["corrupt"] and "path" not in style and style["shipped"] is False


def test_an_unknown_name_is_rejected_with_what_the_library_has(lora_dir):
    with pytest.raises(InvalidRequest, match="loras.name: unknown LoRA 'nope'; the library has: corrupt, for-tiny-sd"):
        LoraLibrary(lora_dir, shipped=None).get("nope")


@pytest.mark.parametrize("name", ["../style", "style/../style", "/etc/passwd", "..", "a\\b"])
def test_path_like_names_never_reach_the_library(lora_dir, name):
    with pytest.raises(InvalidRequest, match="loras.0.name: must be 1-128 letters, digits"):
        parse_request({"prompt": "x", "loras": [{"name": name}]}, Limits())
    with pytest.raises(InvalidRequest, match="unknown LoRA"):
        LoraLibrary(lora_dir).get(name)


def test_a_request_without_loras_after_one_with_them_gets_the_base_models_pixels(lora_engine):
    base = pixels(lora_engine.run(SHAPES))
    with_lora = lora_engine.run({**SHAPES, "loras": [{"name": "style"}, {"name": "other0", "scale": 0.5}]})
    assert np.abs(pixels(with_lora) - base).mean() > 1.0
    assert np.array_equal(pixels(lora_engine.run(SHAPES)), base)


def test_requests_with_different_loras_share_one_call_and_each_gets_its_own(lora_engine):
    """Punica's segmented LoRA: each row of the batch gets its own request's adapters (none, one, two, scaled)."""
    from fastgen.engine import Member

    base = pixels(lora_engine.run(SHAPES))
    requests = [
        {**SHAPES, "loras": [{"name": "style"}]},
        {**SHAPES, "seed": 4, "loras": [{"name": "other0", "scale": 0.5}], "num_images": 2},
        {**SHAPES, "seed": 5},
        {
            **SHAPES,
            "loras": [{"name": "wide", "scale": 0.7}, {"name": "style"}],
        },  # rank 16 with rank 8, two layers sets
    ]
    batched = lora_engine.run_members(
        [Member(lora_engine.resolve(r), result_id=str(i)) for i, r in enumerate(requests)]
    )
    for request, generation in zip(requests, batched, strict=True):
        alone = lora_engine.run(request)
        assert np.abs(pixels(generation) - pixels(alone)).max() <= 2, request
        assert generation.result.batch.jobs == 4
        reports = [a for a in generation.result.accelerations if a.name == "loras"]
        if request.get("loras"):
            (report,) = reports
            assert report.details["segmented"] and [a["name"] for a in report.details["adapters"]] == [
                lora["name"] for lora in request["loras"]
            ]
        else:
            assert reports == []  # no other request's adapters are named in its result
    assert np.abs(pixels(batched[0]) - base).mean() > 1.0  # the adapter drew on its rows (the others: alone's)
    assert np.array_equal(pixels(lora_engine.run(SHAPES)), base)  # and nothing of it stays


def test_scale_changes_the_output_monotonically(lora_engine):
    base = pixels(lora_engine.run(SHAPES))
    distances = [
        np.abs(pixels(lora_engine.run({**SHAPES, "loras": [{"name": "style", "scale": s}]})) - base).mean()
        for s in (0.25, 0.5, 1.0, 2.0)
    ]
    assert distances == sorted(distances) and distances[0] > 0, distances


def test_kohya_and_diffusers_files_of_one_adapter_give_the_same_image(lora_engine):
    peft = pixels(lora_engine.run({**SHAPES, "loras": [{"name": "style"}]}))
    kohya = pixels(lora_engine.run({**SHAPES, "loras": [{"name": "style-kohya"}]}))
    assert np.array_equal(peft, kohya)


@pytest.mark.parametrize(
    "loras",
    [
        [{"name": "wide", "scale": 0.7}, {"name": "other1"}],  # rank 16 and rank 4 (padded) together
        [{"name": "half-alpha"}],  # Kohya, alpha half its rank (6: not the slots' rank either)
        [{"name": "half-alpha", "scale": 0.5}, {"name": "style"}],
    ],
)
def test_a_hot_swapped_adapter_equals_a_fresh_load(lora_engine, lora_dir, loras):
    from diffusers import StableDiffusionPipeline

    for name in ("other1", "wide", "other2", "style", "other0"):  # cycle more adapters than there are free slots
        lora_engine.run({**SHAPES, "loras": [{"name": name, "scale": 0.7}]})
    swapped = lora_engine.run({**SHAPES, "loras": loras})
    source = lora_engine.registry.source(lora_engine.registry.resolve(SHAPES["model"]))
    pipe = StableDiffusionPipeline.from_pretrained(source)
    pipe.set_progress_bar_config(disable=True)
    for lora in loras:
        pipe.load_lora_weights(str(lora_dir / f"{lora['name']}.safetensors"), adapter_name=lora["name"])
    pipe.set_adapters([lora["name"] for lora in loras], [lora.get("scale", 1.0) for lora in loras])
    fresh = pipe(
        SHAPES["prompt"],
        num_inference_steps=SHAPES["steps"],
        guidance_scale=2.5,
        width=32,
        height=32,
        generator=torch.Generator("cpu").manual_seed(SHAPES["seed"]),
    ).images
    assert np.array_equal(pixels(swapped), np.stack([np.asarray(i) for i in fresh]).astype(np.float64))


def test_resident_adapters_are_reused_and_the_least_recently_used_is_replaced(lora_engine):
    slots = lora_engine.pool.get(lora_engine.registry.resolve(SHAPES["model"]))[0].adapters
    lora_engine.run({**SHAPES, "loras": [{"name": "style"}]})
    again = lora_report(lora_engine.run({**SHAPES, "loras": [{"name": "style"}]}))
    assert again["adapters"][0]["resident"] is True and "swap_s" not in again["adapters"][0]
    for name in ("other0", "other1", "other2", "wide"):  # four slots: style is now the least recently used
        lora_engine.run({**SHAPES, "loras": [{"name": name}]})
    assert ("style", slots.library.get("style").sha256) not in slots.holding.values()
    assert lora_report(lora_engine.run({**SHAPES, "loras": [{"name": "style"}]}))["adapters"][0]["resident"] is False


@pytest.mark.parametrize("host_bytes", [4 * 2**30, 0])
def test_an_adapter_swapped_in_again_is_copied_from_host_memory_and_draws_what_its_first_swap_drew(
    settings, lora_dir, host_bytes
):
    """One slot, two adapters in turn: every swap after an adapter's first is a copy of what diffusers' swap left
    (none without host memory), and draws the same pixels."""
    one_slot = dataclasses.replace(settings, lora_slots=1, limits=dataclasses.replace(settings.limits, max_loras=1))
    engine = Engine(one_slot, loras=LoraLibrary(lora_dir, host_bytes=host_bytes))
    drawn, how = {}, []
    for name in ("half-alpha", "style", "half-alpha", "style"):
        generation = engine.run({**SHAPES, "loras": [{"name": name}]})
        (adapter,) = lora_report(generation)["adapters"]
        how.append(adapter["swap"])
        assert np.array_equal(drawn.setdefault(name, pixels(generation)), pixels(generation))
    assert how == ["diffusers"] * 2 + ["copy" if host_bytes else "diffusers"] * 2


def test_a_compiled_denoiser_takes_any_adapters_and_scales_without_recompiling(settings, lora_dir):
    """After one request per adapter count, new adapters, scales, orders and no adapters add no graph, and each
    image matches the uncompiled run of the same request."""
    from torch._dynamo.utils import counters

    engine = Engine(dataclasses.replace(settings, lora_slots=4), loras=LoraLibrary(lora_dir))
    requests = [[], [{"name": "style"}], [{"name": "half-alpha"}], [{"name": "style", "scale": 0.4}]]
    requests += [[{"name": "other0"}, {"name": "wide", "scale": 0.7}], [{"name": "wide"}, {"name": "other0"}], []]
    eager = [pixels(engine.run({**SHAPES, "loras": loras})) for loras in requests]
    engine.pool.get(engine.registry.resolve(SHAPES["model"]))[0].pipe.unet.compile()
    for loras in ([], [{"name": "other1"}], [{"name": "other1"}, {"name": "other2"}]):  # one graph per count
        engine.run({**SHAPES, "loras": loras})
    graphs = counters["stats"]["unique_graphs"]
    for loras, reference in zip(requests, eager, strict=True):
        compiled = pixels(engine.run({**SHAPES, "loras": loras}))
        assert np.abs(compiled - reference).max() <= 2, loras  # compiled kernels round differently, by a level at most
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_compiled_denoiser_mixes_adapters_in_one_call_with_one_graph_per_bucket(settings, lora_dir):
    """Members with different adapters on a compiled UNet: after one batch per (batch size, adapters per request)
    bucket, other adapters, scales and mixes add no graph; each image is its request's alone; detached, the plain
    compiled path draws the base image again. Dynamo's eager backend: what is traced, and when, is dynamo's and the
    same with inductor (whose kernels took 70-125 s per bucket on these cores: benchmarked, not tested)."""
    from torch._dynamo.utils import counters

    from fastgen.engine import Member

    engine = Engine(dataclasses.replace(settings, lora_slots=4), loras=LoraLibrary(lora_dir))

    def batch(*loras):
        requests = [{**SHAPES, "seed": 3 + i, "loras": chosen} for i, chosen in enumerate(loras)]
        members = [Member(engine.resolve(request)) for request in requests]
        return requests, engine.run_members(members)

    mixes = [
        ([{"name": "style"}], []),
        ([{"name": "other0", "scale": 0.5}], [{"name": "wide"}]),
        ([], [{"name": "half-alpha", "scale": 0.7}]),
        ([{"name": "style"}, {"name": "other1"}], [{"name": "wide", "scale": 0.3}]),
        ([{"name": "other2"}, {"name": "wide"}], [{"name": "style"}, {"name": "other0"}]),
    ]
    alone = {}
    for mix in mixes:
        for i, loras in enumerate(mix):
            request = {**SHAPES, "seed": 3 + i, "loras": loras}
            alone[repr(request)] = pixels(engine.run(request))
    base = pixels(engine.run(SHAPES))
    engine.pool.get(engine.registry.resolve(SHAPES["model"]))[0].pipe.unet.compile(backend="eager")
    engine.run(SHAPES)
    batch([{"name": "other1"}], [])  # the buckets: two requests, one adapter each at most, then two
    batch([{"name": "other1"}, {"name": "other2"}], [])
    graphs = counters["stats"]["unique_graphs"]
    for mix in mixes:
        requests, generations = batch(*mix)
        for request, generation in zip(requests, generations, strict=True):
            assert np.abs(pixels(generation) - alone[repr(request)]).max() <= 2, request  # compiled rounding
            assert generation.result.batch.jobs == 2
    assert counters["stats"]["unique_graphs"] == graphs
    assert np.abs(pixels(engine.run(SHAPES)) - base).max() <= 2


def test_removing_every_adapter_layer_restores_the_plain_pipeline(lora_engine):
    base = pixels(lora_engine.run(SHAPES))
    loaded = lora_engine.pool.get(lora_engine.registry.resolve(SHAPES["model"]))[0]
    lora_engine.run({**SHAPES, "loras": [{"name": "wide"}]})
    loaded.adapters.unload()
    assert not any("lora" in name for name, _ in loaded.pipe.unet.named_modules())
    assert np.array_equal(pixels(lora_engine.run(SHAPES)), base)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("corrupt", "loras\\[0\\].name: LoRA 'corrupt' is unusable: unreadable safetensors file"),
        ("for-tiny-sd", "loras\\[0\\].name: LoRA 'for-tiny-sd' .* does not fit this model: layer .*: shapes"),
        ("with-text", "loras\\[0\\].name: LoRA 'with-text' adapts the text encoder"),
    ],
)
def test_a_corrupt_or_incompatible_file_fails_only_its_request(lora_engine, name, message):
    base = pixels(lora_engine.run(SHAPES))
    with pytest.raises(InvalidRequest, match=message):
        lora_engine.run({**SHAPES, "loras": [{"name": name}]})
    assert np.array_equal(pixels(lora_engine.run(SHAPES)), base)
    assert lora_report(lora_engine.run({**SHAPES, "loras": [{"name": "style"}]}))["adapters"][0]["name"] == "style"


def test_models_without_lora_support_and_fused_projections_are_refused_at_the_door(lora_engine):
    with pytest.raises(InvalidRequest, match="loras: model 'tiny-pixart' .* does not take LoRA adapters"):
        lora_engine.prepare({"prompt": "x", "model": "tiny-pixart", "loras": [{"name": "style"}]})
    with pytest.raises(InvalidRequest, match="accelerate.fuse_qkv: cannot be combined with loras"):
        lora_engine.prepare({**SHAPES, "loras": [{"name": "style"}], "accelerate": {"fuse_qkv": True}})
    with pytest.raises(InvalidRequest, match="loras: lists the same adapter twice"):
        lora_engine.prepare({**SHAPES, "loras": [{"name": "style"}, {"name": "style", "scale": 0.5}]})


def test_an_adapter_loaded_in_the_background_is_applied_by_step_k(settings, lora_dir):
    engine = Engine(dataclasses.replace(settings, lora_apply_by_step=3), loras=LoraLibrary(lora_dir))
    waited = engine.run({**SHAPES, "loras": [{"name": "style"}]})  # the first use builds the slots
    (item,) = lora_report(waited)["adapters"]
    assert 1 <= item["applied_at_step"] <= 3 and item["resident"] is False
    resident = lora_report(engine.run({**SHAPES, "loras": [{"name": "style"}]}))["adapters"][0]
    assert resident["resident"] is True and "applied_at_step" not in resident  # resident: on from the first step
    sync = Engine(settings, loras=LoraLibrary(lora_dir)).run({**SHAPES, "loras": [{"name": "style"}]})
    assert np.array_equal(pixels(engine.run({**SHAPES, "loras": [{"name": "style"}]})), pixels(sync))


def test_the_cache_tells_a_changed_file_from_the_one_it_replaced(settings, lora_dir, tmp_path, engine):
    from fastgen.cache.approximate import compatibility_key

    pipe = engine.pool.get(engine.registry.resolve("fastgen-shapes"))[0].pipe
    request = GenerationRequest(**SHAPES, loras=[{"name": "style"}])
    before = compatibility_key("fastgen-shapes", pipe, request, (("style", "a" * 64, 1.0),))
    after = compatibility_key("fastgen-shapes", pipe, request, (("style", "b" * 64, 1.0),))
    assert json.dumps(before) != json.dumps(after)


SHIPPED = {"complement", "large", "reverse"}
SHIPPED_SEED = 0  # the fixed seed and caption where the plain model draws no style and each adapter draws its own


def test_a_fresh_library_with_an_empty_directory_lists_the_shipped_adapters(tmp_path):
    from fastgen.settings import Settings

    settings = Settings(data_dir=tmp_path)
    assert not settings.lora_dir.exists()
    listing = {entry["name"]: entry for entry in LoraLibrary(settings.lora_dir).listing()}
    assert set(listing) == SHIPPED
    for name, entry in listing.items():
        assert entry["shipped"] is True and entry["base"] == "fastgen-shapes" and entry["text_encoder_layers"] == 0
        assert entry["format"] == "peft" and entry["size_bytes"] < 2 * 2**20, entry
        assert (SHIPPED_DIR / f"{name}.md").is_file() and (SHIPPED_DIR / f"{name}.training.json").is_file()
    assert LoraLibrary(settings.lora_dir, shipped=None).listing() == []


def test_an_operator_file_named_like_a_shipped_adapter_wins(tmp_path, engine):
    unet = engine.pool.get(engine.registry.resolve("fastgen-shapes"))[0].pipe.unet
    own = write_lora(tmp_path / "complement.safetensors", random_lora(unet, 4, seed=50))
    library = LoraLibrary(tmp_path)
    entry = {e["name"]: e for e in library.listing()}["complement"]
    assert entry["shipped"] is False and entry["rank"] == 4 and library.get("complement").path == own
    own.unlink()  # the shipped one comes back at the next lookup
    assert library.get("complement").path == SHIPPED_DIR / "complement.safetensors"
    assert {e["name"]: e for e in library.listing()}["complement"]["shipped"] is True


@pytest.fixture(scope="module")
def shipped_engine(tmp_path_factory):
    """An engine as ``fastgen serve`` starts it: an empty library directory, so only the shipped adapters."""
    from fastgen.settings import Settings

    return Engine(Settings(data_dir=tmp_path_factory.mktemp("shipped"), device="cpu"))


@pytest.mark.parametrize("style", sorted(SHIPPED))
def test_a_shipped_adapter_draws_its_style_where_the_plain_model_does_not(shipped_engine, style):
    from fastgen.shapes.score import score, style_check, styled_caption

    request = {"prompt": CAPTION, "model": "fastgen-shapes", "seed": SHIPPED_SEED}  # the model's 25 steps, 2.5
    plain = shipped_engine.run(request).images[0]
    styled = shipped_engine.run({**request, "loras": [{"name": style}]}).images[0]
    assert not style_check(plain, CAPTION, style) and score(plain, CAPTION).all
    assert style_check(styled, CAPTION, style) and score(styled, styled_caption(CAPTION, style)).all


@pytest.fixture(scope="module")
def lora_service(redis_url, tmp_path_factory, lora_dir):
    """An API and one fastgen-shapes worker with two pool processes, on Redis, serving the LoRA library."""
    from services import Api, Process, service_env

    data_dir = tmp_path_factory.mktemp("lora-service")
    env = service_env(data_dir, broker_url=redis_url, lora_dir=str(lora_dir), models="fastgen-shapes")
    worker = Process(["worker", "--models", "fastgen-shapes", "--concurrency", "2"], env, data_dir / "worker.log")
    api = Api(env, data_dir / "api.log")
    yield api
    api.stop()
    worker.stop()


def service_pixels(client, job_id: str) -> np.ndarray:
    status = client.wait(job_id, timeout_s=180, poll_s=0.05)
    assert status["status"] == "succeeded", status
    return np.asarray(Image.open(io.BytesIO(client.result_bytes(job_id)[0]))).astype(np.float64)


@pytest.mark.timeout(300)
def test_the_service_lists_the_library_and_refuses_unknown_names_at_the_door(lora_service):
    from fastgen.client import ServiceError

    with lora_service.client() as client:
        names = {entry["name"] for entry in client.loras()}
        assert {"style", "other0", "corrupt"} | SHIPPED <= names
        unknown = "the library has: complement, corrupt, for-tiny-sd"  # the shipped adapters with the directory's
        for name, words in (("nope", unknown), ("../style", "letters, digits")):
            with pytest.raises(ServiceError) as error:
                client.submit({**SHAPES, "loras": [{"name": name}]})
            assert error.value.status_code == 422 and words in str(error.value.detail), error.value.detail


@pytest.mark.timeout(300)
def test_concurrent_jobs_with_different_loras_on_one_worker_each_get_their_own(lora_service, lora_engine):
    asked = [[{"name": "style"}], [{"name": "other0", "scale": 2.0}], [], [{"name": "wide"}, {"name": "other1"}]]
    with lora_service.client() as client:
        jobs = [client.submit({**SHAPES, "loras": loras}) for loras in asked]  # two run at a time
        for job, loras in zip(jobs, asked, strict=True):
            expected = pixels(lora_engine.run({**SHAPES, "loras": loras}))[0]
            assert np.abs(service_pixels(client, job["id"]) - expected).max() <= 2, loras


@pytest.mark.timeout(300)
def test_an_incompatible_file_fails_its_job_and_the_worker_keeps_serving(lora_service):
    with lora_service.client() as client:
        failed = client.wait(client.submit({**SHAPES, "loras": [{"name": "for-tiny-sd"}]})["id"], timeout_s=180)
        assert failed["status"] == "failed" and "LoRA 'for-tiny-sd'" in failed["error"], failed
        assert "does not fit this model" in failed["error"]
        service_pixels(client, client.submit({**SHAPES, "loras": [{"name": "style"}]})["id"])


@pytest.mark.parametrize("conv", [False, True])
def test_row_updates_give_each_row_the_sum_of_its_own_adapters(conv):
    """The gathered batched matmuls against the per-row, per-adapter definition (guidance's repeated rows too)."""
    import torch.nn.functional as F

    from fastgen.lora.segmented import RowUpdates

    generator = torch.Generator().manual_seed(0)
    slots, rank, inputs, outputs = 3, 4, 6, 5
    a_shape = (slots, rank, inputs, 3, 3) if conv else (slots, rank, inputs)
    a, b = torch.randn(a_shape, generator=generator), torch.randn(slots, outputs, rank, generator=generator)
    index = torch.tensor([[0, 2], [1, 0], [2, 0]])
    scale = torch.tensor([[0.5, 1.5], [1.0, 0.0], [2.0, 0.0]])
    updates = RowUpdates(a, b, index, scale, {"stride": 1, "padding": 1, "dilation": 1} if conv else None)
    x = torch.randn((6, inputs, 4, 4) if conv else (6, 7, inputs), generator=generator)  # 2 rows per sample
    expected = []
    for r in range(6):
        total = 0
        for k in range(2):
            slot, s = int(index[r % 3, k]), float(scale[r % 3, k])
            if conv:
                hidden = F.conv2d(x[r : r + 1], a[slot], padding=1)
                total = total + s * torch.einsum("bqhw,oq->bohw", hidden, b[slot])[0]
            else:
                total = total + s * (x[r] @ a[slot].T @ b[slot].T)
        expected.append(total)
    torch.testing.assert_close(updates.delta(x), torch.stack(expected), rtol=1e-4, atol=1e-4)
    if not conv:  # rows without a token axis (a time embedding's Linear)
        torch.testing.assert_close(updates.delta(x[:, 0]), torch.stack(expected)[:, 0], rtol=1e-4, atol=1e-4)
