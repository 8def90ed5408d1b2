"""The paper's image augmentation: a square crop, a resize to a random side, a random crop.

dVAE training uses a random square crop, a side in [9/8, 12/8]·size and horizontal flips; the
transformer a centred square crop, a side in [1, 9/8]·size and no flip (images may hold text and
captions name left and right). Evaluation uses a centred crop resized to exactly `size`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

SQUARE_CROPS = ("random", "center")


def square_crop(image: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """The largest square of `image`, at a random offset when `rng` is given, else centred."""
    h, w = image.shape[:2]
    side = min(h, w)
    if rng is None:
        y0, x0 = (h - side) // 2, (w - side) // 2
    else:
        y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return image[y0 : y0 + side, x0 : x0 + side]


def resize(image: np.ndarray, side: int) -> np.ndarray:
    if image.shape[0] == side and image.shape[1] == side:
        return image
    # PIL antialiases when it shrinks, so small targets do not alias.
    return np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC))


def augment(image: np.ndarray, size: int, rng: np.random.Generator, *, square: str,
            min_scale: float, max_scale: float, flip: bool) -> np.ndarray:
    """One random training view of `image` (uint8 HxWx3) as a `size`x`size` uint8 array."""
    crop = square_crop(image, rng if square == "random" else None)
    # The intermediate side never exceeds the crop (no upsampling for the sake of cropping),
    # but is at least `size` so the final crop always fits.
    side = int(round(rng.uniform(min_scale, max_scale) * size))
    side = max(size, min(side, crop.shape[0]))
    resized = resize(crop, side)
    y0, x0 = (int(v) for v in rng.integers(0, side - size + 1, size=2))
    view = resized[y0 : y0 + size, x0 : x0 + size]
    if flip and rng.random() < 0.5:
        view = view[:, ::-1]
    return np.ascontiguousarray(view)


def greyscale(image: np.ndarray) -> np.ndarray:
    """`image` (uint8 HxWx3) as its ITU-R 601 luma, in all three channels."""
    luma = np.asarray(image, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(np.round(luma).astype(np.uint8)[..., None], 3, axis=-1)


def without_words(caption: str, words) -> str:
    """`caption` with every word in `words` left out ("a red circle" -> "a circle")."""
    return " ".join(w for w in caption.split() if w not in words)


def center_view(image: np.ndarray, size: int) -> np.ndarray:
    """The deterministic evaluation view: centred square crop resized to `size`."""
    return np.ascontiguousarray(resize(square_crop(image, None), size))
