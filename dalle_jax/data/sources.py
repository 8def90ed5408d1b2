"""Where examples come from: TFDS builders prepared as ArrayRecord for random access.

Three kinds of source, chosen by `config.data.name`:
- `synthetic_shapes`, the project's procedural data set, built on first use;
- `caption_folder`, a user's folder of captioned images (`config.data.folder`), built on first use;
- any TFDS catalog name (e.g. `coco_captions`), which must already be prepared in
  `config.data.data_dir`, with `config.data.image_key` / `caption_key` naming its features.
Every source is read as plain (image, caption) pairs by `image_and_caption`.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from dalle_jax.data import caption_folder, synthetic_shapes

ARRAY_RECORD = "array_record"


def builder_for(data_config) -> tfds.core.DatasetBuilder:
    """The TFDS builder the config names (not yet prepared)."""
    name = data_config.name
    data_dir = data_config.data_dir or None
    if name == "synthetic_shapes":
        shapes = data_config.shapes
        config = synthetic_shapes.make_config(
            image_size=shapes.image_size, num_train=shapes.num_train or None,
            num_validation=shapes.num_validation or None, num_heldout=shapes.num_heldout or None,
            seed=shapes.seed)
        return tfds.builder(name, config=synthetic_shapes.builder_config_argument(config),
                            data_dir=data_dir)
    if name == "caption_folder":
        if not data_config.folder:
            raise ValueError("config.data.folder must name a folder when config.data.name is "
                             "'caption_folder'")
        config = caption_folder.make_config(data_config.folder, max_side=data_config.folder_max_side)
        return tfds.builder(name, config=config, data_dir=data_dir)
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"config.data.name={name!r} is not a TFDS data set: {e}".split("\n")[0])


def prepared_builder(data_config) -> tfds.core.DatasetBuilder:
    """The builder with its data on disk, building the project's own data sets when missing."""
    builder = builder_for(data_config)
    if data_config.name in ("synthetic_shapes", "caption_folder"):
        # Safe to call every time: TFDS returns at once when the data is already there.
        builder.download_and_prepare(file_format=ARRAY_RECORD)
    elif not builder.is_prepared():
        try:
            builder.download_and_prepare(file_format=ARRAY_RECORD)
        except Exception as e:  # Offline, manual download needed, ...: say what to do.
            first_line = str(e).strip().split("\n")[0][:200]
            raise FileNotFoundError(
                f"TFDS data set {builder.info.full_name!r} is not prepared in "
                f"{builder.data_dir!r} and could not be built here ({type(e).__name__}: "
                f"{first_line}); build it where it can be downloaded (`tfds build "
                f"{data_config.name} --file_format=array_record`) and point "
                f"config.data.data_dir at it") from None
    return builder


def data_source(builder: tfds.core.DatasetBuilder, split: str, *, decode_images: bool = True):
    """A random-access view of `split` (slicing syntax like `train[:90%]` works)."""
    known = builder.info.splits  # Empty under tfds.testing.mock_data: nothing to check then.
    if known and split.split("[")[0] not in known:
        raise ValueError(f"split {split!r} is not in {builder.info.full_name} "
                         f"(splits: {', '.join(builder.info.splits)})")
    decoders = None if decode_images else {"image": tfds.decode.SkipDecoding()}
    try:
        return builder.as_data_source(split, decoders=decoders)
    except NotImplementedError as e:
        raise ValueError(
            f"{builder.info.full_name} is stored as {builder.info.file_format}, which has no "
            f"random access; re-prepare it with file_format='array_record' ({e})") from None


def feature(record: dict, key: str) -> Any:
    """A possibly nested feature, addressed as `captions/text`."""
    value = record
    for part in key.split("/"):
        try:
            value = value[part]
        except (KeyError, TypeError):
            raise KeyError(f"feature {key!r} is not in the data set's examples "
                           f"(top-level features: {', '.join(record)})") from None
    return value


def as_text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def pick_caption(value, rng: np.random.Generator | None) -> str:
    """One caption: data sets like COCO hold several per image, of which one is drawn."""
    if isinstance(value, (str, bytes)):
        return as_text(value)
    captions = list(np.asarray(value).reshape(-1))
    if not captions:
        return ""
    index = 0 if rng is None else int(rng.integers(len(captions)))
    return as_text(captions[index])


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 HxWx3, whatever the source stored (grey or RGBA images occur in catalog sets)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
        image = image[..., :3]
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {image.dtype}")
    return image


def image_and_caption(record: dict, data_config, rng: np.random.Generator | None):
    return (as_rgb(feature(record, data_config.image_key)),
            pick_caption(feature(record, data_config.caption_key), rng))


def captions(data_config, split: str, limit: int = 0) -> Iterator[str]:
    """Captions of a split without decoding its images (for training the tokenizer)."""
    source = data_source(prepared_builder(data_config), split, decode_images=False)
    count = len(source) if limit <= 0 else min(limit, len(source))
    for i in range(count):
        value = feature(source[i], data_config.caption_key)
        for caption in ([value] if isinstance(value, (str, bytes)) else np.asarray(value).reshape(-1)):
            yield as_text(caption)
