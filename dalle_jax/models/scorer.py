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

A CLIP trained on grey views only (`config.data.augment.greyscale=1`) reads what it was trained
on: its scorer turns images grey and leaves the run's `colour_words` out of captions, so it
judges shapes and places whatever the colours. `ClipCommittee` lets several CLIPs judge together
(e.g. the pipeline's CLIP and such a grey one):

    committee = ClipCommittee([ClipScorer.from_workdir(w) for w in ("clip", "grey_clip")])
    scores = committee.score(images, captions)  # the members' standardised scores, summed
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx

from dalle_jax import workdir as workdir_lib
from dalle_jax.data.augment import greyscale, without_words
from dalle_jax.models import clip
from dalle_jax.models.chunks import apply_in_chunks
from dalle_jax.text.tokenizer import encode_texts

# Pure functions of the model's (graph, state): nnx.jit would split and update the module on
# every call, which races when several threads score at once (the server's request threads).
@functools.partial(jax.jit, static_argnums=0)
def _encode_images(graphdef, state, images):
    return nnx.merge(graphdef, state).encode_images(images)


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(graphdef, state, text):
    return nnx.merge(graphdef, state).encode_text(text)


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
    def __init__(self, model: clip.CLIP, tokenizer, chunk: int = 64,
                 grey_without: Sequence[str] | None = None):
        """`grey_without` (a CLIP trained on grey views): score grey images against captions
        without these words; None scores images and captions as they are."""
        self.model, self.tokenizer, self.chunk = model, tokenizer, chunk
        self._graphdef, self._state = nnx.split(model)
        self.image_size = model.cfg.image_size
        self.text_length = model.cfg.text_length
        self.grey_without = None if grey_without is None else tuple(grey_without)

    @classmethod
    def from_workdir(cls, workdir: str, *, use_ema: bool = True, chunk: int = 64,
                     **load) -> "ClipScorer":
        """The CLIP trained in `workdir`; `load`: `Run.load_model`'s options (dtype, mesh)."""
        run = workdir_lib.Run(workdir, expect="clip")
        augment = run.config.data.augment
        grey = augment.get("greyscale", 0.0) >= 1.0
        return cls(run.load_model(clip.from_config, use_ema=use_ema, **load), run.tokenizer(),
                   chunk, grey_without=tuple(augment.colour_words) if grey else None)

    def _images_as_trained(self, images: np.ndarray) -> np.ndarray:
        if self.grey_without is None:
            return images
        return np.stack([greyscale(image) for image in images])

    def _captions_as_trained(self, captions: list[str]) -> list[str]:
        if self.grey_without is None:
            return captions
        return [without_words(c, self.grey_without) for c in captions]

    def tokenize(self, captions: Sequence[str]) -> np.ndarray:
        return encode_texts(self.tokenizer, captions, self.text_length)

    def image_embeddings(self, images) -> np.ndarray:
        """float32 (N, E), L2-normalised."""
        images = self._images_as_trained(as_uint8_images(images, self.image_size))
        return apply_in_chunks(functools.partial(_encode_images, self._graphdef), self._state,
                               images, self.chunk)

    def text_embeddings(self, captions: Sequence[str]) -> np.ndarray:
        """float32 (N, E), L2-normalised."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        if not captions:
            raise ValueError("no captions given")
        return apply_in_chunks(functools.partial(_encode_text, self._graphdef), self._state,
                               self.tokenize(self._captions_as_trained(captions)), self.chunk)

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


def standardised_by_caption(scores: np.ndarray, captions: Sequence[str]) -> np.ndarray:
    """`scores` minus the mean, over the standard deviation, of the scores given with the same
    caption: how far an image stands out among its caption's images (0 for a lone image)."""
    scores, captions = np.asarray(scores, np.float64), np.asarray(captions)
    out = np.zeros_like(scores)
    for caption in np.unique(captions):
        rows = captions == caption
        group = scores[rows]
        out[rows] = (group - group.mean()) / max(group.std(), 1e-12)
    return out.astype(np.float32)


class ClipCommittee:
    """Several CLIPs judging together. An image's score is the sum over the members of its
    score standardised among the images given with the same caption, so members whose cosine
    similarities spread differently weigh alike (a ranking among one caption's candidates is
    what reranking needs; scores of different captions are not comparable). Embeddings, and so
    retrieval figures, are the first member's."""

    def __init__(self, members: Sequence[ClipScorer]):
        if len(members) < 2:
            raise ValueError(f"a committee needs at least two CLIPs, got {len(members)}")
        self.members = tuple(members)
        self.image_embeddings = self.members[0].image_embeddings
        self.text_embeddings = self.members[0].text_embeddings

    def score(self, images, captions: Sequence[str] | str) -> np.ndarray:
        """(N,) the sum of the members' standardised scores of image i with caption i."""
        images = np.asarray(images)
        captions = [captions] if isinstance(captions, str) else list(captions)
        per_image = captions if len(captions) != 1 else captions * len(images)
        return sum(standardised_by_caption(member.score(images, captions), per_image)
                   for member in self.members)


def scorer_from_workdirs(workdirs: Sequence[str] | str) -> ClipScorer | ClipCommittee:
    """A trained CLIP's scorer, or the committee of several CLIPs' workdirs."""
    workdirs = [workdirs] if isinstance(workdirs, str) else list(workdirs)
    if not workdirs:
        raise ValueError("no CLIP workdir given")
    scorers = [ClipScorer.from_workdir(w) for w in workdirs]
    return scorers[0] if len(scorers) == 1 else ClipCommittee(scorers)
