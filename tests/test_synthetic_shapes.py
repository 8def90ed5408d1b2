"""Tests of the `synthetic_shapes` TFDS builder against its written spec.

The reference values here (palette, names, held-out pairs, caption grammar) are typed
out from the spec rather than imported from the module, so a change to the module's
constants shows up as a failure instead of silently moving the goalposts.
"""

import itertools
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dalle_jax.data import synthetic_shapes as ss

PALETTE = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235),
    "yellow": (235, 215, 40), "magenta": (220, 50, 220), "cyan": (40, 215, 225),
}
SHAPE_NAMES = ["circle", "square", "triangle"]
COLOUR_NAMES = ["red", "green", "blue", "yellow", "magenta", "cyan"]
CELL_NAMES = {"top left": (0, 0), "top right": (0, 1),
              "bottom left": (1, 0), "bottom right": (1, 1)}
HELDOUT = {("yellow", "triangle"), ("blue", "circle"), ("cyan", "square"),
           ("magenta", "circle")}

SIZES = dict(num_train=300, num_validation=150, num_heldout=150)


def _build(data_dir, image_size=32, seed=0):
    config = ss.make_config(image_size=image_size, seed=seed, **SIZES)
    builder = tfds.builder("synthetic_shapes", config=config, data_dir=str(data_dir))
    builder.download_and_prepare(file_format="array_record")
    return builder


def _read_split(builder, split):
    """All records of a split as plain python: image array, caption str, objects list."""
    source = builder.as_data_source(split)
    out = []
    for i in range(len(source)):
        record = source[i]
        caption = record["caption"]
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8")
        objs = record["objects"]
        objects = [
            {"shape": SHAPE_NAMES[int(s)], "colour": COLOUR_NAMES[int(c)],
             "row": int(r), "col": int(k)}
            for s, c, r, k in zip(objs["shape"], objs["colour"], objs["row"], objs["col"])
        ]
        out.append({"image": np.asarray(record["image"]), "caption": caption,
                    "objects": objects})
    return out


def _from_generator(example):
    """generate_example's output in the same form as _read_split's records."""
    o = example["objects"]
    objects = [{"shape": s, "colour": c, "row": int(r), "col": int(k)}
               for s, c, r, k in zip(o["shape"], o["colour"], o["row"], o["col"])]
    return {"image": example["image"], "caption": example["caption"], "objects": objects}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    builder = _build(tmp_path_factory.mktemp("shapes_a"))
    return builder, {split: _read_split(builder, split)
                     for split in ("train", "validation", "heldout")}


# ---------------------------------------------------------------- caption parser

_C = "(red|green|blue|yellow|magenta|cyan)"
_S = "(circle|square|triangle)"
_P = "(top left|top right|bottom left|bottom right)"
_OBJ = rf"a {_C} {_S}(?: in the {_P})?"
_REL = "(to the left of|to the right of|above|below)"
_SINGLE = re.compile(rf"^{_OBJ}$")
_AND = re.compile(rf"^{_OBJ} and {_OBJ}$")
_RELATION = re.compile(rf"^a {_C} {_S} {_REL} a {_C} {_S}$")


def parse_caption(text):
    """-> (kind, mentions, relation); mentions are dicts with colour, shape, cell|None."""
    if m := _SINGLE.match(text):
        c, s, p = m.groups()
        return ("single_pos" if p else "single",
                [{"colour": c, "shape": s, "cell": CELL_NAMES.get(p)}], None)
    if m := _AND.match(text):
        c1, s1, p1, c2, s2, p2 = m.groups()
        if (p1 is None) != (p2 is None):
            raise AssertionError(f"only one position stated: {text!r}")
        mentions = [{"colour": c1, "shape": s1, "cell": CELL_NAMES.get(p1)},
                    {"colour": c2, "shape": s2, "cell": CELL_NAMES.get(p2)}]
        return ("and_pos" if p1 else "and", mentions, None)
    if m := _RELATION.match(text):
        c1, s1, rel, c2, s2 = m.groups()
        mentions = [{"colour": c1, "shape": s1, "cell": None},
                    {"colour": c2, "shape": s2, "cell": None}]
        kind = "left_right" if "left" in rel or "right" in rel else "above_below"
        return kind, mentions, rel
    raise AssertionError(f"caption matches no template: {text!r}")


def _relation_holds(rel, a, b):
    if rel == "to the left of":
        return a["row"] == b["row"] and a["col"] < b["col"]
    if rel == "to the right of":
        return a["row"] == b["row"] and a["col"] > b["col"]
    if rel == "above":
        return a["col"] == b["col"] and a["row"] < b["row"]
    if rel == "below":
        return a["col"] == b["col"] and a["row"] > b["row"]
    raise AssertionError(rel)


