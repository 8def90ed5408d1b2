"""How well a trained CLIP matches captions and images: recall@k and zero-shot accuracy.

    python -m dalle_jax.evaluation.retrieval --workdir workdirs/clip_mini [--limit 1000]

Recall over the whole split. Image->text recall@k is the share of images with a right caption
among the k captions that score highest against it, text->image the share of captions with a
right image among their k best; ties count against the model. A caption is right for an image
when it is the same text as the image's own: `synthetic_shapes` repeats captions ("a red
circle"), and a model cannot tell apart two images that the same words describe equally well.
`in_batch` figures use only the pair's own caption within batches of `--batch` examples, as
the training loop's evaluation does (its chance level is 1/batch).

Zero-shot readings (synthetic_shapes) are `tasks/zero_shot.py`'s, as CLIP's training loop logs
them.
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np
from absl import flags

from dalle_jax import cli
from dalle_jax import workdir as workdir_lib
from dalle_jax.data.examples import load_examples
from dalle_jax.models.scorer import ClipScorer
from dalle_jax.tasks.clip import RECALL_KS, recall_at_k
from dalle_jax.tasks.zero_shot import zero_shot_accuracy


def same_caption(captions: Sequence[str]) -> np.ndarray:
    """relevant[i, j]: caption j is the same text as caption i (image i's own)."""
    ids = np.unique(np.asarray(captions), return_inverse=True)[1]
    return ids[:, None] == ids[None, :]


def in_batch_recall(similarity: np.ndarray, k: int, batch: int) -> tuple[float, float]:
    """Recall@k against the pair's own caption only, within consecutive batches."""
    n = len(similarity)
    hits = np.zeros(2)
    for start in range(0, n, batch):
        block = similarity[start:start + batch, start:start + batch]
        hits += np.asarray(recall_at_k(block, k)) * len(block)
    return float(hits[0] / n), float(hits[1] / n)


def retrieval_report(scorer, examples, batch: int = 64) -> dict:
    """Recall over the split and within batches, and zero-shot accuracy where `objects` exist."""
    similarity = scorer.image_embeddings(examples.images) @ scorer.text_embeddings(
        examples.captions).T
    relevant = same_caption(examples.captions)
    report = {"examples": len(similarity), "distinct_captions": int(len(set(examples.captions)))}
    for k in RECALL_KS:
        i2t, t2i = recall_at_k(similarity, k, relevant=relevant)
        report[f"image_to_text_recall_at_{k}"], report[f"text_to_image_recall_at_{k}"] = i2t, t2i
        i2t, t2i = in_batch_recall(similarity, k, batch)
        report[f"image_to_text_recall_at_{k}_in_batch_{batch}"] = i2t
        report[f"text_to_image_recall_at_{k}_in_batch_{batch}"] = t2i
    if examples.objects is not None:
        report["zero_shot"] = zero_shot_accuracy(scorer, examples.images, examples.objects)
    return report


def report_for_workdir(workdir: str, split: str | None = None, limit: int = 0,
                       batch: int = 64) -> dict:
    """`retrieval_report` of the CLIP trained in `workdir` on `split` (default: its
    evaluation split)."""
    scorer = ClipScorer.from_workdir(workdir)
    examples = load_examples(workdir_lib.read_config(workdir), split, limit)
    return retrieval_report(scorer, examples, batch)


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A trained CLIP's workdir.")
    flags.DEFINE_string("split", None, "Default: the run's evaluation split.")
    flags.DEFINE_integer("limit", 0, "Examples (0 = the whole split).")
    flags.DEFINE_integer("batch", 64, "Batch size of in-batch recall.")
    flags.mark_flags_as_required(["workdir"])


def main(argv) -> None:
    del argv
    try:
        report = report_for_workdir(flags.FLAGS.workdir, flags.FLAGS.split, flags.FLAGS.limit,
                                    flags.FLAGS.batch)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(e)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
