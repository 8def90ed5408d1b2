"""The pixel-only judge of `synthetic_shapes` captions.

It is validated against the data set's own ground truth (the `objects` feature), and
the false captions are built here by string edits of true captions and ground-truth
objects, never through the judge's parser, so a parser bug cannot hide itself.
"""

import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dalle_jax.data import synthetic_shapes as ss
from dalle_jax.evaluation import judge as J

# Typed out, not imported, so a change to the data set's names shows up here.
COLOURS = ["red", "green", "blue", "yellow", "magenta", "cyan"]
SHAPES = ["circle", "square", "triangle"]
CELLS = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}
SWAPPED = {"to the left of": "to the right of", "to the right of": "to the left of",
           "above": "below", "below": "above"}


def _examples(size, n, seed=0, splits=("train", "heldout")):
    """n examples straight from the generator, split evenly over `splits`."""
    per = n // len(splits)
    return [ss.generate_example(seed, split, i, size) for split in splits for i in range(per)]


def _truth(example):
    o = example["objects"]
    return [{"colour": c, "shape": s, "row": int(r), "col": int(k)}
            for c, s, r, k in zip(o["colour"], o["shape"], o["row"], o["col"])]


@pytest.fixture(scope="module")
def ex32():
    return _examples(32, 600)


@pytest.fixture(scope="module")
def ex64():
    return _examples(64, 200)


# ------------------------------------------------------------------ find_objects

@pytest.mark.parametrize("size", [32, 64, 256])
def test_find_objects_agrees_with_ground_truth(size, ex32, ex64):
    examples = {32: ex32, 64: ex64}.get(size) or _examples(256, 100)
    score = J.agreement([e["image"] for e in examples], [e["objects"] for e in examples])
    print(f"agreement at {size} px over {len(examples)} examples: {score:.4f}")
    assert score >= 0.99


def test_find_objects_rows_look_like_the_objects_feature(ex32):
    for example in ex32[:50]:
        found = J.find_objects(example["image"])
        assert all(set(o) == {"colour", "shape", "row", "col"} for o in found)
        assert found == sorted(found, key=lambda o: (o["row"], o["col"]))
        assert found == _truth(example)


def test_mildly_noisy_images_still_agree(ex32):
    """Generated images are not pixel-perfect; gaussian noise (sigma 10) must not matter."""
    rng = np.random.default_rng(0)
    images = [np.clip(e["image"] + rng.normal(0, 10, e["image"].shape), 0, 255).astype(np.uint8)
              for e in ex32[:200]]
    assert J.agreement(images, [e["objects"] for e in ex32[:200]]) >= 0.99


@pytest.mark.parametrize("size", [32, 64, 256])
def test_blank_and_noise_images_have_no_objects(size):
    rng = np.random.default_rng(size)
    dark = np.full((size, size, 3), 15.0)
    for image in (np.zeros((size, size, 3)), np.full((size, size, 3), 200),
                  rng.integers(0, 256, (size, size, 3)),           # uniform noise
                  np.clip(dark + rng.normal(0, 20, dark.shape), 0, 255)):  # noisy background
        assert J.find_objects(image.astype(np.uint8)) == []


def test_tiny_specks_are_ignored():
    image = np.zeros((64, 64, 3), np.uint8)
    image[10:12, 10:12] = (230, 40, 40)  # 4 px, well below an object's size
    assert J.find_objects(image) == []


def _draw(size, boxes):
    """An image with squares/circles at given (shape, colour, x0, y0, x1, y1) boxes."""
    canvas = Image.new("RGB", (size, size), (10, 10, 10))
    draw = ImageDraw.Draw(canvas)
    for shape, colour, *box in boxes:
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=ss.COLOURS[colour])
    return np.asarray(canvas)


def test_objects_touching_across_a_cell_border_are_two():
    image = _draw(64, [("square", "red", 18, 4, 31, 17), ("square", "red", 32, 6, 45, 19)])
    assert J.find_objects(image) == [
        {"colour": "red", "shape": "square", "row": 0, "col": 0},
        {"colour": "red", "shape": "square", "row": 0, "col": 1}]


def test_object_spilling_over_a_cell_border_stays_one():
    image = _draw(64, [("circle", "blue", 8, 8, 35, 27)])  # 4 of 28 columns past x=32
    assert J.find_objects(image) == [{"colour": "blue", "shape": "circle", "row": 0, "col": 0}]


def test_label_components_handles_winding_blobs():
    """A spiral needs many propagation steps; diagonal neighbours are not connected."""
    mask = np.zeros((9, 9), bool)
    mask[0, :] = mask[:, 8] = mask[8, :] = mask[2:, 0] = mask[2, :7] = mask[2:7, 6] = True
    mask[4, 2] = True  # isolated
    mask[5, 3] = True  # touches (4, 2) only diagonally
    labels = J.label_components(mask)
    assert labels.max() == 2 and (labels[~mask] == -1).all()
    assert len(set(labels[mask & (labels != labels[4, 2]) & (labels != labels[5, 3])])) == 1
    assert labels[4, 2] != labels[5, 3]


