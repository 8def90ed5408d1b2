"""Do sampled images show their captions? Judged from pixels, per setting and split.

For each caption, `candidates` images are drawn with plain sampling; the plain figures are
over all of them, and the reranked ones over the `keep` that CLIP scores highest among them
(best of N from the very same draws, so the two differ only by the choice). Guided settings
draw their own images. Every image is read by `evaluation.judge`: `match` (everything the
caption says, nothing extra) and per attribute: colour, shape, position (captions that state
a cell), relation (captions that state one), count (no object missing or extra).
"""
from __future__ import annotations

import numpy as np

from dalle_jax.evaluation import judge
from dalle_jax.sampling.outputs import to_pixels

ATTRIBUTES = ("match", "colour", "shape", "position", "relation", "count")


def judged_rates(images: np.ndarray, captions: list[str]) -> dict[str, float | int]:
    """Share of images for which each attribute holds, over the images where it applies;
    `images` float in [0, 1] or uint8, one caption per image."""
    verdicts = [judge.judge(image, caption) for image, caption in zip(to_pixels_if_float(images),
                                                                       captions)]
    rates: dict[str, float | int] = {"images": len(verdicts)}
    for attribute in ATTRIBUTES:
        applicable = [v[attribute] for v in verdicts if v[attribute] is not None]
        rates[attribute] = float(np.mean(applicable)) if applicable else float("nan")
    return rates


def to_pixels_if_float(images) -> np.ndarray:
    images = np.asarray(images)
    return images if images.dtype == np.uint8 else to_pixels(images)


def distinct_captions(captions, limit: int) -> list[str]:
    """The first `limit` different captions, in the split's order."""
    seen = list(dict.fromkeys(captions))
    return seen[:limit] if limit else seen


def evaluate_captions(generate, captions: list[str], *, candidates: int, keep: int,
                      guidance_scales=(), seed: int = 0, temperature: float = 1.0):
    """{setting name: rates} and {setting name: images (len(captions), k, S, S, 3)} for plain
    sampling, best-`keep`-of-`candidates` by CLIP (when the generator has a scorer) and
    each guidance scale (`keep` images per caption)."""
    rates, images = {}, {}
    if generate.scorer is not None:
        result = generate.best_of(captions, candidates, keep, seed, temperature=temperature)
        drawn = result.candidates
    else:
        drawn = generate(captions, candidates, seed, temperature=temperature)
    size = drawn.shape[1:]
    rates["plain"] = judged_rates(drawn, list(np.repeat(captions, candidates)))
    images["plain"] = drawn.reshape(len(captions), candidates, *size)[:, :keep]
    if generate.scorer is not None:
        name = f"best {keep} of {candidates} by CLIP"
        rates[name] = judged_rates(result.images, list(np.repeat(captions, keep)))
        images[name] = result.images.reshape(len(captions), keep, *size)
    for scale in guidance_scales:
        guided = generate(captions, keep, seed + 1, temperature=temperature, guidance=scale)
        name = f"guidance {scale:g}"
        rates[name] = judged_rates(guided, list(np.repeat(captions, keep)))
        images[name] = guided.reshape(len(captions), keep, *size)
    return rates, images
