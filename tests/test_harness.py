"""The trained fastgen-shapes model draws what it is asked, and the quality harness measures it."""

from __future__ import annotations

import pytest

from fastgen.harness import SHAPES_MODEL, compare, engine_generate, heldout_captions
from fastgen.shapes.score import adherence

SAMPLE = 16  # held-out captions per test: enough to tell drawing from noise, fast on 2 cores


@pytest.fixture(scope="module")
def captions():
    return heldout_captions(SAMPLE)


def test_shapes_model_loads_from_the_package_and_draws_32px(engine):
    generation = engine.run({"prompt": "a red circle at the center on a blue background", "seed": 1})
    assert generation.result.model == SHAPES_MODEL  # the default model
    assert generation.images[0].size == (32, 32)


def test_shapes_model_follows_held_out_captions(engine, captions):
    images = [
        engine.run({"prompt": text, "model": SHAPES_MODEL, "seed": i}).images[0] for i, text in enumerate(captions)
    ]
    score = adherence(images, captions)
    # The full held-out set measures about 0.9 (README); a random-weight model scores near 0.
    assert score["all"] >= 0.6, score
    assert score["background"] >= 0.8, score


def test_harness_sees_no_difference_between_exact_and_itself(engine, captions):
    exact = engine_generate(engine)
    report = compare(exact, exact, captions[:4])
    assert report["identical_images"] == 4 and report["psnr_db_min"] == "inf" and report["ssim_min"] == 1.0
    assert report["adherence_change"] == 0.0


def test_harness_reports_speed_fidelity_and_adherence_for_an_acceleration(engine, captions):
    report = compare(engine_generate(engine), engine_generate(engine, {"fuse_qkv": True}), captions[:4])
    assert report["images"] == 4 and report["speedup"] > 0
    assert set(report["adherence_exact"]) >= {"all", "background", "color", "position", "shape"}
    assert -1.0 <= report["adherence_change"] <= 1.0