def check_caption(text, objects):
    """Asserts the caption is a true, complete description of `objects`; returns kind."""
    assert len(objects) in (1, 2), objects
    cells = [(o["row"], o["col"]) for o in objects]
    assert len(set(cells)) == len(cells), f"objects share a cell: {objects}"
    assert all(r in (0, 1) and c in (0, 1) for r, c in cells), objects
    assert text == text.lower(), text
    kind, mentions, rel = parse_caption(text)
    assert len(mentions) == len(objects), (text, objects)

    def consistent(perm):
        for mention, obj in zip(mentions, perm):
            if (mention["colour"], mention["shape"]) != (obj["colour"], obj["shape"]):
                return False
            if mention["cell"] is not None and mention["cell"] != (obj["row"], obj["col"]):
                return False
        return rel is None or _relation_holds(rel, perm[0], perm[1])

    assert any(consistent(p) for p in itertools.permutations(objects)), (text, objects)
    return kind


def test_parser_rejects_false_captions():
    # The checker itself must be able to fail, or the caption tests prove nothing.
    objs = [{"shape": "circle", "colour": "red", "row": 0, "col": 0},
            {"shape": "square", "colour": "blue", "row": 0, "col": 1}]
    assert check_caption("a red circle to the left of a blue square", objs) == "left_right"
    assert check_caption("a blue square to the right of a red circle", objs) == "left_right"
    for bad in ["a red circle to the right of a blue square",
                "a red circle above a blue square",
                "a red circle in the bottom left and a blue square in the top right",
                "a red circle",
                "a green circle and a blue square",
                "a red circle and a blue square and a red circle",
                "A red circle and a blue square"]:
        with pytest.raises(AssertionError):
            check_caption(bad, objs)


# ---------------------------------------------------------------- determinism

def test_builds_are_byte_identical(built, tmp_path):
    builder_a, data_a = built
    builder_b = _build(tmp_path / "shapes_b")
    assert builder_a.data_dir != builder_b.data_dir
    for split, records_a in data_a.items():
        records_b = _read_split(builder_b, split)
        assert len(records_a) == len(records_b) == SIZES[f"num_{split}"]
        for a, b in zip(records_a, records_b):
            assert a["image"].tobytes() == b["image"].tobytes()
            assert a["caption"] == b["caption"]
            assert a["objects"] == b["objects"]


