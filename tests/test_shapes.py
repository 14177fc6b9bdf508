"""The shape scenes and their numpy scorer: captions, the held-out split, seeded renders, and scoring accuracy."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from fastgen.shapes import scenes as sc
from fastgen.shapes.score import adherence, detect, half_side, score, style_check

ATTRIBUTES = ("color", "shape", "position", "background")


def _jittered(step: int = 1):
    return [(scene, sc.render(scene, seed=1000 + i)) for i, scene in enumerate(sc.all_scenes()[::step])]


def _other(scene: sc.Scene, attribute: str) -> sc.Scene:
    choices = {"color": sc.COLORS, "shape": sc.SHAPES, "position": sc.POSITIONS, "background": sc.COLORS}[attribute]
    taken = {getattr(scene, attribute), scene.color, scene.background}
    return dataclasses.replace(scene, **{attribute: next(v for v in choices if v not in taken)})


def test_every_caption_parses_back_to_its_scene():
    for scene in sc.all_scenes():
        assert sc.parse_caption(sc.caption(scene)) == scene


def test_caption_wording():
    assert (
        sc.caption(sc.Scene("red", "circle", "top left", "blue"))
        == "a red circle at the top left on a blue background"
    )
    assert sc.caption(sc.Scene("red", "circle", "center", "blue")) == "a red circle at the center on a blue background"


@pytest.mark.parametrize(
    "text",
    [
        "a red circle at the top left on a red background",  # shape and background share a colour
        "a purple circle at the top left on a blue background",
        "a red hexagon at the center on a blue background",
        "a red circle at the middle on a blue background",
        "a red circle",
        "",
    ],
)
def test_malformed_captions_do_not_parse(text):
    assert sc.parse_caption(text) is None


def test_scene_rejects_unknown_values_by_field():
    with pytest.raises(ValueError, match="shape"):
        sc.Scene("red", "hexagon", "center", "blue")
    with pytest.raises(ValueError, match="background"):
        sc.Scene("red", "circle", "center", "red")


def test_heldout_combinations_never_appear_in_training():
    train, heldout = sc.train_scenes(), sc.heldout_scenes()
    assert len(sc.all_scenes()) == 450
    assert len(heldout) == 45
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(sc.all_scenes())
    assert not {sc.caption(s) for s in train} & {sc.caption(s) for s in heldout}


def test_split_is_seeded_and_keeps_every_word_in_training():
    assert sc.heldout_scenes() == sc.heldout_scenes()
    assert sc.heldout_scenes(seed=1) != sc.heldout_scenes()
    train = sc.train_scenes()
    for attribute, values in (("color", sc.COLORS), ("shape", sc.SHAPES), ("position", sc.POSITIONS)):
        assert {getattr(s, attribute) for s in train} == set(values)


def test_renders_are_deterministic_for_a_seed():
    scene = sc.Scene("yellow", "triangle", "bottom right", "black")
    first = sc.render(scene, seed=7)
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, sc.render(scene, seed=7))
    assert np.array_equal(sc.render(scene), sc.render(scene))
    assert any(not np.array_equal(first, sc.render(scene, seed=s)) for s in range(8, 12))


def test_render_draws_the_named_colours_in_the_named_place():
    image = sc.render(sc.Scene("red", "square", "top left", "blue"))
    assert tuple(image[8, 8]) == sc.COLORS["red"]
    assert tuple(image[24, 24]) == sc.COLORS["blue"]


def test_named_colours_are_far_apart():
    colors = np.array(list(sc.COLORS.values()), dtype=float)
    distances = np.linalg.norm(colors[:, None] - colors[None], axis=-1)
    assert distances[~np.eye(len(colors), dtype=bool)].min() > 150


def test_scorer_is_right_on_every_canonical_render():
    for scene in sc.all_scenes():
        assert score(sc.render(scene), sc.caption(scene)).all, (scene, detect(sc.render(scene)))


def test_scorer_is_right_on_every_jittered_render():
    for scene, image in _jittered():
        assert score(image, sc.caption(scene)).all, (scene, detect(image))


def test_scorer_downscales_large_and_pil_images():
    for scene, image in _jittered(step=7):
        big = Image.fromarray(image).resize((96, 96), Image.Resampling.NEAREST)
        assert score(big, sc.caption(scene)).all
        assert score(np.asarray(big), sc.caption(scene)).all


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_scorer_flags_a_caption_that_names_another_value(attribute):
    for scene, image in _jittered(step=5):
        wrong = _other(scene, attribute)
        result = score(image, sc.caption(wrong))
        assert not getattr(result, attribute) and not result.all, (scene, attribute)
        assert all(getattr(result, a) for a in ATTRIBUTES if a != attribute), (scene, attribute)


def test_blank_image_has_no_shape():
    seen = detect(np.full((32, 32, 3), sc.COLORS["green"], dtype=np.uint8))
    assert seen.background == "green" and seen.shape is None
    assert not score(np.zeros((32, 32, 3), np.uint8), "a red circle at the center on a blue background").all


def test_unparseable_caption_scores_nothing():
    scene = sc.Scene("red", "circle", "center", "blue")
    assert not any(dataclasses.astuple(score(sc.render(scene), "a cat on a mat")))


def test_adherence_reports_fractions_per_attribute():
    scenes = sc.all_scenes()[:4]
    images = [sc.render(s) for s in scenes]
    captions = [sc.caption(s) for s in scenes[:2]] + [sc.caption(_other(s, "position")) for s in scenes[2:]]
    result = adherence(images, captions)
    assert result == {"background": 1.0, "color": 1.0, "position": 0.5, "shape": 1.0, "all": 0.5, "n": 4}
    with pytest.raises(ValueError, match="images"):
        adherence([], [])


def test_colour_styles_draw_the_styled_scene_with_the_same_jitter():
    scene = sc.Scene("red", "triangle", "bottom left", "white")
    assert sc.styled(scene, "complement") == sc.Scene("green", "triangle", "bottom left", "black")
    assert sc.styled(scene, "reverse") == sc.Scene("white", "triangle", "bottom left", "red")
    assert sc.styled(scene, "large") == scene
    for style in ("complement", "reverse"):
        assert np.array_equal(sc.render(scene, 5, style), sc.render(sc.styled(scene, style), 5))
    with pytest.raises(ValueError, match="style: 'outline' is not one of"):
        sc.render(scene, style="outline")


def test_large_draws_the_same_shape_bigger_in_the_same_place():
    scene = sc.Scene("blue", "square", "center", "yellow")
    plain, large = sc.render(scene, 9), sc.render(scene, 9, "large")
    drawn = (plain != sc.COLORS["yellow"]).any(-1)
    assert ((large != sc.COLORS["yellow"]).any(-1) >= drawn).all()  # covers the plain shape, and more
    assert (large != sc.COLORS["yellow"]).any(-1).sum() > 2 * drawn.sum()
    assert half_side(large, "square") > 8 > 7 > half_side(plain, "square")


@pytest.mark.parametrize("style", sc.STYLES)
def test_a_style_check_passes_on_every_render_in_that_style_and_fails_on_every_plain_one(style):
    for i, scene in enumerate(sc.all_scenes()):
        text = sc.caption(scene)
        assert style_check(sc.render(scene, 1000 + i, style), text, style), (scene, style)
        assert not style_check(sc.render(scene, 1000 + i), text, style), (scene, style)


@pytest.mark.parametrize("style", sc.STYLES)
def test_styled_adherence_scores_the_caption_as_the_style_draws_it(style):
    scenes = sc.all_scenes()[::9]
    captions = [sc.caption(s) for s in scenes]
    styled = [sc.render(s, 2000 + i, style) for i, s in enumerate(scenes)]
    assert adherence(styled, captions, style)["all"] == 1.0
    plain = adherence([sc.render(s, 2000 + i) for i, s in enumerate(scenes)], captions, style)
    if style == "large":  # same words: the size is the style check's business
        assert plain["all"] == 1.0
    else:
        assert plain["color"] == plain["background"] == 0.0 and plain["position"] == plain["shape"] == 1.0


def test_style_checks_fail_on_a_blank_image_and_an_unparseable_caption():
    blank = np.full((32, 32, 3), sc.COLORS["green"], dtype=np.uint8)
    scene = sc.Scene("red", "circle", "center", "blue")
    for style in sc.STYLES:
        assert not style_check(blank, sc.caption(scene), style)
        assert not style_check(sc.render(scene, style=style), "a cat on a mat", style)


def test_scorer_is_right_on_every_large_render_even_where_the_canvas_edge_cuts_the_shape():
    for i, scene in enumerate(sc.all_scenes()):
        image = sc.render(scene, 1000 + i, "large")
        assert score(image, sc.caption(scene)).all, (scene, detect(image))


def test_a_scene_drawn_on_a_grid_twice_as_fine_scores_as_its_caption_with_the_same_shape_area():
    # Read at 32x32 (box-downscaled), a 64x64 render's edges blend: 2 of the 450 scenes' circles then read as squares.
    scenes = sc.all_scenes()
    scores = [score(sc.render(scene, seed=2000 + i, scale=2), sc.caption(scene)) for i, scene in enumerate(scenes)]
    assert all(s.color and s.position and s.background for s in scores)
    assert np.mean([s.shape for s in scores]) >= 0.99
    assert sc.render(scenes[0], scale=2).shape == (2 * sc.SIZE, 2 * sc.SIZE, 3)
    plain, large = sc.render(scenes[0], seed=3), sc.render(scenes[0], seed=3, scale=2)
    shape_pixels = [int((image != image[0, 0]).any(-1).sum()) for image in (plain, large)]  # same seed, same shape
    assert abs(4 * shape_pixels[0] - shape_pixels[1]) <= 0.15 * shape_pixels[1]
    with pytest.raises(ValueError, match="scale"):
        sc.render(scenes[0], scale=0)
