"""Patch and CFG parallelism on 2 CPU processes over gloo (tests/parallel_ranks.py is what each rank runs)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import parallel_ranks
import pytest

from fastgen.engine import to_uint8
from fastgen.errors import InvalidRequest
from fastgen.parallel import layout
from fastgen.parallel.config import ParallelConfig
from fastgen.parallel.groups import ParallelGroups, run_ranks
from fastgen.parallel.layout import RankLayouts
from fastgen.quality import psnr
from fastgen.schema import GenerationRequest

SHAPES_CALL = {
    "prompt": [
        "a red circle at the top left on a blue background",
        "a white square at the center on a green background",
    ],
    "num_inference_steps": 12,
    "guidance_scale": 2.5,
    "height": 32,
    "width": 32,
}
TINY_SD_CALL = {"prompt": "a lighthouse at dusk", "num_inference_steps": 6, "height": 128, "width": 128}
MODES = {mode: {"patch": 2, "mode": mode, "warmup_steps": 2} for mode in ("sync", "displaced", "pcpp", "naive")}
# On fastgen-shapes (10 steps, 1 warm-up) displaced measured 38 dB, PCPP 29 dB and naive 14 dB against 1 rank.
APPROXIMATE_PSNR_DB = 24.0


def image_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return min(psnr(to_uint8(x), to_uint8(y)) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def shapes_runs():
    configs = MODES | {"cfg": {"cfg": 2}}
    return run_ranks(parallel_ranks.compare_modes, 2, "fastgen-shapes", SHAPES_CALL, configs)


@pytest.fixture(scope="module")
def tiny_sd_runs():
    configs = {"sync": MODES["sync"], "cfg": {"cfg": 2}, "uneven": MODES["sync"]}
    calls = {"uneven": {"height": 136}}
    return run_ranks(parallel_ranks.compare_modes, 2, "tiny-sd", TINY_SD_CALL, configs, calls)


@pytest.mark.parametrize("runs", ["shapes_runs", "tiny_sd_runs"])
def test_sync_patch_parallel_equals_single_device(runs, request):
    rank0 = request.getfixturevalue(runs)[0]
    np.testing.assert_allclose(rank0["runs"]["sync"]["images"], rank0["plain"], atol=2e-3)


@pytest.mark.parametrize("runs", ["shapes_runs", "tiny_sd_runs"])
def test_cfg_parallel_equals_single_device(runs, request):
    rank0 = request.getfixturevalue(runs)[0]
    np.testing.assert_allclose(rank0["runs"]["cfg"]["images"], rank0["plain"], atol=2e-3)


def test_displaced_and_pcpp_are_close_to_single_device_and_closer_than_naive(shapes_runs):
    rank0 = shapes_runs[0]
    fidelity = {mode: image_psnr(rank0["runs"][mode]["images"], rank0["plain"]) for mode in MODES}
    assert fidelity["displaced"] >= APPROXIMATE_PSNR_DB, fidelity
    assert fidelity["pcpp"] >= APPROXIMATE_PSNR_DB, fidelity
    assert fidelity["naive"] + 3 < min(fidelity["displaced"], fidelity["pcpp"]), fidelity


def test_pcpp_moves_fewer_bytes_than_displaced(shapes_runs):
    reports = {mode: shapes_runs[0]["runs"][mode]["report"] for mode in MODES}
    moved = {mode: report["bytes_received_per_call"] for mode, report in reports.items()}
    assert moved["pcpp"] < moved["displaced"] <= moved["sync"], moved
    assert moved["naive"] < moved["pcpp"], moved
    assert reports["sync"]["wrapped_layers"]["self_attention"] > 0


def test_every_rank_ends_with_the_same_image(shapes_runs):
    for name, run in shapes_runs[0]["runs"].items():
        np.testing.assert_array_equal(shapes_runs[1]["runs"][name]["images"], run["images"], err_msg=name)


@pytest.mark.parametrize("runs", ["shapes_runs", "tiny_sd_runs"])
def test_removing_the_handle_restores_the_plain_pipeline_bit_identically(runs, request):
    for rank in request.getfixturevalue(runs):
        np.testing.assert_array_equal(rank["after"], rank["plain"])


def test_a_height_that_does_not_split_is_refused_with_the_reason(tiny_sd_runs):
    message = tiny_sd_runs[0]["runs"]["uneven"]["error"]
    assert message.startswith("height:") and "17 rows" in message and "multiple of 4" in message


def test_world_size_one_is_the_plain_pipeline():
    (rank0,) = run_ranks(parallel_ranks.compare_modes, 1, "fastgen-shapes", SHAPES_CALL, {"alone": {}})
    np.testing.assert_array_equal(rank0["runs"]["alone"]["images"], rank0["plain"])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"patch": 0}, "patch: must be at least 1"),
        ({"cfg": 3}, "cfg: must be 1 or 2"),
        ({"mode": "ring"}, "mode: must be one of sync, displaced, pcpp, naive"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"pcpp_fraction": 0.0}, "pcpp_fraction"),
    ],
)
def test_bad_parallel_settings_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**fields)


def test_degrees_must_multiply_to_the_group_size():
    with pytest.raises(ValueError, match=r"cfg \(2\) x patch \(2\) = 4 ranks, but the group has 2"):
        ParallelConfig(patch=2, cfg=2).check_world(2)


def test_cfg_and_patch_compose_on_four_ranks():
    configs = {"both": {"cfg": 2, "patch": 2, "mode": "sync"}, "pcpp": {"cfg": 2, "patch": 2, "mode": "pcpp"}}
    ranks = run_ranks(parallel_ranks.compare_modes, 4, "fastgen-shapes", SHAPES_CALL, configs)
    np.testing.assert_allclose(ranks[0]["runs"]["both"]["images"], ranks[0]["plain"], atol=2e-3)
    assert image_psnr(ranks[0]["runs"]["pcpp"]["images"], ranks[0]["plain"]) >= APPROXIMATE_PSNR_DB
    for rank in ranks[1:]:
        np.testing.assert_array_equal(rank["runs"]["both"]["images"], ranks[0]["runs"]["both"]["images"])


PIXART_CALL = {"prompt": "a lighthouse", "num_inference_steps": 8, "height": 128, "width": 128, "guidance_scale": 4.5}
WAN_CALL = {
    "prompt": "a boat",
    "num_inference_steps": 6,
    "height": 32,
    "width": 32,
    "num_frames": 9,
    "guidance_scale": 5.0,
}
# Random-weight DiTs at 8 / 6 steps: displaced measured 88 / 84 dB against 1 rank, naive 54 / 33 dB.
DIT_DISPLACED_PSNR_DB = 40.0


@pytest.fixture(scope="module")
def dit_runs():
    """The image DiT (guidance batched: CFG can split) and the video DiT (guidance branches as separate calls)."""
    dit_modes = {mode: MODES[mode] for mode in ("sync", "displaced", "naive")}
    return {
        "tiny-pixart": run_ranks(
            parallel_ranks.compare_modes, 2, "tiny-pixart", PIXART_CALL, dit_modes | {"cfg": {"cfg": 2}}
        ),
        "tiny-wan": run_ranks(parallel_ranks.compare_modes, 2, "tiny-wan", WAN_CALL, dit_modes),
    }


@pytest.mark.parametrize("model", ["tiny-pixart", "tiny-wan"])
def test_dit_sequence_parallel_sync_is_ulysses_and_equals_single_device(dit_runs, model):
    rank0 = dit_runs[model][0]
    np.testing.assert_allclose(rank0["runs"]["sync"]["images"], rank0["plain"], atol=2e-3)
    assert rank0["runs"]["sync"]["report"]["ulysses"] is True
    if model == "tiny-pixart":
        np.testing.assert_allclose(rank0["runs"]["cfg"]["images"], rank0["plain"], atol=2e-3)


@pytest.mark.parametrize("model", ["tiny-pixart", "tiny-wan"])
def test_dit_displaced_token_chunks_are_close_and_closer_than_naive(dit_runs, model):
    rank0 = dit_runs[model][0]
    fidelity = {mode: image_psnr(rank0["runs"][mode]["images"], rank0["plain"]) for mode in ("displaced", "naive")}
    assert fidelity["displaced"] >= DIT_DISPLACED_PSNR_DB and fidelity["naive"] + 3 < fidelity["displaced"], fidelity
    assert set(rank0["runs"]["displaced"]["report"]["bytes_received_per_call_by_phase"]) == {"synchronous", "stale"}


@pytest.mark.parametrize("model", ["tiny-pixart", "tiny-wan"])
def test_dit_ranks_agree_and_removal_restores_the_plain_pipeline(dit_runs, model):
    ranks = dit_runs[model]
    for rank in ranks:
        np.testing.assert_array_equal(rank["after"], rank["plain"])
    for name, run in ranks[0]["runs"].items():
        np.testing.assert_array_equal(ranks[1]["runs"][name]["images"], run["images"], err_msg=name)


def layouts(world_size: int) -> RankLayouts:
    """A rank's layouts without process groups: enough to test the choice."""
    degrees = [(world_size // cfg, cfg) for cfg in (1, 2) if world_size % cfg == 0]
    return RankLayouts(
        world_size, {(p, c): ParallelGroups(ParallelConfig(patch=p, cfg=c), 0, None, None) for p, c in degrees}
    )


def wanted(height: int = 256, guidance: float = 5.0, sparse: bool = False, **options) -> layout.ParallelRequest:
    accelerate = {"parallel": options} | ({"sparse_attention": {"mode": "window"}} if sparse else {})
    request = GenerationRequest(prompt="x", height=height, guidance=guidance, accelerate=accelerate)
    return layout.from_request(request, default_mode="displaced")


# tiny-sd's shape: an 8x VAE and a UNet that halves once, so two strips need heights in multiples of 32 pixels.
PIPE = SimpleNamespace(vae_scale_factor=8, unet=SimpleNamespace(num_upsamplers=1))


@pytest.mark.parametrize(
    ("world_size", "options", "guidance", "degrees", "mode"),
    [
        (2, {}, 5.0, (1, 2), "displaced"),  # guidance on: the exact CFG split first
        (2, {"cfg": False}, 5.0, (2, 1), "displaced"),
        (2, {"cfg": False, "mode": "pcpp"}, 5.0, (2, 1), "pcpp"),
        (2, {}, 1.0, (2, 1), "displaced"),  # guidance off: one branch, so patches only
        (4, {}, 5.0, (2, 2), "displaced"),
        (3, {}, 5.0, (3, 1), "displaced"),  # odd: no CFG split
    ],
)
def test_a_multi_device_worker_chooses_the_layout(world_size, options, guidance, degrees, mode):
    groups, reason = layouts(world_size).choose(wanted(guidance=guidance, height=384, **options), PIPE)
    assert (groups.config.patch, groups.config.cfg) == degrees and groups.config.mode == mode and reason == ""


def test_a_height_that_does_not_split_runs_whole_unless_parallelism_was_asked_for():
    groups, reason = layouts(2).choose(wanted(height=72, guidance=1.0), PIPE)
    assert groups is None and "9 latent rows" in reason and "multiple of 32 pixels" in reason
    with pytest.raises(InvalidRequest, match="height: the height's 9 latent rows"):
        layouts(2).choose(wanted(height=72, guidance=1.0, mode="sync"), PIPE)
    handle = layouts(2).apply(PIPE, wanted(height=72, guidance=1.0))
    assert handle.report()["replicated"] and handle.report()["reason"] == reason


def test_sparse_attention_keeps_a_dit_request_whole_rather_than_split_by_tokens():
    dit = SimpleNamespace(vae_scale_factor=8)  # no UNet: a token split
    groups, reason = layouts(2).choose(wanted(guidance=1.0, sparse=True), dit)
    assert groups is None and "sparse attention needs every token" in reason
    with pytest.raises(InvalidRequest, match=r"accelerate\.parallel: sparse attention needs every token"):
        layouts(2).choose(wanted(guidance=1.0, sparse=True, mode="sync"), dit)
    groups, reason = layouts(2).choose(wanted(guidance=5.0, sparse=True), dit)  # a CFG split keeps tokens whole
    assert (groups.config.patch, groups.config.cfg) == (1, 2) and reason == ""


def test_asking_for_cfg_parallelism_without_guidance_names_the_field():
    with pytest.raises(InvalidRequest, match=r"accelerate\.parallel\.cfg: needs guidance above 1"):
        layouts(2).choose(wanted(guidance=1.0, cfg=True), PIPE)
    with pytest.raises(InvalidRequest, match="an even number of devices"):
        layouts(3).choose(wanted(cfg=True), PIPE)
