"""Images from captions with a trained transformer workdir: the Python API behind sample.py.

    from dalle_jax.sampling.generator import Generator
    generate = Generator.from_workdir("workdirs/dalle_mini")
    images = generate(["a red circle above a blue square"], n=4, seed=0)  # (4, S, S, 3)
    pictures = generate(["a green triangle"], n=2, as_pil=True)           # PIL images

    # Best of 16 by CLIP (see sampling/rerank.py):
    generate = Generator.from_workdir("workdirs/dalle_mini", clip_workdir="workdirs/clip_mini")
    result = generate.best_of(["a red circle"], candidates=16, keep=2)

Prompts × n images are drawn in batches of a fixed size (the last one padded), so one compiled
program serves every call; image i of a prompt uses the key fold_in(key(seed), i), so it is the
same whatever else is drawn with it.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from dalle_jax import workdir as workdir_lib
from dalle_jax.models import dalle as dalle_model
from dalle_jax.models.codec import ImageCodec
from dalle_jax.models.scorer import scorer_from_workdirs
from dalle_jax.sampling import decode, rerank
from dalle_jax.sampling.outputs import to_pixels
from dalle_jax.sharding import logical
from dalle_jax.sharding import mesh as mesh_lib
from dalle_jax.text.tokenizer import encode_texts


@dataclasses.dataclass(frozen=True)
class Settings:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # 1 = no nucleus cut
    guidance: float = 1.0  # classifier-free guidance scale; 1 = the conditional model alone

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = no limit)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def image_keys(seeds, indices) -> jax.Array:
    """One key per image, fold_in(key(seed), index), from its own (seed, index) alone; `seeds`
    is one seed for every image or one per image."""
    indices = np.asarray(indices)
    seeds = np.broadcast_to(np.asarray(seeds), indices.shape).tolist()
    bases = {seed: jax.random.key(seed) for seed in set(seeds)}
    return jax.vmap(jax.random.fold_in)(jnp.stack([bases[seed] for seed in seeds]),
                                        jnp.asarray(indices, jnp.uint32))


def global_array(x, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array that every process holds whole, as one array over `sharding`'s devices
    (each process gives its own devices their parts: also across processes)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


class Generator:
    def __init__(self, model, codec, tokenizer, *, batch_size: int = 8,
                 implementation: str = "sparse", mesh=None, rules=None, scorer=None):
        """`mesh` and `rules` (optional): sample on a device mesh with the training rules,
        e.g. images over the data axes and heads over the tensor axis. `scorer` (a
        `ClipScorer` or `ClipCommittee`, optional) reranks candidates in `best_of`."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be positive")
        self.model, self.codec, self.tokenizer = model, codec, tokenizer
        self.scorer = scorer
        self.batch_size, self.implementation = batch_size, implementation
        self.text_length = model.cfg.text_length
        self.mesh, self.rules = mesh, rules
        if mesh is not None:
            ways = logical.batch_axis_size(mesh, rules)
            if batch_size % ways:
                raise ValueError(f"batch_size={batch_size} must divide by the {ways} ways the "
                                 f"mesh splits a batch")
            shardings = logical.state_shardings(nnx.state(model), mesh, rules)
            nnx.update(model, jax.device_put(nnx.state(model), shardings))
        graphdef, self._state = nnx.split(model)

        def sample(state, text, key_data, controls, guided, implementation):
            keys = jax.random.wrap_key_data(key_data)
            return decode.sample_image_tokens(nnx.merge(graphdef, state), text, keys, controls,
                                              guided=guided, implementation=implementation)

        self._sample = jax.jit(sample, static_argnames=("guided", "implementation"))

    def _run(self, text, keys, controls, guided) -> np.ndarray:
        """Tokens (B, N) on the host. On a mesh, every process of a multi-process job runs
        this with the same inputs: each gives its devices their part of the batch, and every
        process gets all the tokens back."""
        key_data = np.asarray(jax.random.key_data(keys))
        if self.mesh is None:
            return np.asarray(self._sample(self._state, text, key_data, controls, guided=guided,
                                           implementation=self.implementation))
        batch = lambda x: global_array(x, logical.batch_sharding(  # noqa: E731
            self.mesh, self.rules, np.ndim(x)))
        controls = {k: batch(v) if k in ("given", "keep") else np.asarray(v)
                    for k, v in controls.items()}
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            tokens = self._sample(self._state, batch(text), batch(key_data), controls,
                                  guided=guided, implementation=self.implementation)
        return multihost_utils.process_allgather(tokens, tiled=True)

    @classmethod
    def from_workdir(cls, workdir: str, *, use_ema: bool = True, batch_size: int = 8,
                     implementation: str = "sparse", mesh_shape=None,
                     clip_workdir: str | Sequence[str] | None = None,
                     dtype: str | None = None) -> "Generator":
        """The transformer of `workdir` (its run, or a pipeline workdir's dalle/), with its
        dVAE and tokenizer. With `mesh_shape` (e.g. (2, 1, 4) over the run's mesh axes) the
        parameters are restored onto that mesh and sampling is sharded by the run's own
        logical-axis rules. CLIP reranks candidates in `best_of`: a pipeline workdir's CLIPs
        by default, or those of `clip_workdir` (several: a `ClipCommittee`; [] for none).
        `dtype` (e.g. "bfloat16"): the transformer's parameters are cast to it as they are
        read and it computes and keeps its key/value cache in it (logits and sampling stay
        float32); default: the parameters as trained, the run's compute dtype."""
        dalle_workdir, clip_workdirs = workdir_lib.transformer_and_rerankers(workdir,
                                                                             clip_workdir)
        run = workdir_lib.Run(dalle_workdir, expect="dalle")
        config = run.config
        mesh = rules = None
        if mesh_shape is not None:
            mesh = mesh_lib.build_mesh(ml_collections.ConfigDict(dict(
                config.mesh.to_dict(), shape=tuple(mesh_shape), num_devices=0)))
            rules = logical.normalize_rules(config.sharding.rules)
        model = run.load_model(dalle_model.from_config, use_ema=use_ema, dtype=dtype,
                               param_dtype=dtype, mesh=mesh, rules=rules)
        codec = ImageCodec.from_workdir(config.task.dvae_workdir)
        if (codec.grid_size, codec.vocab_size) != (model.cfg.grid_size, model.cfg.image_vocab_size):
            raise ValueError(
                f"the dVAE in {config.task.dvae_workdir!r} makes {codec.grid_size}×"
                f"{codec.grid_size} tokens of {codec.vocab_size} codes, the transformer in "
                f"{dalle_workdir!r} expects {model.cfg.grid_size}×{model.cfg.grid_size} of "
                f"{model.cfg.image_vocab_size}")
        tokenizer = run.tokenizer()
        if tokenizer.vocab_size > model.cfg.text_vocab_size:
            raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces, more "
                             f"than the transformer's {model.cfg.text_vocab_size}")
        scorer = scorer_from_workdirs(clip_workdirs) if clip_workdirs else None
        return cls(model, codec, tokenizer, batch_size=batch_size,
                   implementation=implementation, mesh=mesh, rules=rules, scorer=scorer)

    # --- inputs -------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> np.ndarray:
        return encode_texts(self.tokenizer, prompts, self.text_length, what="prompt")

    def image_tokens_to_keep(self, image: np.ndarray) -> np.ndarray:
        """The dVAE tokens (N,) of one uint8 image, resized to the model's size if needed."""
        from PIL import Image

        size = self.codec.image_size
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"the image to complete must be (H, W, 3) RGB, got {image.shape}")
        if image.shape[:2] != (size, size):
            logging.warning("image of %dx%d resized to the model's %dx%d", image.shape[1],
                            image.shape[0], size, size)
            image = np.asarray(Image.fromarray(image.astype(np.uint8)).resize(
                (size, size), Image.BICUBIC))
        return self.codec.encode(image[None].astype(np.uint8))[0].reshape(-1)

    # --- drawing ------------------------------------------------------------------------

    def tokens(self, prompts: list[str], n: int = 4, seed: int = 0,
               settings: Settings = Settings(), given: np.ndarray | None = None,
               keep: int = 0, progress=None) -> np.ndarray:
        """int32 (len(prompts)·n, N) image tokens, prompt-major; `given` (N,) tokens of which
        the first `keep` are kept as they are (image completion)."""
        if n < 1:
            raise ValueError(f"n={n} must be at least 1 image per prompt")
        if not prompts:
            raise ValueError("no prompts given")
        image_length = self.model.cfg.image_length
        if not 0 <= keep <= image_length:
            raise ValueError(f"keep={keep} tokens must be in [0, {image_length}]")
        text = np.repeat(self.encode_prompts(list(prompts)), n, axis=0)
        indices = np.tile(np.arange(n), len(prompts))
        out = []
        for start in range(0, len(text), self.batch_size):
            rows = slice(start, start + self.batch_size)
            out.append(self.draw_batch(text[rows], seed, indices[rows], settings, given, keep))
            if progress is not None:
                progress(len(out[-1]))
        return np.concatenate(out)

    def draw_batch(self, text: np.ndarray, seeds, indices, settings: Settings = Settings(),
                   given: np.ndarray | None = None, keep: int = 0) -> np.ndarray:
        """int32 (R, N) image tokens for up to `batch_size` rows, each its own (caption ids,
        seed, index): rows of different requests can share one compiled call (the server's
        batching). The batch is padded to `batch_size`, so every call runs the same program."""
        count = len(text)
        if not 1 <= count <= self.batch_size:
            raise ValueError(f"{count} rows: a batch holds 1 to {self.batch_size}")
        image_length = self.model.cfg.image_length
        given = np.zeros((image_length,), np.int32) if given is None else np.asarray(given)
        pad = self.batch_size - count
        seeds = np.broadcast_to(np.asarray(seeds), (count,))
        controls = {
            "temperature": jnp.float32(settings.temperature),
            "top_k": jnp.int32(settings.top_k), "top_p": jnp.float32(settings.top_p),
            "guidance": jnp.float32(settings.guidance),
            "given": jnp.asarray(np.tile(given, (self.batch_size, 1)), jnp.int32),
            "keep": jnp.full((self.batch_size,), keep, jnp.int32)}
        batch_text = np.concatenate([text, np.repeat(text[:1], pad, axis=0)])
        keys = image_keys(np.concatenate([seeds, np.zeros(pad, int)]),
                          np.concatenate([np.asarray(indices), np.zeros(pad, int)]))
        return self._run(batch_text, keys, controls, settings.guidance != 1.0)[:count]

    def __call__(self, prompts, n: int = 4, seed: int = 0, *, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, guidance: float = 1.0,
                 image: np.ndarray | None = None, keep_rows: int = 0, keep_tokens: int = 0,
                 as_pil: bool = False, progress=None):
        """Images for `prompts` (a string or a list): float32 (len·n, S, S, 3) in [0, 1], or
        PIL images with `as_pil`. With `image`, its first `keep_rows` token rows (or
        `keep_tokens` tokens) are kept and the rest is completed."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        settings = Settings(temperature, top_k, top_p, guidance)
        given, keep = None, 0
        if image is not None:
            keep = keep_tokens or keep_rows * self.model.cfg.grid_size
            given = self.image_tokens_to_keep(image)
        elif keep_rows or keep_tokens:
            raise ValueError("keep_rows / keep_tokens need an image to complete")
        tokens = self.tokens(prompts, n, seed, settings, given, keep, progress)
        grid = self.model.cfg.grid_size
        images = self.codec.decode(tokens.reshape(-1, grid, grid))
        if not as_pil:
            return images
        from PIL import Image

        return [Image.fromarray(pixels) for pixels in to_pixels(images)]

    def best_of(self, prompts, candidates: int, keep: int = 1, seed: int = 0, **kwargs):
        """Draws `candidates` images per prompt (as `__call__`, same keyword arguments), scores
        them with the CLIP scorer and keeps the best `keep`: a `rerank.Reranked`."""
        if self.scorer is None:
            raise ValueError("best_of needs a CLIP scorer (Generator.from_workdir(..., "
                             "clip_workdir=...) or Generator(..., scorer=...))")
        if not 1 <= keep <= candidates:
            raise ValueError(f"keep={keep} must be between 1 and candidates={candidates}")
        if kwargs.get("as_pil"):
            raise ValueError("best_of returns arrays; convert the kept images afterwards")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = self(prompts, candidates, seed, **kwargs)
        return rerank.rerank(prompts, images, self.scorer, keep)

    @property
    def compilations(self) -> int:
        """Programs compiled so far (a new prompt or seed must not add one)."""
        return self._sample._cache_size()

