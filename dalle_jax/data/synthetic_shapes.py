"""`synthetic_shapes`: a procedurally generated text-to-image data set.

Coloured circles, squares and triangles on a dark background in a 2x2 grid, with
English captions that are true of the picture. It exists so the whole DALL-E
pipeline can be trained and judged on a CPU without downloads: every example is a
pure function of (seed, split, index), and the structured `objects` feature lets an
evaluator check generated images against the caption they were conditioned on.

The `heldout` split holds colour-shape pairs that `train` and `validation` never
show, to measure compositional generalisation.

Usage::

    import tensorflow_datasets as tfds
    from dalle_jax.data import synthetic_shapes

    b = tfds.builder('synthetic_shapes', config=synthetic_shapes.make_config(),
                     data_dir=DIR)
    b.download_and_prepare(file_format='array_record')
    src = b.as_data_source('train')   # src[i] is generate_example(seed, 'train', i)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 215, 225),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (0, 1): "top right",
    (1, 0): "bottom left",
    (1, 1): "bottom right",
}
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("yellow", "triangle"), ("blue", "circle"), ("cyan", "square"), ("magenta", "circle")}
)
# The index of a split is part of every example's rng seed, so this order is frozen.
SPLITS: tuple[str, ...] = ("train", "validation", "heldout")
IMAGE_SIZES: tuple[int, ...] = (32, 64, 256)

BACKGROUND_MAX = 30
COLOUR_JITTER = 15
BOX_FRACTION = (0.55, 0.75)
# Geometry is drawn at this many pixels or more, then box-filtered down, which gives
# anti-aliased edges whose look does not depend much on the output size.
MIN_SUPERSAMPLED_SIZE = 256

# Sorted lists, not sets, so rng.integers(len(...)) indexes a stable order.
_ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
_SEEN_PAIRS = tuple(p for p in _ALL_PAIRS if p not in HELDOUT_PAIRS)
_HELDOUT_LIST = tuple(sorted(HELDOUT_PAIRS))

# Default split sizes per image size, chosen so each predefined build takes roughly
# 15-25 s on a 2-core CPU (about 1.5 ms per example at 32/64 px, most of it TFDS
# encoding; about 10 ms at 256 px, where PNG encoding dominates). Larger sets: make_config.
_DEFAULT_SIZES: dict[int, tuple[int, int, int]] = {
    32: (10000, 1000, 1000),
    64: (10000, 1000, 1000),
    256: (1000, 200, 200),
}


@dataclasses.dataclass(eq=False, kw_only=True)
class SyntheticShapesConfig(tfds.core.BuilderConfig):
    """Image size, split sizes and seed of one `synthetic_shapes` build.

    Not frozen: tfds.core.BuilderConfig itself is a non-frozen dataclass, and Python
    refuses a frozen dataclass that inherits from a non-frozen one. eq=False keeps
    identity hashing, which TFDS relies on to tell predefined configs from custom ones.
    """

    image_size: int = 32
    num_train: int = _DEFAULT_SIZES[32][0]
    num_validation: int = _DEFAULT_SIZES[32][1]
    num_heldout: int = _DEFAULT_SIZES[32][2]
    seed: int = 0

    def __post_init__(self):
        _validate(self.image_size, self.num_train, self.num_validation,
                  self.num_heldout, self.seed)

    def split_size(self, split: str) -> int:
        return {"train": self.num_train, "validation": self.num_validation,
                "heldout": self.num_heldout}[split]


def _validate(image_size, num_train, num_validation, num_heldout, seed) -> None:
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size!r}")
    for name, value in (("num_train", num_train), ("num_validation", num_validation),
                        ("num_heldout", num_heldout)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _predefined(image_size: int) -> SyntheticShapesConfig:
    t, v, h = _DEFAULT_SIZES[image_size]
    return SyntheticShapesConfig(
        name=str(image_size),
        description=f"{image_size}x{image_size} px, default split sizes, seed 0.",
        image_size=image_size, num_train=t, num_validation=v, num_heldout=h, seed=0,
    )


# '32' first: TFDS takes the first config as the default.
BUILDER_CONFIGS: list[SyntheticShapesConfig] = [_predefined(s) for s in IMAGE_SIZES]
_PREDEFINED = {c.image_size: c for c in BUILDER_CONFIGS}


def make_config(image_size: int = 32, num_train: int | None = None,
                num_validation: int | None = None, num_heldout: int | None = None,
                seed: int = 0) -> SyntheticShapesConfig:
    """The predefined config for `image_size` if nothing else differs, else a new one.

    TFDS stores a build under its config name and refuses a custom config that reuses
    a predefined name, so a custom config's name spells out every value: builds with
    different sizes or seeds never share (or clobber) a data directory.
    """
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size!r}")
    default = _PREDEFINED[image_size]
    num_train = default.num_train if num_train is None else num_train
    num_validation = default.num_validation if num_validation is None else num_validation
    num_heldout = default.num_heldout if num_heldout is None else num_heldout
    _validate(image_size, num_train, num_validation, num_heldout, seed)
    if (num_train, num_validation, num_heldout, seed) == (
            default.num_train, default.num_validation, default.num_heldout, default.seed):
        return default  # TFDS checks predefined configs by identity.
    name = f"{image_size}px_t{num_train}_v{num_validation}_h{num_heldout}_s{seed}"
    return SyntheticShapesConfig(
        name=name, description=f"Custom synthetic_shapes config {name}.",
        image_size=int(image_size), num_train=int(num_train),
        num_validation=int(num_validation), num_heldout=int(num_heldout), seed=int(seed),
    )


def sample_scene(rng: np.random.Generator, split: str) -> list[dict[str, Any]]:
    """1 or 2 objects in distinct cells, sorted row-major.

    In `heldout` the first sampled object is a held-out pair and the second is any
    pair; elsewhere held-out pairs are never drawn. Cells are a random permutation,
    so the held-out object is equally likely to be in any cell.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = int(rng.integers(1, 3))
    cells = rng.permutation(4)[:n]
    if split == "heldout":
        pools = [_HELDOUT_LIST, _ALL_PAIRS]
    else:
        pools = [_SEEN_PAIRS, _SEEN_PAIRS]
    scene = []
    for cell, pool in zip(cells, pools):
        colour, shape = pool[int(rng.integers(len(pool)))]
        scene.append({"shape": shape, "colour": colour,
                      "row": int(cell) // 2, "col": int(cell) % 2})
    return sorted(scene, key=lambda o: (o["row"], o["col"]))


def builder_config_argument(config: SyntheticShapesConfig) -> SyntheticShapesConfig | str:
    """What `tfds.builder` should get as `config`: a predefined config by its name, a custom
    one as itself. A builder pickled into Grain's worker processes is rebuilt there from this
    argument, and TFDS refuses a predefined config's equal but not identical copy."""
    return config.name if _PREDEFINED.get(config.image_size) is config else config


def _supersampled_size(image_size: int) -> int:
    return max(MIN_SUPERSAMPLED_SIZE, 4 * image_size)


def render(scene: list[dict[str, Any]], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw `scene` as a (S, S, 3) uint8 image.

    The rng draws are the same in number and meaning for every image_size, so one
    (seed, split, index) gives the same picture, caption and objects at 32, 64 and
    256 px, only sharper.
    """
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size!r}")
    big = _supersampled_size(image_size)
    factor = big // image_size  # exact: all sizes divide the supersampled size.
    cell = big // 2
    background = rng.integers(0, BACKGROUND_MAX + 1, size=3)
    canvas = Image.new("RGB", (big, big), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(canvas)
    for obj in scene:
        side = int(round(rng.uniform(*BOX_FRACTION) * cell))
        jitter_x, jitter_y = rng.uniform(0.0, 1.0, size=2)
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        fill = tuple(int(c) for c in np.clip(np.array(COLOURS[obj["colour"]]) + jitter, 0, 255))
        slack = cell - side
        x0 = obj["col"] * cell + int(round(jitter_x * slack))
        y0 = obj["row"] * cell + int(round(jitter_y * slack))
        # PIL bounding boxes are inclusive, so the shape covers exactly `side` pixels.
        x1, y1 = x0 + side - 1, y0 + side - 1
        if obj["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj["shape"] == "triangle":
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj['shape']!r}")
    # Image.reduce is an exact box filter (block mean), ~20x faster than numpy here;
    # pixels untouched by any shape keep the background value exactly.
    return np.asarray(canvas.reduce(factor), dtype=np.uint8)


def background_colour(image: np.ndarray, objects: Any) -> np.ndarray:
    """The (3,) uint8 background of a rendered scene: a corner pixel of a cell without any
    object (a scene leaves at least two of the four cells empty; an object may reach its own
    cell's corners)."""
    taken = {(o["row"], o["col"]) for o in as_object_list(objects)}
    row, col = next(cell for cell in POSITIONS if cell not in taken)
    half = image.shape[0] // 2
    return np.asarray(image[row * half, col * half], np.uint8)


def without_objects(image: np.ndarray, objects: Any, removed: Any) -> np.ndarray:
    """`image` (a rendered scene) with the objects in `removed` taken out: their cells painted
    with the background. This is exactly the picture `render` gives for the scene without
    them: every object lies inside its own cell, the supersampled cell is a whole number of
    output pixels, and the box filter never mixes two cells."""
    out = np.array(image, np.uint8)
    background = background_colour(image, objects)
    half = image.shape[0] // 2
    for obj in as_object_list(removed):
        out[obj["row"] * half:(obj["row"] + 1) * half,
            obj["col"] * half:(obj["col"] + 1) * half] = background
    return out


def removals(objects: Any) -> list[list[dict[str, Any]]]:
    """Every way to take named objects out of a scene: each object alone, and all of them
    when that is different (two objects); the last one leaves the empty scene."""
    scene = as_object_list(objects)
    return [[obj] for obj in scene] + ([scene] if len(scene) > 1 else [])


def _name(obj: dict[str, Any]) -> str:
    return f"a {obj['colour']} {obj['shape']}"


def caption(scene: list[dict[str, Any]], rng: np.random.Generator) -> str:
    """A true lower-case English caption; with two objects both are always named.

    Templates are drawn uniformly among those that are true of the scene: spatial
    relations only between objects in the same row (left/right) or column
    (above/below); diagonal pairs get only the 'and' templates.
    """
    if len(scene) == 1:
        (obj,) = scene
        if rng.integers(2) == 0:
            return _name(obj)
        return f"{_name(obj)} in the {POSITIONS[(obj['row'], obj['col'])]}"
    if len(scene) != 2:
        raise ValueError(f"a scene has 1 or 2 objects, got {len(scene)}")
    order = rng.permutation(2)
    a, b = scene[order[0]], scene[order[1]]
    templates = ["and", "and_positions"]
    if a["row"] == b["row"]:
        templates.append("left_right")
    if a["col"] == b["col"]:
        templates.append("above_below")
    template = templates[int(rng.integers(len(templates)))]
    if template == "and":
        return f"{_name(a)} and {_name(b)}"
    if template == "and_positions":
        return (f"{_name(a)} in the {POSITIONS[(a['row'], a['col'])]} and "
                f"{_name(b)} in the {POSITIONS[(b['row'], b['col'])]}")
    # Which object is named first was random, so that choice also picks the direction.
    if template == "left_right":
        relation = "to the left of" if a["col"] < b["col"] else "to the right of"
    else:
        relation = "above" if a["row"] < b["row"] else "below"
    return f"{_name(a)} {relation} {_name(b)}"


def generate_example(seed: int, split: str, index: int, image_size: int) -> dict[str, Any]:
    """Example `index` of `split`, in the form `SyntheticShapes` features encode.

    Its own rng, seeded by (seed, split, index), makes it independent of generation
    order and of any parallelism.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    scene = sample_scene(rng, split)
    image = render(scene, image_size, rng)
    text = caption(scene, rng)
    return {
        "image": image,
        "caption": text,
        "objects": {
            "shape": [o["shape"] for o in scene],
            "colour": [o["colour"] for o in scene],
            "row": np.array([o["row"] for o in scene], dtype=np.int32),
            "col": np.array([o["col"] for o in scene], dtype=np.int32),
        },
    }


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
    """Coloured shapes in a 2x2 grid with true captions; generated, never downloaded."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = BUILDER_CONFIGS

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                "objects": tfds.features.Sequence({
                    "shape": tfds.features.ClassLabel(names=list(SHAPES)),
                    "colour": tfds.features.ClassLabel(names=list(COLOURS)),
                    "row": tfds.features.Scalar(dtype=np.int32),
                    "col": tfds.features.Scalar(dtype=np.int32),
                }),
            }),
            supervised_keys=("caption", "image"),
            # Records are stored in index order, so as_data_source(split)[i] is
            # generate_example(seed, split, i); readers shuffle on their own.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is generated.
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        config = self.builder_config
        for index in range(config.split_size(split)):
            yield index, generate_example(config.seed, split, index, config.image_size)


def as_object_list(objects: Any) -> list[dict[str, Any]]:
    """A scene's objects as {"colour", "shape", "row", "col"} names sorted by cell (what the
    pixel judge reads off an image), from a list of dicts or the `objects` feature.

    The feature is a dict of parallel sequences; read back through TFDS its colour and
    shape are ClassLabel indices, straight from generate_example they are names.
    """
    if isinstance(objects, dict):
        keys = ("colour", "shape", "row", "col")
        objects = [dict(zip(keys, vals)) for vals in zip(*(objects[k] for k in keys))]

    def name(value, names):
        return names[int(value)] if isinstance(value, (int, np.integer)) else str(value)
    out = [{"colour": name(o["colour"], tuple(COLOURS)), "shape": name(o["shape"], SHAPES),
            "row": int(o["row"]), "col": int(o["col"])} for o in objects]
    return sorted(out, key=lambda o: (o["row"], o["col"]))
