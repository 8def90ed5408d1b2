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

Hard negatives. With `config.data.contrast_words`, every example also carries
`config.data.contrast_count` different captions, each its own made false by one edit (a
colour, shape or place word changed, or two swapped; text/contrast.py), and each image's
softmax runs over the batch's captions and all these negatives: the in-batch negatives rarely
differ from a caption in one attribute, which is exactly the difference reranking has to see.
`hard_negative_accuracy` (logged, and in evaluation) is the share of (image, own negative)
pairs in which the image scores its own caption higher.

Missing objects. With `config.data.missing_object_negatives` = k (synthetic_shapes), the first
k examples of the batch also carry their image with some of the caption's objects taken out (the
data set's own pixels), and each of their captions' softmax over the batch's images also runs
over its own such image: in-batch images rarely show the same scene with a piece missing, yet a
reranker must score an image that lacks a named object (e.g. an empty one) below one that has
it. `missing_object_accuracy` is the share of those captions scoring their true image higher (in
evaluation: of every example's).

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

At every evaluation the task also measures zero-shot colour, shape, position and relation
accuracy on the first `config.task.zero_shot_examples` validation images of synthetic_shapes
(host-side, see `tasks/zero_shot.py`); `python -m dalle_jax.evaluation.retrieval
--workdir W` reports that and recall over the whole split.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dalle_jax.data.examples import load_examples
from dalle_jax.models import clip as clip_model
from dalle_jax.models import layers
from dalle_jax.models.scorer import ClipScorer
from dalle_jax.tasks import zero_shot
from dalle_jax.tasks.task import Task

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


def contrastive_terms(logits: jax.Array, mask: jax.Array | None = None,
                      negative_logits: jax.Array | None = None,
                      negative_mask: jax.Array | None = None,
                      negative_image_logits: jax.Array | None = None):
    """Per-example cross-entropies (image->text, text->image) (B,), and the matching hits.

    logits[i, j] scores image i against caption j; the pair (i, i) is the target. Rows and
    columns of masked-out examples are left out of every softmax; their own terms are zero.
    negative_logits[i, j·k + m] (optional, (B, B·k)) scores image i against hard negative m
    of example j, `negative_mask` (B·k,) says which exist: every image's softmax also runs
    over the batch's usable negatives. negative_image_logits[j] (optional, (k,), k <= B)
    scores caption j < k against its own negative image (its scene with an object taken out),
    which joins caption j's softmax over the images.
    """
    n = logits.shape[0]
    valid = _valid(mask, n)
    logits = logits.astype(jnp.float32)
    diagonal = jnp.diagonal(logits)
    rows = jnp.where(valid[None, :], logits, _MASKED)  # image i over the real captions
    cols = jnp.where(valid[:, None], logits, _MASKED)  # caption j over the real images
    if negative_logits is not None:
        usable = usable_negatives(valid, negative_mask, negative_logits.shape[1])
        rows = jnp.concatenate(
            [rows, jnp.where(usable[None, :], negative_logits.astype(jnp.float32), _MASKED)],
            axis=1)
    if negative_image_logits is not None:
        extra = jnp.full((n,), _MASKED, jnp.float32).at[:negative_image_logits.shape[0]].set(
            negative_image_logits.astype(jnp.float32))
        cols = jnp.concatenate([cols, extra[None, :]], axis=0)
    image_to_text = jax.nn.logsumexp(rows, axis=1) - diagonal
    text_to_image = jax.nn.logsumexp(cols, axis=0) - diagonal
    index = jnp.arange(n)
    hits_i2t = jnp.argmax(rows, axis=1) == index
    hits_t2i = jnp.argmax(cols, axis=0) == index
    zero = jnp.zeros_like(diagonal)
    return (jnp.where(valid, image_to_text, zero), jnp.where(valid, text_to_image, zero),
            hits_i2t & valid, hits_t2i & valid)


def usable_negatives(valid: jax.Array, negative_mask, count: int) -> jax.Array:
    """(B·k,) the negatives that exist and belong to a real example; `count` = B·k."""
    per_example = count // valid.shape[0]
    return jnp.repeat(valid, per_example) & _valid(negative_mask, count)


def hard_negative_wins(sims: jax.Array, negative_sims: jax.Array, usable: jax.Array):
    """(B, k): 1 where image i scores its own caption above its own negative m (columns
    i·k + m of the (B, B·k) `negative_sims`) and that negative is usable."""
    n = sims.shape[0]
    k = negative_sims.shape[1] // n
    index = jnp.arange(n)
    own_negatives = negative_sims.reshape(n, n, k)[index, index]
    own = jnp.diagonal(sims)[:, None] > own_negatives
    return (own & usable.reshape(n, k)).astype(jnp.float32)


def contrastive_loss(image_embeddings, text_embeddings, scale, mask=None,
                     negative_embeddings=None, negative_mask=None,
                     negative_image_embeddings=None):
    """(loss, metrics): the symmetric cross-entropy, mean over the real examples of the
    global batch, and the share of images / captions whose partner scores highest. With
    `negative_embeddings` (the examples' hard negative captions), each image's softmax also
    runs over them (`negative_embeddings` (B·k, E): example j's k negatives at rows j·k...,
    `negative_mask` (B·k,)), and `hard_negative_accuracy` is the share of (image, own
    negative) pairs in which the image scores its own caption higher. With
    `negative_image_embeddings` (k, E: the first k examples' scenes with objects taken out),
    each of those captions' softmax also runs over its own negative image, and
    `missing_object_accuracy` is the share of them scoring their true image higher."""
    sims = similarity(image_embeddings, text_embeddings)
    negative_sims = None
    if negative_embeddings is not None:
        negative_sims = similarity(image_embeddings, negative_embeddings)
    negative_image_sims = None
    if negative_image_embeddings is not None:
        k = negative_image_embeddings.shape[0]
        negative_image_sims = jnp.sum(
            gathered(negative_image_embeddings).astype(jnp.float32)
            * gathered(text_embeddings)[:k].astype(jnp.float32), axis=1)
    n = sims.shape[0]
    i2t, t2i, hit_i2t, hit_t2i = contrastive_terms(
        scale * sims, mask, None if negative_sims is None else scale * negative_sims,
        negative_mask, None if negative_image_sims is None else scale * negative_image_sims)
    count = jnp.maximum(jnp.sum(_valid(mask, n).astype(jnp.float32)), 1.0)
    loss = (jnp.sum(i2t) + jnp.sum(t2i)) / (2.0 * count)
    metrics = {"image_to_text_loss": jnp.sum(i2t) / count,
               "text_to_image_loss": jnp.sum(t2i) / count,
               "image_to_text_accuracy": jnp.sum(hit_i2t) / count,
               "text_to_image_accuracy": jnp.sum(hit_t2i) / count}
    if negative_sims is not None:
        usable = usable_negatives(_valid(mask, n), negative_mask, negative_sims.shape[1])
        metrics["hard_negative_accuracy"] = (
            jnp.sum(hard_negative_wins(sims, negative_sims, usable))
            / jnp.maximum(jnp.sum(usable.astype(jnp.float32)), 1.0))
    if negative_image_sims is not None:
        k = negative_image_sims.shape[0]
        real = _valid(mask, n)[:k]
        wins = (jnp.diagonal(sims)[:k] > negative_image_sims) & real
        metrics["missing_object_accuracy"] = (jnp.sum(wins.astype(jnp.float32))
                                              / jnp.maximum(jnp.sum(real), 1))
    return loss, metrics


def partner_ranks(similarity, mask=None, relevant=None):
    """(image->text, text->image) rank of each example's best right answer, 0 = first: the
    number of wrong answers scoring at least as high (ties count against the model).

    `relevant[i, j]` says caption j describes image i; by default only the pair's own
    (the diagonal). Works on numpy and jax arrays (also inside jit).
    """
    s = jnp.asarray(similarity, jnp.float32)
    n = s.shape[0]
    if s.shape != (n, n):
        raise ValueError(f"similarity must be square (images x their captions), got {s.shape}")
    valid = _valid(None if mask is None else jnp.asarray(mask), n)
    right = jnp.eye(n, dtype=bool) if relevant is None else jnp.asarray(relevant, bool)
    if right.shape != (n, n):
        raise ValueError(f"relevant must be {(n, n)} like the similarity, got {right.shape}")
    best_caption = jnp.max(jnp.where(right, s, -jnp.inf), axis=1)
    best_image = jnp.max(jnp.where(right, s, -jnp.inf), axis=0)
    image_to_text = jnp.sum((s >= best_caption[:, None]) & valid[None, :] & ~right, axis=1)
    text_to_image = jnp.sum((s >= best_image[None, :]) & valid[:, None] & ~right, axis=0)
    return image_to_text, text_to_image


def recall_at_k(similarity: np.ndarray, k: int, mask=None,
                relevant=None) -> tuple[float, float]:
    """(image->text, text->image) recall@k of a square similarity[image, caption]: the share
    of images (captions) with a right answer among their k best, ties counting against it.
    Right answers are the diagonal, or `relevant[i, j]`; `mask` leaves examples out."""
    if k < 1:
        raise ValueError(f"recall@k needs k >= 1, got {k}")
    i2t, t2i = (np.asarray(r) for r in partner_ranks(similarity, mask, relevant))
    valid = np.ones(len(i2t), bool) if mask is None else np.asarray(mask, bool)
    count = max(int(valid.sum()), 1)
    return float(np.sum((i2t < k) & valid) / count), float(np.sum((t2i < k) & valid) / count)


def negative_embeddings(model, batch):
    """(B·k, E) embeddings of the batch's (B, k, length) hard negative captions, example-major,
    and their (B·k,) mask; (None, None) without negatives."""
    if "negative_text" not in batch:
        return None, None
    text = batch["negative_text"]
    count = text.shape[0] * text.shape[1]
    return (model.encode_text(text.reshape(count, text.shape[2])),
            batch["negative_mask"].reshape(count).astype(bool))


class ClipTask(Task):
    name = "clip"

    def __init__(self, config):
        self.config = config
        self.model_config = clip_model.clip_config(config.model, config.data, config.text,
                                                   config.train.compute_dtype)
        self._zero_shot_examples = None  # loaded on first use

    # --- the Task interface -------------------------------------------------------------

    def build_model(self, rngs: nnx.Rngs) -> clip_model.CLIP:
        return clip_model.from_config(self.config, rngs)

    def flops_per_example(self) -> float:
        data = self.config.data
        return clip_model.flops_per_example(
            self.model_config, data.batch_size,
            images=1 + data.get("missing_object_negatives", 0) / data.batch_size,
            captions=1 + (data.contrast_count if data.contrast_words else 0))

    def loss(self, model, batch, rng, step):
        del rng, step
        negative_images = None
        count = self.config.data.get("missing_object_negatives", 0)
        if count and "negative_image" in batch:
            # One pass of the image tower over both: larger matmuls than two passes.
            both = model.encode_images(
                jnp.concatenate([batch["image"], batch["negative_image"][:count]]))
            images, negative_images = both[:-count], both[-count:]
            texts, scale = model.encode_text(batch["text"]), model.logit_scale_value()
        else:
            images, texts, scale = model(batch["image"], batch["text"])
        negatives, negative_mask = negative_embeddings(model, batch)
        loss, metrics = contrastive_loss(images, texts, scale, batch.get("mask"), negatives,
                                         negative_mask, negative_images)
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
        if "negative_text" in batch:
            negatives, negative_mask = negative_embeddings(model, batch)
            negative_sims = similarity(images, negatives)
            usable = usable_negatives(mask.astype(bool), negative_mask, negative_sims.shape[1])
            sums["hard_negative_count"] = jnp.sum(usable.astype(jnp.float32))
            sums["hard_negative_wins"] = jnp.sum(hard_negative_wins(sims, negative_sims, usable))
        if "negative_image" in batch:
            negative_images = model.encode_images(batch["negative_image"])
            negative_image_sims = jnp.sum(gathered(negative_images) * gathered(texts), axis=1)
            sums["missing_object_wins"] = jnp.sum((jnp.diagonal(sims) > negative_image_sims)
                                                  * real)
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
        if "missing_object_wins" in sums:
            out["missing_object_accuracy"] = float(sums["missing_object_wins"] / count)
        if "hard_negative_count" in sums:
            out["hard_negative_accuracy"] = float(
                sums["hard_negative_wins"] / max(float(sums["hard_negative_count"]), 1.0))
        return out

    def evaluate_model(self, model, tokenizer) -> dict[str, float]:
        """Zero-shot colour/shape/position accuracy on single-object validation images and
        relation accuracy on two-object ones (synthetic_shapes only; the loop calls this after
        the batched evaluation, on one process)."""
        limit = self.config.task.get("zero_shot_examples", 0)
        if self.config.data.name != "synthetic_shapes" or not limit:
            return {}
        if self._zero_shot_examples is None:
            self._zero_shot_examples = load_examples(self.config, limit=limit)
        examples = self._zero_shot_examples
        result = zero_shot.zero_shot_accuracy(ClipScorer(model, tokenizer), examples.images,
                                              examples.objects)
        metrics = {f"zero_shot_{name}_accuracy": result[f"{name}_accuracy"]
                   for name in ("colour", "shape", "position", "relation")}
        return {k: v for k, v in metrics.items() if v is not None}

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
