"""Training CLIP: the symmetric contrastive loss over the global batch, retrieval metrics.

Loss. For image embeddings I and caption embeddings T (B, E), L2-normalised, the logits are
s·I·Tᵀ (s = the clipped learned scale); the loss is the mean of the cross-entropy of each image
over all captions (rows) and of each caption over all images (columns), the matching pair
being the target. Every image meets every caption of the **global** batch: the step is jitted
over global arrays, so the (B, B) similarity below is the global one, and constraining the
embeddings to be replicated over the batch axes (logical names (None, None)) makes XLA gather
each device's B/n rows from the others before the matmul (tests/test_clip.py checks that the
sharded loss and gradients equal the one-device ones on the same global batch). The gather
moves 2·B·E numbers per step, negligible beside the towers. Examples whose `mask` is False
(padding of a short evaluation batch) are removed from both cross-entropies: as rows, and as
columns (a padded caption is no one's negative).

With `config.train.grad_accum` > 1 the loop computes the loss per micro-batch, so the
negatives of a step are those of its micro-batch (B / grad_accum), not the whole batch.

Evaluation (`eval_sums` / `summarize`). Recall@k is measured **within each evaluation batch**
of `config.data.batch_size` examples (the loop sums per-batch quantities, and recall over the
whole split would need every embedding at once): `image_to_text_recall_at_1_in_batch` is the
share of images whose own caption ranks first among the batch's captions, and likewise
text->image, @1 and @5. Ties count against the model (a caption tied with the right one
outranks it), so a collapsed model scores no better than chance; the chance level
(`recall_at_1_chance_in_batch`, 1/n for a batch of n real examples) is reported beside them.
Captions repeat in `synthetic_shapes` ("a red circle"), so a perfect model does not reach 1.

`zero_shot_accuracy` classifies the colour and the shape of single-object images from the
caption templates "a {colour} {shape}", averaging the text embeddings over the other attribute
(prompt ensembling, as in CLIP's zero-shot evaluation).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dalle_jax.models import clip as clip_model
from dalle_jax.models import layers

RECALL_KS = (1, 5)
LOG_IMAGES_MAX = 8
_MASKED = -1e9  # finite: a fully masked row of padding gives no NaN


def _valid(mask, batch_size):
    return jnp.ones((batch_size,), bool) if mask is None else mask.astype(bool)


def gathered(x: jax.Array) -> jax.Array:
    """Embeddings (B, E) replicated over the batch axes: every device holds the global batch."""
    return layers.constrain(x, (None, None))


def similarity(image_embeddings: jax.Array, text_embeddings: jax.Array) -> jax.Array:
    """Cosine similarities (B_images, B_texts) of the global batch, float32."""
    return jnp.einsum("ie,te->it", gathered(image_embeddings).astype(jnp.float32),
                      gathered(text_embeddings).astype(jnp.float32))


def contrastive_terms(logits: jax.Array, mask: jax.Array | None = None):
    """Per-example cross-entropies (image->text, text->image) (B,), and the matching hits.

    logits[i, j] scores image i against caption j; the pair (i, i) is the target. Rows and
    columns of masked-out examples are left out of every softmax; their own terms are zero.
    """
    n = logits.shape[0]
    valid = _valid(mask, n)
    logits = logits.astype(jnp.float32)
    diagonal = jnp.diagonal(logits)
    rows = jnp.where(valid[None, :], logits, _MASKED)  # image i over the real captions
    cols = jnp.where(valid[:, None], logits, _MASKED)  # caption j over the real images
    image_to_text = jax.nn.logsumexp(rows, axis=1) - diagonal
    text_to_image = jax.nn.logsumexp(cols, axis=0) - diagonal
    index = jnp.arange(n)
    hits_i2t = jnp.argmax(rows, axis=1) == index
    hits_t2i = jnp.argmax(cols, axis=0) == index
    zero = jnp.zeros_like(diagonal)
    return (jnp.where(valid, image_to_text, zero), jnp.where(valid, text_to_image, zero),
            hits_i2t & valid, hits_t2i & valid)


def contrastive_loss(image_embeddings, text_embeddings, scale, mask=None):
    """(loss, metrics): the symmetric cross-entropy, mean over the real examples of the
    global batch, and the share of images / captions whose partner scores highest."""
    logits = scale * similarity(image_embeddings, text_embeddings)
    i2t, t2i, hit_i2t, hit_t2i = contrastive_terms(logits, mask)
    count = jnp.maximum(jnp.sum(_valid(mask, logits.shape[0]).astype(jnp.float32)), 1.0)
    loss = (jnp.sum(i2t) + jnp.sum(t2i)) / (2.0 * count)
    metrics = {"image_to_text_loss": jnp.sum(i2t) / count,
               "text_to_image_loss": jnp.sum(t2i) / count,
               "image_to_text_accuracy": jnp.sum(hit_i2t) / count,
               "text_to_image_accuracy": jnp.sum(hit_t2i) / count}
    return loss, metrics


def partner_ranks(similarity, mask=None):
    """(image->text, text->image) rank of each example's own partner, 0 = first; ties
    count against it. Works on numpy and jax arrays (also inside jit)."""
    s = jnp.asarray(similarity, jnp.float32)
    n = s.shape[0]
    if s.shape != (n, n):
        raise ValueError(f"similarity must be square (images x their captions), got {s.shape}")
    valid = _valid(None if mask is None else jnp.asarray(mask), n)
    others = valid[None, :] & ~jnp.eye(n, dtype=bool)
    diagonal = jnp.diagonal(s)
    image_to_text = jnp.sum((s >= diagonal[:, None]) & others, axis=1)
    text_to_image = jnp.sum((s >= diagonal[None, :]) & others.T, axis=0)
    return image_to_text, text_to_image


def recall_at_k(similarity: np.ndarray, k: int, mask=None) -> tuple[float, float]:
    """(image->text, text->image) recall@k of a square similarity[image, caption] whose
    matching pairs are on the diagonal: the share of rows (columns) whose diagonal entry is
    among their k largest, ties counting against it. `mask` leaves examples out."""
    if k < 1:
        raise ValueError(f"recall@k needs k >= 1, got {k}")
    i2t, t2i = (np.asarray(r) for r in partner_ranks(similarity, mask))
    valid = np.ones(len(i2t), bool) if mask is None else np.asarray(mask, bool)
    count = max(int(valid.sum()), 1)
    return float(np.sum((i2t < k) & valid) / count), float(np.sum((t2i < k) & valid) / count)


class ClipTask:
    name = "clip"

    def __init__(self, config):
        self.config = config
        self.model_config = clip_model.clip_config(config.model, config.data, config.text,
                                                   config.train.compute_dtype)

    # --- the Task interface -------------------------------------------------------------

    def build_model(self, rngs: nnx.Rngs) -> clip_model.CLIP:
        return clip_model.CLIP(self.model_config, rngs=rngs)

    def flops_per_example(self) -> float:
        return clip_model.flops_per_example(self.model_config, self.config.data.batch_size)

    def loss(self, model, batch, rng, step):
        del rng, step
        images, texts, scale = model(batch["image"], batch["text"])
        loss, metrics = contrastive_loss(images, texts, scale, batch.get("mask"))
        return loss, dict(metrics, logit_scale=scale)

    def eval_sums(self, model, batch):
        images, texts, scale = model(batch["image"], batch["text"])
        mask = batch["mask"]
        sims = similarity(images, texts)
        i2t, t2i, _, _ = contrastive_terms(scale * sims, mask)
        rank_i2t, rank_t2i = partner_ranks(sims, mask)
        real = mask.astype(jnp.float32)
        count = jnp.sum(real)
        sums = {"count": count, "loss": 0.5 * jnp.sum(i2t + t2i),
                # 1/n for each of n real examples: sums to the batches' count, so the mean
                # over examples is the chance recall@1 of these batches.
                "chance_at_1": jnp.where(count > 0, 1.0, 0.0)}
        for k in RECALL_KS:
            sums[f"image_to_text_at_{k}"] = jnp.sum((rank_i2t < k) * real)
            sums[f"text_to_image_at_{k}"] = jnp.sum((rank_t2i < k) * real)
        return sums

    def summarize(self, sums):
        sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
        count = max(float(sums["count"]), 1.0)
        out = {"loss": float(sums["loss"] / count),
               "recall_at_1_chance_in_batch": float(sums["chance_at_1"] / count)}
        for k in RECALL_KS:
            for direction in ("image_to_text", "text_to_image"):
                out[f"{direction}_recall_at_{k}_in_batch"] = float(
                    sums[f"{direction}_at_{k}"] / count)
        return out

    def log_images(self, model, batch):
        """Two rows: the first n images of the batch, and below each the batch image the
        model retrieves for that image's caption (text->image top 1 among the real ones)."""
        n = min(LOG_IMAGES_MAX, batch["image"].shape[0])
        images, texts, _ = model(batch["image"], batch["text"])
        sims = similarity(images, texts[:n])  # (B, n): every batch image against n captions
        sims = jnp.where(batch["mask"][:, None], sims, -jnp.inf)
        retrieved = jnp.take(batch["image"], jnp.argmax(sims, axis=0), axis=0)
        rows = [jnp.concatenate(list(row), axis=1) for row in (batch["image"][:n], retrieved)]
        return jnp.concatenate(rows, axis=0).astype(jnp.uint8)


