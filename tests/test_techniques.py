"""The technique table is what the door, the model listing and the web page read: one row changes all three."""

import pytest
from pydantic import Field

from fastgen import techniques
from fastgen.cli import build_parser, request_from_args
from fastgen.errors import InvalidRequest
from fastgen.models.registry import ModelRegistry
from fastgen.schema import parse_request, request_model, request_schema
from fastgen.settings import Limits
from fastgen.strict import Strict
from fastgen.techniques import TECHNIQUES, Control, Flag, Technique


@pytest.fixture
def registry(tmp_path):
    return ModelRegistry(tmp_path)


def refusals(spec, request: dict) -> dict[str, str]:
    with pytest.raises(InvalidRequest) as refused:
        spec.complete(parse_request({"prompt": "a cat", **request}, Limits()))
    return {error.field: error.message for error in refused.value.errors}


def test_the_table_runs_in_the_order_the_engine_applies_them():
    assert [t.name for t in TECHNIQUES] == ["cache", "loras", "fuse_qkv", "sparse_attention", "parallel"]


@pytest.mark.parametrize(
    ("model", "accelerations", "loras"),
    [
        ("tiny-sd", ["cache", "fuse_qkv", "parallel"], True),
        ("tiny-pixart", ["cache", "fuse_qkv", "parallel", "sparse_attention"], False),
        ("tiny-wan", ["cache", "fuse_qkv", "parallel", "sparse_attention"], True),
    ],
)
def test_a_models_capabilities_are_the_rows_it_supports(registry, model, accelerations, loras):
    caps = registry.resolve(model).capabilities()
    assert caps["accelerations"] == accelerations and caps["loras"] is loras


def test_a_conflict_declared_in_the_table_is_refused_at_the_door_on_the_declaring_field(registry):
    spec = registry.resolve("tiny-sd")
    problems = refusals(spec, {"loras": [{"name": "ink"}], "accelerate": {"fuse_qkv": True}})
    assert problems == {"accelerate.fuse_qkv": "cannot be combined with loras: it would bypass them"}
    # A technique the model lacks is refused as that, not as a conflict.
    pixart = registry.resolve("tiny-pixart")
    problems = refusals(pixart, {"loras": [{"name": "ink"}], "accelerate": {"fuse_qkv": True}})
    assert list(problems) == ["loras"] and "does not take LoRA adapters" in problems["loras"]


def test_a_row_added_to_the_table_reaches_the_listing_and_the_door(registry, monkeypatch):
    """A technique declared only here: a model that takes it lists it, one that does not refuses it, and the
    conflict it declares with the cache is refused at the door."""
    # Turned on by the cache's min_similarity field, so no request model change is needed to ask for it.
    probe = Technique(
        "probe",
        asked=lambda r: r.accelerate.cache.min_similarity is not None,
        supported=lambda spec: spec.kind == "video",
        conflicts={"fuse_qkv": "cannot be combined with fuse_qkv: a test's rule"},
        option="accelerate.cache.min_similarity",
        control=Control("Probe", "A test's technique."),
    )
    monkeypatch.setattr(techniques, "TECHNIQUES", (*TECHNIQUES, probe))
    video, image = registry.resolve("tiny-wan"), registry.resolve("tiny-sd")
    assert "probe" in video.capabilities()["accelerations"]
    assert "probe" not in image.capabilities()["accelerations"]
    asked = {"accelerate": {"cache": {"enabled": True, "min_similarity": 0.9}, "fuse_qkv": True}}
    assert refusals(video, asked) == {
        "accelerate.cache.min_similarity": "cannot be combined with fuse_qkv: a test's rule"
    }
    problems = refusals(image, asked)
    assert (
        list(problems) == ["accelerate.cache.min_similarity"]
        and "does not support probe" in problems["accelerate.cache.min_similarity"]
    )


def test_the_web_page_offers_the_rows_with_a_control():
    from fastgen.ui.page import ACCELERATIONS

    assert [c.name for c in ACCELERATIONS] == [t.name for t in TECHNIQUES if t.control is not None]
    assert {c.name: c.turned_on for c in ACCELERATIONS} == {
        "cache": {"enabled": True},
        "fuse_qkv": True,
        "sparse_attention": {"mode": "window"},
    }


class ProbeOptions(Strict):
    """A test's technique options."""

    strength: float = Field(0.5, ge=0.0, le=1.0, description="How hard the probe pushes")


PROBE = Technique(
    "probe",
    asked=lambda r: getattr(r.accelerate, "probe", None) is not None,
    supported=lambda spec: spec.kind == "video",
    options=(ProbeOptions | None, Field(None, description="A technique declared only in a test")),
    flags=(Flag("--probe-strength", "accelerate.probe.strength", "probe: how hard it pushes", type=float),),
    control=Control("Probe", "A test's technique.", {"strength": 0.5}),
)


def test_a_technique_declared_only_in_a_test_reaches_the_schema_the_listing_and_the_cli(registry, monkeypatch, capsys):
    table = (*TECHNIQUES, PROBE)
    schema = request_schema(Limits(), model=request_model(table))
    assert schema["$defs"]["ProbeOptions"]["properties"]["strength"]["maximum"] == 1.0
    assert "probe" in schema["$defs"]["AccelerateOptions"]["properties"]
    assert "probe" not in request_schema(Limits())["$defs"]["AccelerateOptions"]["properties"]

    monkeypatch.setattr(techniques, "TECHNIQUES", table)
    assert "probe" in registry.resolve("tiny-wan").capabilities()["accelerations"]
    assert "probe" not in registry.resolve("tiny-sd").capabilities()["accelerations"]

    parser = build_parser(table)
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    assert "--probe-strength PROBE_STRENGTH probe: how hard it pushes" in " ".join(capsys.readouterr().out.split())
    args = parser.parse_args(["generate", "a cat", "--probe-strength", "0.25", "--fuse-qkv"])
    request = request_from_args(args)
    assert request["accelerate"] == {"probe": {"strength": 0.25}, "fuse_qkv": True}
    parsed = request_model(table).model_validate(request, strict=False)
    assert parsed.accelerate.probe.strength == 0.25
    assert PROBE.asked(parsed) and not PROBE.asked(request_model(table).model_validate({"prompt": "a cat"}))


def test_the_cli_flags_are_the_tables():
    """Every generate flag that turns on a technique comes from a row, and sets the field the row names."""
    args = build_parser().parse_args(
        ["generate", "a cat", "--cache", "off", "--min-similarity", "0.9", "--lora", "ink:0.5", "--lora", "large"]
        + ["--sparse-attention", "window", "--sparse-density", "0.1"]
    )
    assert request_from_args(args) == {
        "prompt": "a cat",
        "accelerate": {
            "cache": {"enabled": False, "min_similarity": 0.9},
            "sparse_attention": {"mode": "window", "density": 0.1},
        },
        "loras": [{"name": "ink", "scale": 0.5}, {"name": "large"}],
    }
    assert request_from_args(build_parser().parse_args(["generate", "a cat"])) == {"prompt": "a cat"}
    flags = [flag.name for technique in TECHNIQUES for flag in technique.flags]
    assert flags == ["--cache", "--min-similarity", "--lora", "--fuse-qkv", "--sparse-attention", "--sparse-density"]
