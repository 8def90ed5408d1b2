"""A trained dVAE as the image tokenizer: `encode(images) -> tokens`, `decode(tokens) -> images`.

    codec = ImageCodec.from_workdir("workdirs/dvae_mini")   # EMA weights by default
    tokens = codec.encode(images)        # uint8 (N, S, S, 3) -> int32 (N, h, w)
    pictures = codec.decode(tokens)      # -> float32 (N, S, S, 3) in [0, 1]

Any number of images is processed in fixed-size chunks (the last one padded), so one
compilation serves every call.
"""
from __future__ import annotations

import numpy as np
from flax import nnx

from dalle_jax import workdir as workdir_lib
from dalle_jax.models import dvae
from dalle_jax.models.chunks import apply_in_chunks


class ImageCodec:
    def __init__(self, model: dvae.DVAE, chunk: int = 32):
        self.model, self.chunk = model, chunk
        self.image_size, self.grid_size = model.image_size, model.grid_size
        self.vocab_size = model.vocab_size
        self._encode = nnx.jit(lambda m, x: m.encode(x))
        self._decode = nnx.jit(lambda m, t: m.decode(t))

    @classmethod
    def from_workdir(cls, workdir: str, *, use_ema: bool = True, chunk: int = 32,
                     **load) -> "ImageCodec":
        """The dVAE trained in `workdir`; `load`: `Run.load_model`'s options (dtype, mesh)."""
        run = workdir_lib.Run(workdir, expect="dvae")
        return cls(run.load_model(dvae.from_config, use_ema=use_ema, **load), chunk)

    def encode(self, images) -> np.ndarray:
        images = np.asarray(images)
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"encode expects images of shape (N, {self.image_size}, "
                             f"{self.image_size}, 3), got {images.shape}")
        return apply_in_chunks(self._encode, self.model, images, self.chunk)

    def decode(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.ndim != 3 or tokens.shape[1:] != (self.grid_size, self.grid_size):
            raise ValueError(f"decode expects tokens of shape (N, {self.grid_size}, "
                             f"{self.grid_size}), got {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"tokens must lie in [0, {self.vocab_size}), got "
                             f"[{tokens.min()}, {tokens.max()}]")
        return apply_in_chunks(self._decode, self.model, tokens.astype(np.int32), self.chunk)