# --- zero-shot classification ---------------------------------------------------------------

_encode_images = nnx.jit(lambda model, images: model.encode_images(images))
_encode_text = nnx.jit(lambda model, text: model.encode_text(text))


def _chunked(fn, model, inputs: np.ndarray, chunk: int) -> np.ndarray:
    """fn over fixed-size chunks (the last padded with zeros), so one compilation serves all."""
    out = []
    for start in range(0, len(inputs), chunk):
        part = inputs[start:start + chunk]
        padded = np.concatenate([part, np.zeros((chunk - len(part),) + part.shape[1:],
                                                part.dtype)])
        out.append(np.asarray(fn(model, padded))[:len(part)])
    return np.concatenate(out)


def embed_images(model: clip_model.CLIP, images: np.ndarray, chunk: int = 64) -> np.ndarray:
    """uint8 (N, S, S, 3) -> float32 (N, E), in jit-compiled chunks."""
    return _chunked(_encode_images, model, np.asarray(images, np.uint8), chunk)


def embed_captions(model: clip_model.CLIP, tokenizer, captions: Sequence[str],
                   chunk: int = 64) -> np.ndarray:
    """Captions -> float32 (N, E), tokenised to the model's text length."""
    ids = np.stack([tokenizer.encode(c, model.cfg.text_length) for c in captions])
    return _chunked(_encode_text, model, ids, chunk)


