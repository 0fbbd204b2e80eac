import numpy as np
import pytest

from daybreak.data.shapes import SHAPES_PROMPTS, ShapesDataset, parse_prompt, render
from daybreak.evaluate.adherence import adherence, judge


@pytest.mark.parametrize("size", [32, 64])
def test_judge_reads_the_datasets_own_images(size):
    data = ShapesDataset(size=size, seed=11)
    samples = [data[i] for i in range(200)]
    score, items = adherence([s["image"] for s in samples], [s["captions"]["long"] for s in samples])
    assert score >= 0.98, [i for i in items if not i["hit"]][:5]


def test_blank_image_is_a_miss():
    blank = np.full((32, 32, 3), 20, dtype=np.uint8)
    assert judge(blank) == (None, None)
    score, items = adherence([blank], ["a red circle on the left"])
    assert score == 0.0 and items[0]["hit"] is False


def test_wrong_colour_is_a_miss_right_one_a_hit():
    image = render("blue", "square", 0.28, 0.5, 0.18, "black", 32)
    assert judge(image) == ("blue", "left")
    score, items = adherence([image, image], ["a red square on the left", "a blue circle on the left"])
    assert score == 0.5 and [i["hit"] for i in items] == [False, True]


def test_wrong_position_is_a_miss():
    image = render("yellow", "circle", 0.5, 0.72, 0.12, "dark gray", 32)
    assert judge(image) == ("yellow", "bottom")
    assert adherence([image], ["a yellow circle on the top"])[0] == 0.0


def test_every_eval_prompt_drawn_exactly_is_judged_right():
    from daybreak.data.shapes import POSITIONS

    images = []
    for prompt in SHAPES_PROMPTS:
        color, shape, position = parse_prompt(prompt)
        images.append(render(color, shape, *POSITIONS[position], 0.12, "charcoal", 32))
    assert adherence(images, SHAPES_PROMPTS)[0] == 1.0
