"""Training the DALL·E transformer: maximum likelihood of [caption | image tokens].

Images become tokens inside the jitted step, through the frozen dVAE of an earlier run
(`config.task.dvae_workdir`, loaded by whoever makes the task). Encoding in the step keeps the
data pipeline one pipeline (the same augmented images, resumable iterator and sharding as every
other stage); the dVAE's weights reach the step as the loop's `frozen` input, so they are
neither trained nor compiled into the program as constants.

Where the training views never change (`config.task.token_cache`: no augmentation, as at
32 px, where the data set's images are the views), every epoch would encode the same images
to the same tokens again: the maker of the task encodes each training image once instead
(`encode_all`) and the step looks its tokens up by the example's position in the split. The
table rides in the frozen input beside the dVAE, whole on every device (int32, image_length
per example: meant for data sets of thousands of images, not of millions).

Loss: cross-entropy normalised separately over caption and image positions and weighted
`text_loss_weight` / `image_loss_weight` (the paper's 1/8 and 7/8). Caption positions whose
target is padding are left out: the per-position padding tokens are placeholders, not words.
With probability `caption_dropout` a caption is replaced by the empty one, so the model also
learns p(image), which classifier-free guidance needs at sampling time.
"""
from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dalle_jax.models import dalle as dalle_model
from dalle_jax.models.dalle import PAD_ID, empty_captions
from dalle_jax.models.dvae import DVAE
from dalle_jax.tasks.task import Task


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position negative log-likelihood in nats, float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def segment_nll_sums(text_logits, image_logits, text, image_tokens, mask):
    """Summed NLLs and counts of caption and image targets over the real examples."""
    row = mask.astype(jnp.float32)[:, None]
    text_weight = (text[:, 1:] != PAD_ID).astype(jnp.float32) * row
    image_weight = jnp.broadcast_to(row, image_tokens.shape)
    return {
        "text_nll": jnp.sum(cross_entropy(text_logits, text[:, 1:]) * text_weight),
        "text_count": jnp.sum(text_weight),
        "image_nll": jnp.sum(cross_entropy(image_logits, image_tokens) * image_weight),
        "image_count": jnp.sum(image_weight),
    }


def drop_captions(text: jax.Array, rng: jax.Array, probability: float) -> jax.Array:
    if probability <= 0:
        return text
    drop = jax.random.bernoulli(rng, probability, (text.shape[0],))
    return jnp.where(drop[:, None], empty_captions(*text.shape), text)


def encode_all(dvae: DVAE, image_batches: Iterable[np.ndarray]) -> np.ndarray:
    """The dVAE's tokens (N, grid²) int32 of every image in `image_batches` (uint8 batches
    (b, S, S, 3), in order): the table of `config.task.token_cache`."""
    graphdef, state = nnx.split(dvae)

    @jax.jit
    def encode(state, images):
        tokens = nnx.merge(graphdef, state).encode(images)
        return tokens.reshape(tokens.shape[0], -1).astype(jnp.int32)

    tables = [np.asarray(encode(state, images)) for images in image_batches]
    if not tables:
        raise ValueError("config.task.token_cache: the training split has no images to encode")
    return np.concatenate(tables)