def class_embeddings(model, tokenizer, colours: Sequence[str], shapes: Sequence[str]):
    """(colour classes (C, E), shape classes (S, E)) from "a {colour} {shape}", each class the
    renormalised mean over the other attribute's values."""
    captions = [f"a {c} {s}" for c in colours for s in shapes]
    text = embed_captions(model, tokenizer, captions).reshape(len(colours), len(shapes), -1)

    def mean_normalised(x, axis):
        m = x.mean(axis=axis)
        return m / np.linalg.norm(m, axis=-1, keepdims=True)

    return mean_normalised(text, 1), mean_normalised(text, 0)


def zero_shot_accuracy(model: clip_model.CLIP, tokenizer, images: np.ndarray,
                       objects: Sequence) -> dict[str, float]:
    """Zero-shot colour and shape accuracy on the single-object images among `images`.

    `objects[i]` is image i's ground truth as the data set's `objects` feature (or a list of
    {"colour", "shape", ...} dicts); images with more than one object are skipped. Returns
    {"colour_accuracy", "shape_accuracy", "count"} (count = single-object images judged).
    """
    from dalle_jax.data.synthetic_shapes import COLOURS, SHAPES
    from dalle_jax.evaluation.judge import as_object_list

    if len(images) != len(objects):
        raise ValueError(f"{len(images)} images but {len(objects)} object lists")
    truth = [as_object_list(o) for o in objects]
    single = [i for i, t in enumerate(truth) if len(t) == 1]
    if not single:
        raise ValueError("no single-object images to classify")
    colours, shapes = list(COLOURS), list(SHAPES)
    colour_classes, shape_classes = class_embeddings(model, tokenizer, colours, shapes)
    embedded = embed_images(model, np.asarray(images)[single])
    colour_true = np.array([colours.index(truth[i][0]["colour"]) for i in single])
    shape_true = np.array([shapes.index(truth[i][0]["shape"]) for i in single])
    colour_pred = np.argmax(embedded @ colour_classes.T, axis=1)
    shape_pred = np.argmax(embedded @ shape_classes.T, axis=1)
    return {"colour_accuracy": float(np.mean(colour_pred == colour_true)),
            "shape_accuracy": float(np.mean(shape_pred == shape_true)),
            "count": len(single)}
