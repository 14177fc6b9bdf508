"""The quality-aware approximate cache: calibrated tables, the check at resume time, its verdicts and its removal."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import small
from test_cache import CAPTION, NEAR_DUPLICATE, SHAPES, cache_report, cached_engine, make_cache, pixels

from fastgen.cache.calibrate import FRACTIONS, KINDS, Measured, Pair, fit
from fastgen.cache.check import Calibration, Rung, distance, file_name, granted, load_calibrations
from fastgen.cache.policy import FASTGEN, QUALITY
from fastgen.cli import main
from fastgen.engine import DEFAULT_TENANT

MOVED = "a red circle at the bottom right on a blue background"  # one content word (the position) away from CAPTION
STEPS = 25


def calibration(rungs, model="fastgen-shapes", embedder="minilm") -> Calibration:
    return Calibration(model, embedder, tuple(rungs), 0.97, {"psnr_db": 20.0}, 0.08)


# Skips 2 of 25 steps without a check from 0.5 alike; 5 or 12 from 0.9 alike if the model's predictions agree.
CHECKED = calibration([Rung(0.08, 0.5, None), Rung(0.2, 0.9, 0.3), Rung(0.48, 0.9, 0.3)])


def measured(similarity: float, dist: float, ok_up_to: int) -> Measured:
    """A calibration pair that met the floor when resumed after up to ``ok_up_to`` steps."""
    pair = Pair("a", "b", "natural", None, (1, 2))
    ok = {round(f * STEPS): round(f * STEPS) <= ok_up_to for f in FRACTIONS}
    return Measured(pair, {"minilm": similarity}, dist, ok, {k: 30.0 for k in ok})


def test_fit_finds_the_similarity_and_distance_bars_that_keep_the_floor():
    # Alike pairs whose predictions agree keep the floor at every K; alike ones that disagree (a moved shape) only
    # early; unlike pairs only at the first mark.
    pairs = [measured(0.99, 0.1 + i / 100, 12) for i in range(8)]
    pairs += [measured(0.99, 0.9 + i / 100, 3) for i in range(6)]
    pairs += [measured(0.5 + i / 100, 1.0, 2) for i in range(6)]
    rungs = {rung.fraction: rung for rung in fit(pairs, "minilm", STEPS, keep=0.97)}
    near = {"abs": 1e-5}
    assert rungs[0.08] == Rung(0.08, pytest.approx(0.5, **near), None)  # every pair met it: no check, lowest bar
    # Every alike pair met it: the same pairs the check would admit, but with no check to run.
    assert rungs[0.12] == Rung(0.12, pytest.approx(0.99, **near), None)
    for fraction in (0.2, 0.32, 0.4, 0.48):  # only the agreeing pairs: the check, not similarity, draws the line
        assert rungs[fraction] == Rung(fraction, pytest.approx(0.5, **near), pytest.approx(0.17))


def test_fit_leaves_out_a_fraction_too_few_pairs_prove():
    pairs = [measured(0.99, 0.1, 12) for _ in range(4)] + [measured(0.6, 1.0, 2) for _ in range(10)]
    rungs = {rung.fraction: rung for rung in fit(pairs, "minilm", STEPS, keep=0.97, least=5)}
    assert set(rungs) == {0.08}


def test_a_calibration_makes_a_policy_without_the_rungs_a_higher_one_dominates():
    table = calibration([Rung(0.08, 0.5, None), Rung(0.12, 0.95, None), Rung(0.2, 0.9, 0.3), Rung(0.48, 0.9, 0.3)])
    policy = table.policy(FASTGEN)
    assert policy.name == QUALITY
    assert policy.thresholds == ((0.9, 0.48), (0.9, 0.2), (0.5, 0.08))  # 0.12 needs 0.95, 0.2 needs less: dropped
    assert policy.check == ((0.48, 0.3), (0.2, 0.3))
    assert policy.check_step(STEPS) == 2 and 2 in policy.marks(STEPS)
    assert policy.max_distance(12, STEPS) == 0.3 and policy.max_distance(2, STEPS) is None
    assert granted(policy, [2, 5, 12], STEPS, measured=0.2) == 12
    assert granted(policy, [2, 5, 12], STEPS, measured=0.8) == 2
    assert granted(policy, [2, 5, 12], STEPS, measured=None) == 2  # not measured: only what needs no check
    assert granted(policy, [5, 12], STEPS, measured=0.8) == 0
    assert Calibration.from_json(table.to_json()) == table


def test_tables_load_by_model_and_embedder_and_an_unusable_one_is_skipped(tmp_path, caplog):
    first, second = tmp_path / "built-in", tmp_path / "own"
    first.mkdir(), second.mkdir()
    (first / file_name("fastgen-shapes", "minilm")).write_text(CHECKED.to_json())
    (first / file_name("fastgen-shapes", "pipeline")).write_text(calibration([], embedder="pipeline").to_json())
    (first / "broken.json").write_text("{not json")
    own = calibration([Rung(0.08, 0.7, None)])
    (second / file_name("fastgen-shapes", "minilm")).write_text(own.to_json())
    with caplog.at_level(logging.WARNING):
        assert load_calibrations([first]) == {("fastgen-shapes", "minilm"): CHECKED}
        assert load_calibrations([first, second]) == {("fastgen-shapes", "minilm"): own}  # the later folder's wins
        assert load_calibrations([tmp_path / "typo"]) == {}
    assert "broken.json unusable" in caplog.text and "no rung admits any step" in caplog.text
    assert f"no folder at {tmp_path / 'typo'}" in caplog.text


def blob(row: int, col: int, value: float = 1.0) -> torch.Tensor:
    """A 4-channel prediction with a square of ``value`` at (row, col) on a background of 0.2."""
    x = torch.full((1, 4, 16, 16), 0.2)
    x[:, :, row : row + 4, col : col + 4] = value
    return x


def test_the_layout_distance_sees_where_not_how_bright_or_on_what_background():
    stored = blob(2, 2)
    assert distance(stored.clone(), stored) == 0.0
    assert distance(stored * -1.5, stored) == pytest.approx(0.0, abs=1e-9)  # another colour, the same place
    assert distance(stored + torch.tensor([0.5, -1, 2, 0]).view(1, 4, 1, 1), stored) == pytest.approx(0.0, abs=1e-9)
    moved = distance(blob(10, 10), stored)
    assert moved > 0.9  # nothing where it was
    assert 0.2 < distance(blob(4, 4), stored) < moved  # a quarter overlaps
    unconditional = blob(6, 6, 3.0)  # what every prompt predicts here: taken out before the layouts are compared
    new, old = unconditional + blob(10, 10), unconditional + blob(2, 2)
    assert distance(new, old) < 0.5 and distance(new, old, unconditional) > 0.9
    with pytest.raises(ValueError, match=r"shape \[1, 4, 4, 4\]"):
        distance(torch.ones(1, 4, 4, 4), stored)
    with pytest.raises(ValueError, match="unconditional"):
        distance(stored, stored, torch.ones(1, 4, 4, 4))


def unet_hooks(engine) -> int:
    unet = engine.pool.get(engine.registry.resolve("fastgen-shapes"))[0].pipe.unet
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


@pytest.fixture
def checked_run(engine, tmp_path):
    return cached_engine(engine, make_cache(tmp_path, calibrations={("fastgen-shapes", "minilm"): CHECKED}))


def test_a_miss_stores_the_check_steps_prediction_and_draws_what_no_cache_draws(engine, checked_run):
    hooks = unet_hooks(engine)
    plain = engine.run({"prompt": CAPTION, **SHAPES, "accelerate": {"cache": {"enabled": False}}})
    miss = checked_run.run({"prompt": CAPTION, **SHAPES})
    report = cache_report(miss)
    assert report["hit"] is False and report["stored_steps"] == [2, 5, 12]
    np.testing.assert_array_equal(pixels(miss), pixels(plain))  # the prediction tap leaves the run untouched
    assert unet_hooks(engine) == hooks  # and comes off with it
    cache = checked_run.cache
    at_check, later = (cache.files.read(report["stored_entry"], k) for k in (2, 5))
    for predicted in (at_check.prediction, at_check.unconditional):  # guidance ran: both halves of its batch
        assert predicted is not None and predicted.shape == at_check.latents.shape
    assert not torch.equal(at_check.prediction, at_check.unconditional)
    assert later.prediction is None and later.unconditional is None  # only the check's state keeps them
    assert float(at_check.prediction.abs().mean()) > 0


def test_a_repeat_needs_no_comparison_and_a_rewording_gets_what_its_distance_allows(checked_run):
    checked_run.run({"prompt": CAPTION, **SHAPES})
    repeat = cache_report(checked_run.run({"prompt": CAPTION, **SHAPES, "seed": 9}))
    assert repeat["hit"] and repeat["k"] == 12
    assert repeat["check"] == {"verdict": "repeat", "k_asked": 12, "k": 12, "seconds": 0.0}
    reworded = cache_report(checked_run.run({"prompt": NEAR_DUPLICATE, **SHAPES, "seed": 10}))
    check = reworded["check"]
    assert check["at_step"] == 2 and check["max_distance"] == 0.3 and check["seconds"] > 0
    assert (check["verdict"], reworded["k"]) == (("passed", 12) if check["distance"] <= 0.3 else ("lowered", 2))


def test_a_neighbour_one_content_word_away_is_lowered_to_what_needs_no_check(checked_run):
    checked_run.run({"prompt": CAPTION, **SHAPES})
    moved = checked_run.run({"prompt": MOVED, **SHAPES, "seed": 11})
    report = cache_report(moved)
    assert report["similarity"] >= 0.9  # alike enough for 12 steps by similarity alone
    assert report["check"]["verdict"] == "lowered" and report["check"]["k_asked"] == 12
    assert report["check"]["distance"] > 0.3  # the model lays the two pictures out differently
    assert report["hit"] and report["k"] == report["check"]["k"] == 2


def test_a_neighbour_the_check_leaves_nothing_for_is_a_miss_with_the_reason(engine, tmp_path):
    strict = calibration([Rung(0.08, 0.5, 0.01), Rung(0.48, 0.9, 0.3)])  # every skip needs the check
    run = cached_engine(engine, make_cache(tmp_path, calibrations={("fastgen-shapes", "minilm"): strict}))
    run.run({"prompt": CAPTION, **SHAPES})
    report = cache_report(run.run({"prompt": MOVED, **SHAPES, "seed": 11}))
    assert report["hit"] is False and report["check"]["verdict"] == "refused" and report["check"]["k"] == 0
    assert "the check refused it" in report["reason"]


def test_a_worker_that_cannot_probe_grants_only_the_skips_that_need_no_check(engine, checked_run):
    checked_run.run({"prompt": CAPTION, **SHAPES})
    pipe = engine.pool.get(engine.registry.resolve("fastgen-shapes"))[0].pipe
    request = engine.resolve({"prompt": MOVED, **SHAPES, "seed": 11}).request
    lookup = checked_run.cache.lookup(pipe, "fastgen-shapes", request, DEFAULT_TENANT, probe=None)
    assert lookup.check.verdict == "unavailable" and lookup.check.reason == "this worker cannot run the check"
    assert lookup.hit is not None and lookup.hit.skip == 2


@pytest.mark.parametrize("model", ["fastgen-shapes", "tiny-sd"])
def test_the_probes_own_unet_call_predicts_exactly_what_the_pipelines_loop_does(engine, monkeypatch, model):
    from fastgen.cache import resume
    from fastgen.engine import probe
    from fastgen.engine.batch import Member

    loaded, _ = engine.pool.get(engine.registry.resolve(model))
    member = Member(engine.resolve({"prompt": MOVED, "model": model, "seed": 3, "steps": STEPS}))
    shape = resume.latent_shape(loaded.pipe, member.request.width, member.request.height, None)
    state = resume.State(5, STEPS, torch.randn(shape, generator=torch.Generator().manual_seed(0)), {})

    def predicted() -> torch.Tensor:
        return probe.predict(loaded, member, state, engine.settings, engine.loras, engine.accelerators)

    shortcut = predicted()
    monkeypatch.setattr(probe, "PLAIN_UNET_PIPELINES", frozenset())  # every pipeline through its own loop
    torch.testing.assert_close(shortcut, predicted(), rtol=0, atol=0)
    assert shortcut.shape == shape and float(shortcut.abs().mean()) > 0


def test_pipelines_whose_unet_call_is_not_plain_keep_their_own_loop(engine):
    from fastgen.engine import probe
    from fastgen.engine.batch import Member
    from fastgen.engine.monitor import StepMonitor
    from fastgen.engine.run import Run

    def plain(model: str) -> bool:
        loaded, _ = engine.pool.get(engine.registry.resolve(model))
        member = Member(engine.resolve(small(model)))
        return probe.calls_unet_plainly(loaded, Run(loaded, [member], StepMonitor(4, None, None), engine.settings))

    assert plain("tiny-sd") and not plain("tiny-pixart")


def test_a_table_for_another_embedder_leaves_the_cache_on_its_own_policy(engine, tmp_path):
    other = {("fastgen-shapes", "pipeline"): CHECKED}
    run = cached_engine(engine, make_cache(tmp_path, calibrations=other))
    assert run.cache.policy_for("fastgen-shapes") == FASTGEN
    report = cache_report(run.run({"prompt": CAPTION, **SHAPES}))
    assert report["stored_steps"] == list(FASTGEN.marks(STEPS)) and "check" not in report


def test_the_quality_policy_setting_loads_the_built_in_tables_and_a_folder_of_ones_own(tmp_path, monkeypatch):
    from fastgen.cache import open_cache
    from fastgen.settings import Settings

    own = tmp_path / "tables"
    own.mkdir()
    (own / file_name("fastgen-shapes", "minilm")).write_text(CHECKED.to_json())
    monkeypatch.setenv("FASTGEN_CACHE_POLICY", "quality")
    monkeypatch.setenv("FASTGEN_CACHE_EMBEDDER", "minilm")
    monkeypatch.setenv("FASTGEN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("FASTGEN_BROKER_URL", raising=False)  # its store: SQLite under the data folder
    built_in = open_cache(Settings.from_env())
    assert built_in.policy_for("fastgen-shapes").name == QUALITY and built_in.policy_for("tiny-sd") == FASTGEN
    monkeypatch.setenv("FASTGEN_CACHE_CALIBRATIONS", str(own))
    assert open_cache(Settings.from_env()).policy_for("fastgen-shapes") == CHECKED.policy(FASTGEN)


def test_fastgen_cache_calibrate_writes_a_table_per_embedder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTGEN_DATA_DIR", str(tmp_path / "data"))
    out, log = tmp_path / "tables", tmp_path / "measured.jsonl"
    argv = ["cache", "calibrate", "--shapes-bases", "1", "--embedder", "minilm", "--embedder", "pipeline"]
    assert main([*argv, "--out", str(out), "--measurements", str(log)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["fastgen-shapes.minilm.json", "fastgen-shapes.pipeline.json"]
    assert capsys.readouterr().out.split() == [*(str(out / name) for name in written), str(log)]
    pairs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [p["pair"]["kind"] for p in pairs] == list(KINDS)
    repeat = pairs[0]
    assert repeat["distance"] == pytest.approx(0.0, abs=1e-9) and set(repeat["similarity"]) == {"minilm", "pipeline"}
    assert all(set(p["ok"]) == {str(round(f * STEPS)) for f in FRACTIONS} for p in pairs)
    for name in written:
        table = Calibration.from_json((out / name).read_text())
        assert table.model == "fastgen-shapes" and table.made["pairs"] == {**dict.fromkeys(KINDS, 1), "natural": 0}
        assert {rung.fraction for rung in table.rungs} <= set(FRACTIONS)
        assert json.loads((out / name).read_text())["floor"]["psnr_db"] == 20.0