class DalleTask(Task):
    name = "dalle"

    def __init__(self, config, dvae: DVAE, token_table: np.ndarray | None = None):
        """`dvae`: the trained dVAE whose encoder turns images into tokens, or its abstract
        `nnx.eval_shape` where only shapes matter (planning a pod's memory).
        `token_table`: with `config.task.token_cache`, `encode_all` of the training split's
        evaluation views, row i the tokens of the split's example i."""
        self.config = config
        task = config.task
        self.model_config = dalle_model.dalle_config(config.model, config.text,
                                                     config.train.compute_dtype)
        self._check_dvae_matches(dvae)
        self.dvae_graphdef, self.dvae_state = nnx.split(dvae)
        self.token_table = self._checked_table(token_table)
        for key in ("text_loss_weight", "image_loss_weight"):
            if task[key] < 0:
                raise ValueError(f"config.task.{key}={task[key]} must be >= 0")
        if not 0 <= task.caption_dropout < 1:
            raise ValueError(f"config.task.caption_dropout={task.caption_dropout} must be in [0, 1)")

    def _check_dvae_matches(self, dvae: DVAE):
        cfg, data = self.config, self.config.data
        for what, ours, theirs in (
                ("config.model.grid_size", cfg.model.grid_size, dvae.grid_size),
                ("config.model.image_vocab_size", cfg.model.image_vocab_size, dvae.vocab_size),
                ("config.data.image_size", data.image_size, dvae.image_size)):
            if ours != theirs:
                raise ValueError(f"{what}={ours} does not match the dVAE of "
                                 f"config.task.dvae_workdir={cfg.task.dvae_workdir!r} ({theirs})")

    def _checked_table(self, table):
        cached = bool(self.config.task.get("token_cache", False))
        if table is None:
            planning = all(isinstance(x, jax.ShapeDtypeStruct)
                           for x in jax.tree.leaves(self.dvae_state))
            if cached and not planning:
                raise ValueError("config.task.token_cache=True needs the training split's token "
                                 "table (pipeline.make_task encodes it)")
            return None
        if not cached:
            raise ValueError("a token table was given but config.task.token_cache is False")
        expected = (self.model_config.image_length,)
        if table.ndim != 2 or table.shape[1:] != expected or table.dtype != np.int32:
            raise ValueError(f"token table of shape {table.shape} and dtype {table.dtype}: "
                             f"expected int32 (examples, {expected[0]})")
        return table

    # --- the Task interface -------------------------------------------------------------

    def build_model(self, rngs: nnx.Rngs) -> dalle_model.DALLE:
        return dalle_model.DALLE(self.model_config, rngs=rngs)

    def flops_per_example(self) -> float:
        """The transformer's training FLOPs per example (the dVAE's encoding is not counted)."""
        return dalle_model.flops_per_example(self.model_config)

    def tokens_per_example(self) -> int:
        return self.model_config.text_length + self.model_config.image_length

    def reads_training_images(self) -> bool:
        return self.token_table is None

    def frozen_state(self) -> nnx.State:
        """The dVAE's weights, which every step uses and none trains, and the token table of
        `config.task.token_cache` (replicated: it has no logical axes)."""
        frozen = {"dvae": self.dvae_state}
        if self.token_table is not None:
            frozen["tokens"] = nnx.Variable(self.token_table)
        return nnx.State(frozen)

    def image_tokens(self, batch) -> jax.Array:
        """The tokens (B, grid²) of the batch's images, encoded by the dVAE."""
        dvae = nnx.merge(self.dvae_graphdef, batch["frozen"]["dvae"])
        tokens = dvae.encode(batch["image"])
        return jax.lax.stop_gradient(tokens.reshape(tokens.shape[0], -1))

    def training_tokens(self, batch) -> jax.Array:
        """The image tokens of a training batch: looked up by the examples' positions in the
        training split when they are cached, else encoded."""
        if "tokens" not in batch["frozen"]:
            return self.image_tokens(batch)
        return jnp.take(batch["frozen"]["tokens"][...], batch["index"], axis=0)

    def _weighted(self, sums):
        task = self.config.task
        text = sums["text_nll"] / jnp.maximum(sums["text_count"], 1.0)
        image = sums["image_nll"] / jnp.maximum(sums["image_count"], 1.0)
        return task.text_loss_weight * text + task.image_loss_weight * image, text, image

    def loss(self, model, batch, rng, step):
        del step
        text = drop_captions(batch["text"], rng, self.config.task.caption_dropout)
        tokens = self.training_tokens(batch)
        text_logits, image_logits = model(text, tokens)
        sums = segment_nll_sums(text_logits, image_logits, text, tokens, batch["mask"])
        loss, text_loss, image_loss = self._weighted(sums)
        return loss, {"text_loss": text_loss, "image_loss": image_loss}

    def eval_sums(self, model, batch):
        tokens = self.image_tokens(batch)
        text_logits, image_logits = model(batch["text"], tokens)
        sums = segment_nll_sums(text_logits, image_logits, batch["text"], tokens, batch["mask"])
        return dict(sums, count=jnp.sum(batch["mask"].astype(jnp.float32)))

    def summarize(self, sums):
        loss, text, image = self._weighted({k: np.asarray(v, np.float64) for k, v in sums.items()})
        return {"loss": float(loss), "text_loss": float(text), "image_loss": float(image),
                "image_perplexity": float(np.exp(image))}

    def log_images(self, model, batch):
        """Rows of [original | its dVAE reconstruction | a sample for its caption]."""
        count = min(4, batch["image"].shape[0])
        dvae = nnx.merge(self.dvae_graphdef, batch["frozen"]["dvae"])
        images = batch["image"][:count]
        tokens = dvae.encode(images)
        samples = sample_tokens_naively(model, batch["text"][:count], jax.random.key(0))
        pictures = [images.astype(jnp.float32) / 255.0, dvae.decode(tokens),
                    dvae.decode(samples.reshape(tokens.shape))]
        rows = jnp.concatenate(pictures, axis=2)  # side by side
        grid = rows.reshape(-1, *rows.shape[2:])  # rows stacked
        return (jnp.clip(grid, 0, 1) * 255).round().astype(jnp.uint8)


def sample_tokens_naively(model, text: jax.Array, rng: jax.Array,
                          temperature: float = 1.0) -> jax.Array:
    """Image tokens (B, N) drawn one at a time with a full forward pass each.

    O(N²) work and no cache: only for the training loop's few logged samples; `sample.py`
    decodes with a KV cache.
    """
    n = model.cfg.image_length

    def body(i, tokens):
        _, logits = model(text, tokens)
        choice = jax.random.categorical(jax.random.fold_in(rng, i), logits[:, i] / temperature)
        return tokens.at[:, i].set(choice.astype(jnp.int32))

    return jax.lax.fori_loop(0, n, body, jnp.zeros((text.shape[0], n), jnp.int32))
