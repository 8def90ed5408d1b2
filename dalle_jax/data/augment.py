"""The paper's image augmentation: a square crop, a resize to a random side, a random crop.

dVAE training uses a random square crop, a side in [9/8, 12/8]·size and horizontal flips; the
transformer a centred square crop, a side in [1, 9/8]·size and no flip (images may hold text and
captions name left and right). Evaluation uses a centred crop resized to exactly `size`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

SQUARE_CROPS = ("random", "center")


def square_window(shape, rng: np.random.Generator | None) -> tuple[int, int, int]:
    """(top, left, side) of the largest square of an image of `shape`, at a random offset
    when `rng` is given, else centred."""
    h, w = shape[:2]
    side = min(h, w)
    if rng is None:
        return (h - side) // 2, (w - side) // 2, side
    return int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)), side


def square_crop(image: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """The largest square of `image`, at a random offset when `rng` is given, else centred."""
    y0, x0, side = square_window(image.shape, rng)
    return image[y0 : y0 + side, x0 : x0 + side]


def resize(image: np.ndarray, side: int) -> np.ndarray:
    if image.shape[0] == side and image.shape[1] == side:
        return image
    # PIL antialiases when it shrinks, so small targets do not alias.
    return np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC))


def augment(image: np.ndarray, size: int, rng: np.random.Generator, *, square: str,
            min_scale: float, max_scale: float, flip: bool) -> np.ndarray:
    """One random training view of `image` (uint8 HxWx3) as a `size`x`size` uint8 array."""
    return augment_alike([image], size, rng, square=square, min_scale=min_scale,
                         max_scale=max_scale, flip=flip)[0]


def augment_alike(images, size: int, rng: np.random.Generator, *, square: str,
                  min_scale: float, max_scale: float, flip: bool) -> list[np.ndarray]:
    """The same random view (one crop, side and flip) of each of `images`, which share a shape:
    e.g. a picture and its copy with an object removed."""
    top, left, crop = square_window(images[0].shape, rng if square == "random" else None)
    # The intermediate side never exceeds the crop (no upsampling for the sake of cropping),
    # but is at least `size` so the final crop always fits.
    side = int(round(rng.uniform(min_scale, max_scale) * size))
    side = max(size, min(side, crop))
    y0, x0 = (int(v) for v in rng.integers(0, side - size + 1, size=2))
    mirror = flip and rng.random() < 0.5
    views = []
    for image in images:
        view = resize(image[top : top + crop, left : left + crop], side)[y0 : y0 + size,
                                                                         x0 : x0 + size]
        views.append(np.ascontiguousarray(view[:, ::-1] if mirror else view))
    return views


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
