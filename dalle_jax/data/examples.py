"""The examples an evaluation looks at: images, captions and (synthetic_shapes) objects."""
from __future__ import annotations

import dataclasses

import numpy as np

from dalle_jax.data import sources


@dataclasses.dataclass(frozen=True)
class Examples:
    images: np.ndarray  # uint8 (N, S, S, 3) as stored
    captions: list[str]  # the first caption of each example
    objects: list | None  # the `objects` feature of each, where the data set has one


def load_examples(config, split: str | None = None, limit: int = 0) -> Examples:
    """The first `limit` (0 = all) examples of `split` (default: the run's evaluation split)."""
    builder = sources.prepared_builder(config.data)
    source = sources.data_source(builder, split or config.data.eval_split)
    count = len(source) if not limit else min(limit, len(source))
    if not count:
        raise ValueError(f"split {split or config.data.eval_split!r} of "
                         f"{config.data.name!r} has no examples")
    records = [source[i] for i in range(count)]
    pairs = [sources.image_and_caption(r, config.data, None) for r in records]
    objects = [r["objects"] for r in records] if "objects" in records[0] else None
    return Examples(images=np.stack([image for image, _ in pairs]),
                    captions=[caption for _, caption in pairs], objects=objects)
