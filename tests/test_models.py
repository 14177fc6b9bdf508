"""The model registry: capabilities checked at the door, built-ins built once, any pipeline directory accepted."""

from __future__ import annotations

import json

import pytest

from fastgen.errors import InvalidRequest, UnknownModel
from fastgen.models.registry import BUILTIN_SPECS, ModelRegistry, ModelSpec
from fastgen.schema import GenerationRequest


def complete(model: str, **fields) -> GenerationRequest:
    return BUILTIN_SPECS[model].complete(GenerationRequest(prompt="a cat", **fields))


def fields_of(error: InvalidRequest) -> list[str]:
    return [e.field for e in error.errors]


def test_unknown_model_lists_the_known_ones(tmp_path):
    with pytest.raises(UnknownModel) as info:
        ModelRegistry(tmp_path).resolve("tiny-sdd")
    assert fields_of(info.value) == ["model"]
    for name in ("tiny-sd", "tiny-pixart", "tiny-wan"):
        assert name in str(info.value)


def test_defaults_fill_unset_fields():
    request = complete("tiny-wan")
    assert (request.width, request.height, request.num_frames, request.fps) == (128, 128, 17, 8)
    assert request.output_format == "mp4" and request.model == "tiny-wan"


@pytest.mark.parametrize(
    ("model", "fields", "field", "words"),
    [
        ("tiny-pixart", {"width": 72}, "width", "multiple of 16"),
        ("tiny-sd", {"height": 60}, "height", "multiple of 8"),
        ("tiny-sd", {"num_frames": 9}, "num_frames", "only video models"),
        ("tiny-sd", {"fps": 9}, "fps", "only video models"),
        ("tiny-sd", {"output_format": "mp4"}, "output_format", "png, jpeg, webp"),
        ("tiny-wan", {"num_frames": 10}, "num_frames", "4*k + 1"),
        ("tiny-wan", {"output_format": "png"}, "output_format", "mp4, gif"),
        ("tiny-pixart", {"loras": [{"name": "style"}]}, "loras", "does not take LoRA adapters"),
    ],
)
def test_model_rejects_what_it_cannot_do(model, fields, field, words):
    with pytest.raises(InvalidRequest) as info:
        complete(model, **fields)
    assert fields_of(info.value) == [field]
    assert words in info.value.errors[0].message


def test_acceleration_a_model_lacks_is_rejected():
    spec = ModelSpec(name="plain", kind="image", architecture="unet", pipeline_class="X", accelerations=frozenset())
    with pytest.raises(InvalidRequest, match="accelerate.fuse_qkv: model 'plain' does not support fuse_qkv"):
        spec.complete(GenerationRequest(prompt="a cat", accelerate={"fuse_qkv": True}))


def test_builtin_is_built_once_then_reused(tmp_path):
    registry = ModelRegistry(tmp_path)
    spec = registry.resolve("tiny-sd")
    source = registry.source(spec)
    stamp = (tmp_path / source / "model_index.json").stat().st_mtime_ns
    assert registry.source(spec) == source
    assert (tmp_path / source / "model_index.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [source.rsplit("/", 1)[-1]]  # no staging left behind


def test_local_pipeline_directory_is_accepted(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    builtin_dir = registry.source(registry.resolve("tiny-pixart"))
    spec = registry.resolve(builtin_dir)
    assert (spec.kind, spec.architecture, spec.pipeline_class) == ("image", "dit", "PixArtSigmaPipeline")
    assert spec.source == builtin_dir and not spec.builtin


def test_directory_without_pipeline_is_rejected(tmp_path):
    with pytest.raises(InvalidRequest, match="has no model_index.json"):
        ModelRegistry(tmp_path).resolve(str(tmp_path))


def test_unsupported_pipeline_class_is_rejected(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(InvalidRequest, match="KandinskyPipeline pipeline; supported pipelines: "):
        ModelRegistry(tmp_path).resolve(str(tmp_path))


def test_unreachable_hub_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InvalidRequest, match="model: hub model 'nobody/no-such-model' is not downloaded here"):
        ModelRegistry(tmp_path).resolve("nobody/no-such-model")
