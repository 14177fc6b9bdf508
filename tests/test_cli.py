"""The fastgen command, run as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import imageio.v2 as imageio
from PIL import Image


def fastgen(*args: str, data_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTGEN_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fastgen.cli", *args], env=env, capture_output=True, text=True, timeout=240
    )


def test_generate_writes_an_image_with_progress(settings, tmp_path):
    out = tmp_path / "cat.png"
    run = fastgen(
        "generate",
        "a red circle",
        "-W",
        "64",
        "-H",
        "64",
        "-s",
        "3",
        "--seed",
        "1",
        "-o",
        str(out),
        data_dir=settings.data_dir,
    )
    assert run.returncode == 0, run.stderr
    assert Image.open(out).size == (64, 64)
    assert "step 3/3" in run.stderr and "seed=1" in run.stdout


def test_several_images_are_written_beside_each_other_each_with_its_seed(settings, tmp_path):
    out = tmp_path / "cat.png"
    run = fastgen(
        "generate",
        "a red circle",
        "-n",
        "2",
        "-W",
        "64",
        "-H",
        "64",
        "-s",
        "2",
        "--seed",
        "4",
        "-o",
        str(out),
        data_dir=settings.data_dir,
    )
    assert run.returncode == 0, run.stderr
    written = [tmp_path / "cat_0.png", tmp_path / "cat_1.png"]
    assert all(Image.open(path).size == (64, 64) for path in written) and not out.exists()
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"{written[0]}  ") and " seed=4 " in lines[0], lines
    assert lines[1].startswith(f"{written[1]}  ") and " seed=5 " in lines[1], lines


def test_generate_writes_a_video(settings, tmp_path):
    out = tmp_path / "clip.mp4"
    run = fastgen(
        "generate",
        "a boat",
        "-m",
        "tiny-wan",
        "-W",
        "32",
        "-H",
        "32",
        "--frames",
        "5",
        "-s",
        "2",
        "-o",
        str(out),
        "--json",
        data_dir=settings.data_dir,
    )
    assert run.returncode == 0, run.stderr
    assert len(imageio.mimread(out, format="FFMPEG")) == 5
    assert json.loads(run.stdout)["num_frames"] == 5


def test_bad_input_is_a_clear_error_not_a_traceback(settings, tmp_path):
    run = fastgen("generate", "a cat", "-s", "100000", "-o", str(tmp_path / "x.png"), data_dir=settings.data_dir)
    assert run.returncode == 2
    assert "error: steps: must be at most 100 (FASTGEN_MAX_STEPS), got 100000" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_service_that_cannot_be_reached_is_a_one_line_error(settings, tmp_path):
    for command in (["models"], ["loras"], ["generate", "a cat", "-o", str(tmp_path / "x.png")]):
        run = fastgen(*command, "--url", "http://127.0.0.1:9", data_dir=settings.data_dir)
        assert run.returncode == 1 and "Traceback" not in run.stderr, (command, run.stderr)
        assert "error: cannot talk to the service at http://127.0.0.1:9" in run.stderr, (command, run.stderr)


def test_unknown_model_and_file_type_are_clear_errors(settings, tmp_path):
    run = fastgen("generate", "a cat", "-m", "nope", data_dir=settings.data_dir)
    known = "fastgen-shapes, tiny-pixart, tiny-sd, tiny-wan"
    assert run.returncode == 2 and f"unknown model 'nope'; known models: {known}" in run.stderr
    run = fastgen("generate", "a cat", "-o", str(tmp_path / "x.bmp"), data_dir=settings.data_dir)
    assert run.returncode == 2 and "output: unknown file type .bmp" in run.stderr


def test_models_lists_capabilities(settings):
    run = fastgen("models", "--json", data_dir=settings.data_dir)
    models = {m["name"]: m for m in json.loads(run.stdout)}
    assert models["tiny-wan"]["kind"] == "video" and models["tiny-pixart"]["architecture"] == "dit"
    assert models["tiny-sd"]["accelerations"] == ["cache", "fuse_qkv", "parallel"]


def test_schema_reflects_configured_limits(settings, monkeypatch):
    monkeypatch.setenv("FASTGEN_MAX_STEPS", "12")
    schema = json.loads(fastgen("schema", data_dir=settings.data_dir).stdout)
    assert {"type": "integer", "minimum": 1, "maximum": 12} in schema["properties"]["steps"]["anyOf"]
