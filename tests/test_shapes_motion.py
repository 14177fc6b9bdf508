"""The motion scorer of the fastgen-motion yardstick, on synthetic clips."""

from __future__ import annotations

import numpy as np
import pytest

from fastgen.shapes import motion


def clip(direction: str, frames: int = 9, seed: int | None = 3, **scene) -> np.ndarray:
    fields = {"color": "red", "shape": "circle", "background": "blue"} | scene
    return motion.render(motion.MotionScene(direction=direction, **fields), frames, seed)


@pytest.mark.parametrize("way", list(motion.DIRECTIONS))
@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_a_shape_moving_one_way_scores_that_way_and_no_other(way, shape):
    frames = clip(way, shape=shape, color="yellow", background="black")
    assert motion.direction(frames) == way
    text = f"a yellow {shape} moving {way} on a black background"
    assert motion.score(frames, text).all
    others = [w for w in motion.DIRECTIONS if w != way]
    assert not any(motion.score(frames, text.replace(f"moving {way}", f"moving {w}")).direction for w in others)


def test_a_still_shape_moves_no_way():
    still = np.repeat(clip("right")[4:5], 9, axis=0)
    assert motion.direction(still) is None
    assert not motion.score(still, "a red circle moving right on a blue background").direction


def test_a_small_jitter_or_a_diagonal_is_not_a_direction():
    frames = clip("right")
    wobble = np.stack([frames[4], frames[5]] * 4 + [frames[4]])  # back and forth by a pixel and a half
    assert motion.direction(wobble) is None
    diagonal = np.stack([np.roll(f, shift=i, axis=0) for i, f in enumerate(clip("right"))])  # right and down alike
    assert motion.direction(diagonal) is None


def test_every_frame_must_show_the_colour_shape_and_background():
    frames = clip("down")
    text = "a red circle moving down on a blue background"
    assert motion.score(frames, text).all
    frames[3] = clip("down", color="green")[3]
    result = motion.score(frames, text)
    assert not result.color and result.shape and result.background
    assert not motion.score(frames[:0], text).all and not motion.score(frames, "a red circle").all


def test_captions_round_trip_and_bad_ones_do_not_parse():
    scene = motion.MotionScene("white", "square", "up", "green")
    assert motion.parse_caption(motion.caption(scene).upper()) == scene
    for text in ("a red circle moving sideways on a blue background", "a red circle moving up on a red background"):
        assert motion.parse_caption(text) is None
    with pytest.raises(ValueError, match="frames"):
        motion.render(scene, 1)
