import re

import numpy as np
import pytest
from PIL import Image

from daybreak.data.shapes import COLORS, POSITIONS, SHAPES, SHAPES_PROMPTS, ShapesDataset, parse_prompt
from daybreak.errors import UserError


def test_same_seed_and_index_give_identical_samples():
    a, b = ShapesDataset(seed=3)[17], ShapesDataset(seed=3)[17]
    assert a["image"].tobytes() == b["image"].tobytes()
    assert a["captions"] == b["captions"] and a["key"] == b["key"]


def test_different_seeds_and_indices_differ():
    images = [ShapesDataset(seed=s)[i]["image"].tobytes() for s in (0, 1) for i in range(8)]
    assert len(set(images)) == len(images)


def test_access_order_does_not_matter():
    forward = ShapesDataset(seed=5)
    first = [forward[i]["image"].tobytes() for i in range(5)]
    backward = ShapesDataset(seed=5)
    assert [backward[i]["image"].tobytes() for i in reversed(range(5))] == first[::-1]


@pytest.mark.parametrize("size", [32, 48, 64])
def test_image_size_and_mode(size):
    image = ShapesDataset(size=size)[0]["image"]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (size, size)


def test_caption_grammar_and_parse_round_trip():
    short_rx = re.compile(r"a (\w+) (\w+) on the (\w+)")
    long_rx = re.compile(r"a (small|large) (\w+) (\w+) on the (\w+), on a plain ([a-z ]+) background")
    data = ShapesDataset(seed=2)
    for i in range(50):
        sample = data[i]
        short, long = sample["captions"]["short"], sample["captions"]["long"]
        color, shape, position = short_rx.fullmatch(short).groups()
        assert color in COLORS and shape in SHAPES and position in POSITIONS
        m = long_rx.fullmatch(long)
        assert m and m.group(2, 3, 4) == (color, shape, position)
        assert parse_prompt(short) == parse_prompt(long) == (color, shape, position)
        assert sample["key"] == f"shapes-2-{i:07d}"


def test_background_is_dark_and_shape_is_bright():
    pixels = np.asarray(ShapesDataset(size=64)[0]["image"])
    assert pixels[0, 0].max() < 50  # a corner is never covered by the shape
    assert pixels.max() > 200


def test_eval_prompts_cover_every_colour_and_position():
    assert len(SHAPES_PROMPTS) >= 30
    parsed = [parse_prompt(p) for p in SHAPES_PROMPTS]
    assert {c for c, _, _ in parsed} == set(COLORS)
    assert {s for _, s, _ in parsed} == set(SHAPES)
    assert {(c, p) for c, _, p in parsed} == {(c, p) for c in COLORS for p in POSITIONS}


def test_parse_prompt_rejects_other_text():
    with pytest.raises(UserError):
        parse_prompt("a photo of a dog")


def test_index_bounds():
    data = ShapesDataset(length=3)
    assert len(data) == 3 and data[-1]["key"] == data[2]["key"]
    with pytest.raises(IndexError):
        data[3]
