"""Every request limit rejects with a message that names the field and the limit."""

from __future__ import annotations

import pytest

from fastgen.errors import InvalidRequest
from fastgen.schema import GenerationRequest, parse_request, request_schema
from fastgen.settings import Limits, Settings

LIMITS = Limits(
    max_pixels=256 * 256,
    max_side=512,
    max_steps=50,
    max_frames=33,
    max_prompt_chars=100,
    max_loras=2,
    max_guidance=20.0,
    max_images=3,
)


def rejection(**fields) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_request({"prompt": "a cat", **fields}, LIMITS)
    return info.value


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"prompt": "x" * 101}, "prompt", ["at most 100", "FASTGEN_MAX_PROMPT_CHARS"]),
        ({"prompt": "   "}, "prompt", ["blank"]),
        ({"prompt": ""}, "prompt", ["at least 1"]),
        ({"negative_prompt": "x" * 101}, "negative_prompt", ["at most 100", "FASTGEN_MAX_PROMPT_CHARS"]),
        ({"width": 1024}, "width", ["at most 512", "FASTGEN_MAX_SIDE"]),
        ({"height": 4}, "height", ["greater than or equal to 8"]),
        ({"width": 512, "height": 512}, "height", ["262144 pixels", "limit of 65536", "FASTGEN_MAX_PIXELS"]),
        ({"steps": 51}, "steps", ["at most 50", "FASTGEN_MAX_STEPS"]),
        ({"steps": 0}, "steps", ["greater than or equal to 1"]),
        ({"guidance": 20.5}, "guidance", ["at most 20.0", "FASTGEN_MAX_GUIDANCE"]),
        ({"guidance": -1}, "guidance", ["greater than or equal to 0"]),
        ({"num_frames": 34}, "num_frames", ["at most 33", "FASTGEN_MAX_FRAMES"]),
        ({"fps": 61}, "fps", ["less than or equal to 60"]),
        ({"seed": -1}, "seed", ["greater than or equal to 0"]),
        ({"num_images": 4}, "num_images", ["at most 3", "FASTGEN_MAX_IMAGES"]),
        ({"num_images": 0}, "num_images", ["greater than or equal to 1"]),
        ({"output_format": "bmp"}, "output_format", ["png", "mp4"]),
        ({"loras": [{"name": n} for n in "abc"]}, "loras", ["at most 2", "FASTGEN_MAX_LORAS"]),
        ({"loras": [{"name": "a"}, {"name": "a"}]}, "loras", ["same adapter twice"]),
        ({"loras": [{"name": "../../etc/passwd"}]}, "loras.0.name", ["no paths"]),
        ({"loras": [{"name": "style", "scale": 9}]}, "loras.0.scale", ["less than or equal to 4"]),
        ({"steps": "many"}, "steps", ["integer"]),
        ({"stepz": 5}, "stepz", ["not a known field"]),
        ({"accelerate": {"warp": True}}, "accelerate.warp", ["not a known field"]),
    ],
)
def test_each_limit_names_field_and_limit(fields, field, words):
    error = rejection(**fields)
    assert [e.field for e in error.errors] == [field]
    for word in words:
        assert word in error.errors[0].message


def test_every_bad_field_is_reported_at_once():
    error = rejection(steps=999, width=4096)
    assert {e.field for e in error.errors} == {"steps", "width"}


def test_valid_request_passes_and_is_json_round_trippable():
    request = parse_request({"prompt": "a cat", "width": 256, "height": 256, "steps": 50}, LIMITS)
    assert parse_request(request.model_dump_json(), LIMITS) == request


def test_limits_come_from_environment():
    settings = Settings.from_env({"FASTGEN_MAX_STEPS": "7", "FASTGEN_DATA_DIR": "/tmp/x"})
    assert settings.limits.max_steps == 7
    with pytest.raises(InvalidRequest, match="steps: must be at most 7"):
        parse_request({"prompt": "a cat", "steps": 8}, settings.limits)


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ValueError, match="FASTGEN_MAX_STEPS must be a number"):
        Settings.from_env({"FASTGEN_MAX_STEPS": "lots"})
    with pytest.raises(ValueError, match="FASTGEN_MAX_FRAMES must be positive"):
        Settings.from_env({"FASTGEN_MAX_FRAMES": "0"})


def test_schema_carries_the_service_limits():
    schema = request_schema(LIMITS)
    props = schema["properties"]
    assert props["prompt"]["maxLength"] == 100
    assert props["loras"]["maxItems"] == 2
    assert {"type": "integer", "maximum": 50, "minimum": 1} in [
        {k: v for k, v in variant.items() if k in ("type", "maximum", "minimum")}
        for variant in props["steps"]["anyOf"]
    ]
    assert "65536 pixels" in schema["description"]
    assert set(GenerationRequest.model_json_schema()["properties"]) == set(props)


def test_image_seeds_follow_the_first_and_wrap_past_the_largest():
    from fastgen.schema import MAX_SEED, image_seeds

    assert image_seeds(7, 3) == [7, 8, 9]
    assert image_seeds(MAX_SEED, 2) == [MAX_SEED, 0]
