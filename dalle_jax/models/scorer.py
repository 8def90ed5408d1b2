"""A trained CLIP as a judge of caption-image fit: `score(images, captions)`.

    scorer = ClipScorer.from_workdir("workdirs/clip_mini")       # EMA weights by default
    scores = scorer.score(images, ["a red circle"] * len(images))  # (N,) cosine similarities
    matrix = scorer.similarity(images, captions)                   # (N_images, N_captions)

Images may be any RGB images: uint8 in [0, 255] or floats in [0, 1] (what the sampler and the
dVAE decoder return), of any size (resized to the model's with a bicubic filter, as the
sampler does with an image to complete). Captions are tokenised with the CLIP run's own
tokenizer; an empty caption is an error and an over-long one is truncated with a warning.
Embeddings are computed by jit-compiled functions over fixed-size chunks, so one compilation
serves every call.

The score is the cosine similarity of the two normalised embeddings, in [-1, 1]; CLIP's
training logits are that times the learned scale (`model.logit_scale_value()`), which does not
change any ranking.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from absl import logging
from flax import nnx

from dalle_jax.models.chunks import apply_in_chunks
from dalle_jax.models.clip import CLIP
from dalle_jax.text.tokenizer import encode_texts

_encode_images = nnx.jit(lambda model, images: model.encode_images(images))
_encode_text = nnx.jit(lambda model, text: model.encode_text(text))


def as_uint8_images(images, size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 or [0, 1] floats -> uint8 (N, size, size, 3), resized if needed."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) RGB, got shape {images.shape}")
    if not len(images):
        raise ValueError("no images given")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"images must be uint8 or floats in [0, 1], got {images.dtype}")
        images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
    if images.shape[1:3] != (size, size):
        from PIL import Image

        logging.warning("images of %dx%d resized to CLIP's %dx%d", images.shape[2],
                        images.shape[1], size, size)
        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
                           for im in images])
    return images


class ClipScorer:
    def __init__(self, model: CLIP, tokenizer, chunk: int = 64):
        self.model, self.tokenizer, self.chunk = model, tokenizer, chunk
        self.image_size = model.cfg.image_size
        self.text_length = model.cfg.text_length

    @classmethod
    def from_workdir(cls, workdir: str, *, use_ema: bool = True, chunk: int = 64) -> "ClipScorer":
        from dalle_jax import run
        from dalle_jax.text.tokenizer import Tokenizer
        from dalle_jax.training.restore import load_model

        model, config = load_model(workdir, use_ema=use_ema)
        if not isinstance(model, CLIP):
            raise ValueError(f"{workdir!r} holds a {config.task.name!r} run, not CLIP")
        return cls(model, Tokenizer(run.tokenizer_path(config, workdir)), chunk)

    def tokenize(self, captions: Sequence[str]) -> np.ndarray:
        return encode_texts(self.tokenizer, captions, self.text_length)

    def image_embeddings(self, images) -> np.ndarray:
        """float32 (N, E), L2-normalised."""
        return apply_in_chunks(_encode_images, self.model,
                               as_uint8_images(images, self.image_size), self.chunk)

    def text_embeddings(self, captions: Sequence[str]) -> np.ndarray:
        """float32 (N, E), L2-normalised."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        if not captions:
            raise ValueError("no captions given")
        return apply_in_chunks(_encode_text, self.model, self.tokenize(captions), self.chunk)

    def similarity(self, images, captions: Sequence[str]) -> np.ndarray:
        """Cosine similarity of every image with every caption, (N_images, N_captions)."""
        return self.image_embeddings(images) @ self.text_embeddings(captions).T

    def score(self, images, captions: Sequence[str] | str) -> np.ndarray:
        """(N,) cosine similarity of image i with caption i; one caption scores every image."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        image_embeddings = self.image_embeddings(images)
        if len(captions) not in (1, len(image_embeddings)):
            raise ValueError(f"{len(image_embeddings)} images but {len(captions)} captions "
                             "(give one caption per image, or one for all)")
        unique = sorted(set(captions))
        text = self.text_embeddings(unique)
        row_of = {caption: row for row, caption in enumerate(unique)}
        rows = np.array([row_of[c] for c in captions])
        return np.sum(image_embeddings * text[np.broadcast_to(rows, (len(image_embeddings),))],
                      axis=1)