def test_records_are_generate_example_in_index_order(built):
    _, data = built
    for split, records in data.items():
        for i in (0, 1, len(records) // 2, len(records) - 1):
            expected = _from_generator(ss.generate_example(0, split, i, 32))
            assert np.array_equal(records[i]["image"], expected["image"])
            assert records[i]["caption"] == expected["caption"]
            assert records[i]["objects"] == expected["objects"]


def test_generate_example_is_deterministic_and_seeded():
    for split in ("train", "validation", "heldout"):
        for i in range(20):
            a = ss.generate_example(0, split, i, 64)
            b = ss.generate_example(0, split, i, 64)
            assert a["image"].tobytes() == b["image"].tobytes()
            assert a["caption"] == b["caption"]
            assert _from_generator(a)["objects"] == _from_generator(b)["objects"]
    # Seed, split and index must all matter.
    images = {ss.generate_example(s, sp, i, 32)["image"].tobytes()
              for s in (0, 1) for sp in ("train", "validation") for i in (0, 1)}
    assert len(images) == 8


# ---------------------------------------------------------------- held-out pairs

def test_heldout_guarantee_over_whole_splits(built):
    _, data = built
    for split in ("train", "validation"):
        for rec in data[split]:
            pairs = {(o["colour"], o["shape"]) for o in rec["objects"]}
            assert not pairs & HELDOUT, (split, rec["caption"])
    seen_heldout = set()
    for rec in data["heldout"]:
        pairs = {(o["colour"], o["shape"]) for o in rec["objects"]}
        assert pairs & HELDOUT, rec["caption"]
        seen_heldout |= pairs & HELDOUT
    assert seen_heldout == HELDOUT


# ---------------------------------------------------------------- captions

def test_captions_agree_with_objects(built):
    _, data = built
    for split, records in data.items():
        for rec in records:
            check_caption(rec["caption"], rec["objects"])


# ---------------------------------------------------------------- pixels

def _check_pixels(image, objects):
    size = image.shape[0]
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    cell = size // 2
    occupied = {(o["row"], o["col"]) for o in objects}
    empty = [c for c in CELL_NAMES.values() if c not in occupied]
    assert len(empty) >= 2
    r, c = empty[0]
    background = image[r * cell, c * cell].astype(int)
    assert np.all((background >= 0) & (background <= 30)), background
    diff = np.abs(image.astype(int) - background).max(axis=-1)
    # Uniform background: nothing but the objects' cells differs from it at all.
    for (r, c) in empty:
        assert not diff[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].any()
    outside = np.ones((size, size), bool)
    for (r, c) in occupied:
        outside[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = False
    assert not diff[outside].any()

    slack = max(1, size // 32)  # anti-aliased edge pixels may or may not pass the threshold
    for obj in objects:
        r, c = obj["row"], obj["col"]
        in_cell = diff[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] > 60
        ys, xs = np.nonzero(in_cell)
        assert len(ys), obj
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        width, height = x1 - x0, y1 - y0
        assert 0.5 * cell - slack <= width <= 0.8 * cell + slack, (obj, width, cell)
        # A triangle's apex row is barely covered, so its box may look a bit short.
        apex_slack = 2 * slack if obj["shape"] == "triangle" else slack
        assert 0.5 * cell - apex_slack <= height <= 0.8 * cell + slack, (obj, height)
        # The box is wholly inside its cell: nothing brighter leaks past its edge.
        region = image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].astype(float)
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        if obj["shape"] == "triangle":
            # Apex up: the top quarter is much narrower than the bottom quarter.
            top = in_cell[y0:y0 + max(1, height // 4)].sum(axis=1).max()
            bottom = in_cell[y1 - max(1, height // 4):y1].sum(axis=1).max()
            assert top < bottom, obj
            # Points safely inside: low and central, where the triangle is widest.
            ty = int(y0 + 0.75 * height)
            patch = region[ty - 1:ty + 1, int(cx) - 1:int(cx) + 1]
        else:
            if obj["shape"] == "circle":
                assert abs(width - height) <= slack, (obj, width, height)
                # A circle leaves its box's corners dark; a square fills them.
                assert not in_cell[y0, x0] and not in_cell[y1 - 1, x1 - 1], obj
            else:
                assert in_cell[y0 + 1, x0 + 1] and in_cell[y1 - 2, x1 - 2], obj
            patch = region[int(cy) - 1:int(cy) + 2, int(cx) - 1:int(cx) + 2]
        mean = patch.reshape(-1, 3).mean(axis=0)
        expected = np.array(PALETTE[obj["colour"]], float)
        assert np.all(np.abs(mean - expected) <= 20), (obj, mean, expected)


def test_pixels_match_spec_in_built_split(built):
    _, data = built
    backgrounds, objects, anti_aliased = set(), 0, 0
    for split, records in data.items():
        for rec in records:
            image = rec["image"]
            _check_pixels(image, rec["objects"])
            cell = image.shape[0] // 2
            if (1, 1) not in {(o["row"], o["col"]) for o in rec["objects"]}:
                backgrounds.add(tuple(image[-1, -1]))
            for o in rec["objects"]:
                region = image[o["row"] * cell:(o["row"] + 1) * cell,
                               o["col"] * cell:(o["col"] + 1) * cell]
                objects += 1
                # Background, fill and something in between: edges are blended.
                anti_aliased += len(np.unique(region.reshape(-1, 3), axis=0)) > 2
    assert len(backgrounds) > 50  # the background really is drawn per image
    # Only a square that happens to sit on the pixel grid has no blended edge.
    assert anti_aliased > 0.9 * objects, (anti_aliased, objects)


@pytest.mark.parametrize("image_size", [64, 256])
def test_pixels_match_spec_at_larger_sizes(image_size):
    for i in range(25 if image_size == 64 else 8):
        ex = _from_generator(ss.generate_example(3, "heldout", i, image_size))
        _check_pixels(ex["image"], ex["objects"])
        # Same rng draws at every size: the scene and caption do not depend on it.
        small = _from_generator(ss.generate_example(3, "heldout", i, 32))
        assert small["objects"] == ex["objects"] and small["caption"] == ex["caption"]


def test_pixel_checker_can_fail():
    ex = _from_generator(ss.generate_example(0, "train", 5, 32))
    _check_pixels(ex["image"], ex["objects"])
    wrong_colour = [dict(o, colour="green" if o["colour"] != "green" else "red")
                    for o in ex["objects"]]
    with pytest.raises(AssertionError):
        _check_pixels(ex["image"], wrong_colour)
    moved = [dict(o, row=1 - o["row"]) for o in ex["objects"]]
    if len({(o["row"], o["col"]) for o in moved} & {(o["row"], o["col"]) for o in ex["objects"]}) == 0:
        with pytest.raises(AssertionError):
            _check_pixels(ex["image"], moved)
    bright = ex["image"].copy()
    bright[:, :] = np.maximum(bright, 200)
    with pytest.raises(AssertionError):
        _check_pixels(bright, ex["objects"])


# ---------------------------------------------------------------- statistics

def test_split_statistics(built):
    _, data = built
    train = data["train"]
    shapes = {o["shape"] for r in train for o in r["objects"]}
    colours = {o["colour"] for r in train for o in r["objects"]}
    cells = {(o["row"], o["col"]) for r in train for o in r["objects"]}
    counts = [len(r["objects"]) for r in train]
    kinds = {check_caption(r["caption"], r["objects"]) for r in train}
    assert shapes == set(SHAPE_NAMES)
    assert colours == set(COLOUR_NAMES)
    assert cells == set(CELL_NAMES.values())
    assert set(counts) == {1, 2}
    assert 0.35 < np.mean(np.array(counts) == 2) < 0.65
    assert kinds == {"single", "single_pos", "and", "and_pos", "left_right", "above_below"}
    # Over every split, relations in both directions are used.
    rels = {parse_caption(r["caption"])[2] for recs in data.values() for r in recs}
    assert {"to the left of", "to the right of", "above", "below"} <= rels


# ---------------------------------------------------------------- configs

def test_configs_and_registration(tmp_path):
    assert "synthetic_shapes" in tfds.list_builders()
    default = tfds.builder("synthetic_shapes", data_dir=str(tmp_path))
    assert default.builder_config.name == "32"
    assert default.info.features["image"].shape == (32, 32, 3)
    assert [c.name for c in ss.SyntheticShapes.BUILDER_CONFIGS] == ["32", "64", "256"]
    for size in (32, 64, 256):
        predefined = ss.make_config(size)
        assert predefined.name == str(size) and predefined.image_size == size
        assert ss.make_config(size, num_train=predefined.num_train, seed=0) is predefined
    custom = ss.make_config(64, num_train=10, num_validation=11, num_heldout=12, seed=3)
    assert custom.name == "64px_t10_v11_h12_s3"
    names = {ss.make_config(32, num_train=10).name, ss.make_config(32, num_validation=10).name,
             ss.make_config(32, num_heldout=10).name, ss.make_config(32, seed=1).name,
             ss.make_config(64, num_train=10).name}
    assert len(names) == 5 and not names & {"32", "64", "256"}
    b = tfds.builder("synthetic_shapes", config=custom, data_dir=str(tmp_path))
    assert b.info.features["image"].shape == (64, 64, 3)
    assert "64px_t10_v11_h12_s3" in str(b.data_dir)


@pytest.mark.parametrize("kwargs,bad", [
    (dict(image_size=48), "48"),
    (dict(image_size=128), "128"),
    (dict(num_train=0), "num_train"),
    (dict(num_validation=-3), "-3"),
    (dict(num_heldout=0), "num_heldout"),
    (dict(seed=-1), "-1"),
])
def test_bad_config_values_raise(kwargs, bad):
    with pytest.raises(ValueError, match=re.escape(bad)):
        ss.make_config(**kwargs)


def test_bad_config_direct_construction_raises():
    with pytest.raises(ValueError, match="100"):
        ss.SyntheticShapesConfig(name="x", image_size=100)
    with pytest.raises(ValueError, match="split"):
        ss.generate_example(0, "test", 0, 32)


class _Recording:
    """A numpy Generator stand-in that records every draw `render` makes, or replays a list."""

    def __init__(self, rng=None, replay=None):
        self.rng, self.replay, self.draws = rng, replay, []

    def _next(self, name, *args, **kwargs):
        if self.replay is not None:
            return self.replay.pop(0)
        value = getattr(self.rng, name)(*args, **kwargs)
        self.draws.append(value)
        return value

    def integers(self, *args, **kwargs):
        return self._next("integers", *args, **kwargs)

    def uniform(self, *args, **kwargs):
        return self._next("uniform", *args, **kwargs)


@pytest.mark.parametrize("image_size", [32, 64])
def test_without_objects_is_the_scene_rendered_without_them(image_size):
    """The reference renders the smaller scene with the kept objects' own draws (size,
    place, colour jitter), replayed from rendering the whole scene."""
    checked = 0
    for index in range(60):
        rng = np.random.default_rng([7, index])
        scene = ss.sample_scene(rng, "train")
        recording = _Recording(rng)
        image = ss.render(scene, image_size, recording)
        background, per_object = recording.draws[0], recording.draws[1:]
        assert len(per_object) == 3 * len(scene)  # side, (x, y) jitter, colour jitter
        for removed in ss.removals(scene):
            kept = [o for o in scene if o not in removed]
            replay = [background] + [draw for i, o in enumerate(scene) if o in kept
                                     for draw in per_object[3 * i:3 * i + 3]]
            expected = ss.render(kept, image_size, _Recording(replay=replay))
            np.testing.assert_array_equal(ss.without_objects(image, scene, removed), expected)
            checked += 1
    assert checked > 80


def test_removals_take_out_each_object_and_then_all():
    one = [{"shape": "circle", "colour": "red", "row": 0, "col": 1}]
    two = one + [{"shape": "square", "colour": "blue", "row": 1, "col": 1}]
    assert ss.removals(one) == [one]
    assert ss.removals(two) == [[two[0]], [two[1]], two]
