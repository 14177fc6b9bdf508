"""The artifact store writes decodable media and metadata under any fsspec URL."""

from __future__ import annotations

import io

import imageio.v2 as imageio
import pytest
from conftest import small
from PIL import Image

from fastgen.artifacts import ArtifactStore


@pytest.fixture(scope="module")
def image_generation(engine):
    return engine.run(small(width=64, height=48))


@pytest.fixture(scope="module")
def video_generation(engine):
    return engine.run(small("tiny-wan", num_frames=5, fps=5))


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_image_formats_decode_to_the_right_size(tmp_path, image_generation, fmt):
    generation = image_generation
    generation.result = generation.result.model_copy(update={"output_format": fmt})
    result = ArtifactStore(str(tmp_path)).save(generation)
    (artifact,) = result.artifacts
    assert artifact.media_type == f"image/{fmt}" and artifact.name == f"image_0.{fmt}"
    data = ArtifactStore(str(tmp_path)).read(result.id, artifact.name)
    assert len(data) == artifact.bytes
    assert Image.open(io.BytesIO(data)).size == (64, 48)


def test_metadata_round_trips(tmp_path, image_generation):
    store = ArtifactStore(f"file://{tmp_path}")
    saved = store.save(image_generation)
    loaded = store.load(saved.id)
    assert loaded == saved
    assert loaded.seed == 7 and loaded.request.prompt == "a red circle at the top left"
    assert loaded.timings.encode_s > 0 and loaded.artifacts[0].url.startswith("file://")


@pytest.mark.parametrize(("fmt", "media_type"), [("mp4", "video/mp4"), ("gif", "image/gif")])
def test_video_formats_hold_every_frame(tmp_path, video_generation, fmt, media_type):
    generation = video_generation
    generation.result = generation.result.model_copy(update={"output_format": fmt})
    result = ArtifactStore(str(tmp_path)).save(generation)
    (artifact,) = result.artifacts
    assert artifact.media_type == media_type
    path = tmp_path / result.id / artifact.name
    frames = imageio.mimread(path, format="FFMPEG" if fmt == "mp4" else "GIF")
    assert len(frames) == 5 and frames[0].shape[:2] == (32, 32)


def test_any_fsspec_url_works(image_generation):
    store = ArtifactStore("memory://fastgen-test")
    result = store.save(image_generation)
    assert result.artifacts[0].url.startswith("memory://")
    assert store.load(result.id).id == result.id


def test_paths_cannot_escape_the_store(tmp_path):
    with pytest.raises(ValueError, match="invalid artifact path"):
        ArtifactStore(str(tmp_path)).read("..", "metadata.json")
