import numpy as np
import pytest

from daybreak.data.shapes import SHAPES_PROMPTS, ShapesDataset, parse_prompt, render
from daybreak.evaluate.adherence import adherence, judge, patch_seam, rates


@pytest.mark.parametrize("size,n", [(32, 120), (64, 40)])
def test_judge_reads_the_datasets_own_images(size, n):
    data = ShapesDataset(size=size, seed=11)
    samples = [data[i] for i in range(n)]
    score, items = adherence([s["image"] for s in samples], [s["captions"]["long"] for s in samples])
    assert score == 1.0, [i for i in items if not i["hit"]][:5]  # colour, shape and position, every one
    assert rates(items) == {"color": 1.0, "shape": 1.0, "position": 1.0, "all": 1.0}


def test_shape_is_judged_apart_from_colour_and_position():
    from PIL import Image, ImageDraw

    big = Image.new("RGB", (128, 128), (8, 8, 10))
    ImageDraw.Draw(big).rounded_rectangle((40, 40, 88, 88), radius=6, fill=(235, 30, 30))
    assert judge(big.resize((32, 32), Image.BOX)) == ("red", "square", "center")  # slightly rounded corners
    blob = render("red", "circle", 0.5, 0.5, 0.18, "black", 32)
    item = adherence([blob], ["a red triangle on the center"])[1][0]
    assert (item["shape"], item["color_ok"], item["shape_ok"], item["position_ok"], item["hit"]) == (
        "circle", True, False, True, False)


def test_patch_seam_against_hand_made_grids():
    # 32 px, patch 8: per direction 3 border and 28 inside neighbour pairs per row (or column)
    ramp = np.tile((np.arange(32) * 4).astype(np.uint8)[None, :, None], (32, 1, 3))  # +4 a column
    assert patch_seam([ramp], 8) == pytest.approx(1.0)  # border mean (3·4 + 3·0)/6 = inside mean (28·4 + 28·0)/56
    tiles = ramp.copy()
    tiles[:, 8:16] += 10  # one patch column brighter: steps of 4+10 and |4-10| at borders 8 and 16
    assert patch_seam([tiles], 8) == pytest.approx(((14 + 6 + 4) / 6) / 2.0)


def test_blank_image_is_a_miss():
    blank = np.full((32, 32, 3), 20, dtype=np.uint8)
    assert judge(blank) == (None, None, None)
    score, items = adherence([blank], ["a red circle on the left"])
    assert score == 0.0 and items[0]["hit"] is False


def test_wrong_colour_is_a_miss_right_one_a_hit():
    image = render("blue", "square", 0.28, 0.5, 0.18, "black", 32)
    assert judge(image) == ("blue", "square", "left")
    score, items = adherence([image, image], ["a red square on the left", "a blue square on the left"])
    assert score == 0.5 and [i["hit"] for i in items] == [False, True]


def test_wrong_position_is_a_miss():
    image = render("yellow", "circle", 0.5, 0.72, 0.12, "dark gray", 32)
    assert judge(image) == ("yellow", "circle", "bottom")
    assert adherence([image], ["a yellow circle on the top"])[0] == 0.0


def test_every_eval_prompt_drawn_exactly_is_judged_right():
    from daybreak.data.shapes import POSITIONS

    images = []
    for prompt in SHAPES_PROMPTS:
        color, shape, position = parse_prompt(prompt)
        images.append(render(color, shape, *POSITIONS[position], 0.12, "charcoal", 32))
    assert adherence(images, SHAPES_PROMPTS)[0] == 1.0