def test_agreement_accepts_tfds_class_label_indices():
    example = ss.generate_example(0, "train", 1, 32)
    o = example["objects"]
    as_indices = {"colour": [COLOURS.index(c) for c in o["colour"]],
                  "shape": [SHAPES.index(s) for s in o["shape"]], "row": o["row"], "col": o["col"]}
    assert J.agreement([example["image"]], [as_indices]) == 1.0
    assert J.agreement([example["image"]], [_truth(example)]) == 1.0


# ------------------------------------------------------------------ parse_caption

def test_parse_caption_reads_every_template():
    spec = J.parse_caption("a red circle in the top left and a blue square")
    assert spec == J.CaptionSpec((J.ObjectSpec("red", "circle", (0, 0)),
                                  J.ObjectSpec("blue", "square", None)), None)
    spec = J.parse_caption("  A Green  Triangle to the right of a cyan circle. ")
    assert spec.relation == "right" and [o.shape for o in spec.objects] == ["triangle", "circle"]
    assert J.parse_caption("a yellow square below a magenta square").relation == "below"
    assert J.parse_caption("a yellow square above a magenta square").relation == "above"
    assert J.parse_caption("a red square to the left of a red circle").relation == "left"
    assert J.parse_caption("a cyan circle in the bottom right").objects[0].cell == (1, 1)


@pytest.mark.parametrize("caption", [
    "", "a purple circle", "a red hexagon", "a red circle in the middle",
    "a red circle near a blue square", "a red circle and", "red circle",
    "a red circle and a blue square and a green triangle"])
def test_parse_caption_rejects_other_text(caption):
    with pytest.raises(ValueError, match=re.escape(repr(caption))):
        J.parse_caption(caption)


def test_generated_captions_parse_to_their_objects(ex32):
    for example in ex32:
        spec = J.parse_caption(example["caption"])
        named = sorted((o.colour, o.shape) for o in spec.objects)
        assert named == sorted((o["colour"], o["shape"]) for o in _truth(example))


# ------------------------------------------------------------------ judge / matches

def test_true_captions_match(ex32, ex64):
    for example in ex32[:300] + ex64[:100]:
        result = J.judge(example["image"], example["caption"])
        assert result["match"] and J.matches(example["image"], example["caption"]), (
            example["caption"], result)


def _other(value, pool, salt):
    choices = [v for v in pool if v != value]
    return choices[salt % len(choices)]


def _mutations(example, salt):
    """(kind, false caption, attribute the judge must flag) built by editing strings."""
    caption, objs = example["caption"], _truth(example)
    first = re.match(r"a (\w+) (\w+)", caption)
    colour, shape = first.groups()
    yield ("colour", f"a {_other(colour, COLOURS, salt)} {shape}" + caption[first.end():],
           "colour")
    yield ("shape", f"a {colour} {_other(shape, SHAPES, salt)}" + caption[first.end():], "shape")
    # Every object named with its cell, the first one's cell wrong.
    cells = [CELLS[(o["row"], o["col"])] for o in objs]
    cells[0] = _other(cells[0], list(CELLS.values()), salt)
    yield "position", " and ".join(f"a {o['colour']} {o['shape']} in the {cell}"
                                   for o, cell in zip(objs, cells)), "position"
    o = objs[0]
    for relation, opposite in SWAPPED.items():
        # With two identical objects, "X above X" and "X below X" are both true.
        if f" {relation} " in caption and objs[0]["colour"] + objs[0]["shape"] != (
                objs[1]["colour"] + objs[1]["shape"]):
            yield "relation", caption.replace(f" {relation} ", f" {opposite} "), "relation"
    if len(objs) == 1:
        extra = f"a {_other(o['colour'], COLOURS, salt)} {SHAPES[salt % 3]}"
        yield "extra object named", f"{caption} and {extra}", "count"
    else:
        yield "object left unnamed", f"a {o['colour']} {o['shape']}", "count"


def test_mutated_captions_do_not_match(ex32, ex64):
    kinds = set()
    for salt, example in enumerate(ex32[:150] + ex64[:50]):
        for kind, caption, attribute in _mutations(example, salt):
            result = J.judge(example["image"], caption)
            assert not result["match"] and not J.matches(example["image"], caption), (
                kind, example["caption"], caption, result)
            assert result[attribute] is False, (kind, caption, result)
            kinds.add(kind)
    assert len(kinds) == 6


def test_image_with_an_object_erased_does_not_match(ex32):
    two = [e for e in ex32 if len(e["objects"]["shape"]) == 2][:30]
    for example in two:
        image = example["image"].copy()
        r, c = int(example["objects"]["row"][0]), int(example["objects"]["col"][0])
        image[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = image[0 if r else 31, 0 if c else 31]
        result = J.judge(image, example["caption"])
        assert not result["match"] and result["count"] is False


def test_channel_rotated_reconstruction_does_not_match(ex32):
    """(R, G, B) -> (G, B, R) moves every palette colour to another palette colour."""
    for example in ex32[:100]:
        result = J.judge(example["image"][..., [1, 2, 0]], example["caption"])
        assert not result["match"] and result["colour"] is False
        assert result["shape"] is True  # the silhouettes are unchanged


def test_judge_reports_unstated_attributes_as_none():
    example = next(e for e in _examples(32, 40) if len(e["objects"]["shape"]) == 1)
    o = _truth(example)[0]
    result = J.judge(example["image"], f"a {o['colour']} {o['shape']}")
    assert result["match"] and result["position"] is None and result["relation"] is None
