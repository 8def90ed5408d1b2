"""How well a trained CLIP matches captions and images: recall@k and zero-shot accuracy.

    python -m dalle_jax.evaluation.retrieval --workdir workdirs/clip_mini [--limit 1000]

Recall over the whole split. Image->text recall@k is the share of images with a right caption
among the k captions that score highest against it, text->image the share of captions with a
right image among their k best; ties count against the model. A caption is right for an image
when it is the same text as the image's own: `synthetic_shapes` repeats captions ("a red
circle"), and a model cannot tell apart two images that the same words describe equally well.
`in_batch` figures use only the pair's own caption within batches of `--batch` examples, as
the training loop's evaluation does (its chance level is 1/batch).

Zero-shot (synthetic_shapes): the colour and the shape of each single-object image is
classified among the caption templates "a {colour} {shape}", each class embedding being the
renormalised mean over the other attribute's values (prompt ensembling, as CLIP's zero-shot
evaluation does).
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from dalle_jax.evaluation.judge import as_object_list
from dalle_jax.tasks.clip import RECALL_KS, recall_at_k


def class_embeddings(scorer, colours: Sequence[str], shapes: Sequence[str]):
    """(colour classes (C, E), shape classes (S, E)) from "a {colour} {shape}"."""
    captions = [f"a {c} {s}" for c in colours for s in shapes]
    text = scorer.text_embeddings(captions).reshape(len(colours), len(shapes), -1)

    def mean_normalised(x, axis):
        m = x.mean(axis=axis)
        return m / np.linalg.norm(m, axis=-1, keepdims=True)

    return mean_normalised(text, 1), mean_normalised(text, 0)


def zero_shot_accuracy(scorer, images: np.ndarray, objects: Sequence) -> dict[str, float]:
    """Zero-shot colour and shape accuracy on the single-object images among `images`.

    `objects[i]` is image i's ground truth as the data set's `objects` feature (or a list of
    {"colour", "shape", ...} dicts); images with more than one object are skipped. Returns
    {"colour_accuracy", "shape_accuracy", "count"} (count = single-object images judged).
    """
    from dalle_jax.data.synthetic_shapes import COLOURS, SHAPES

    if len(images) != len(objects):
        raise ValueError(f"{len(images)} images but {len(objects)} object lists")
    truth = [as_object_list(o) for o in objects]
    single = [i for i, t in enumerate(truth) if len(t) == 1]
    if not single:
        raise ValueError("no single-object images to classify")
    colours, shapes = list(COLOURS), list(SHAPES)
    colour_classes, shape_classes = class_embeddings(scorer, colours, shapes)
    embedded = scorer.image_embeddings(np.asarray(images)[single])
    colour_true = np.array([colours.index(truth[i][0]["colour"]) for i in single])
    shape_true = np.array([shapes.index(truth[i][0]["shape"]) for i in single])
    colour_pred = np.argmax(embedded @ colour_classes.T, axis=1)
    shape_pred = np.argmax(embedded @ shape_classes.T, axis=1)
    return {"colour_accuracy": float(np.mean(colour_pred == colour_true)),
            "shape_accuracy": float(np.mean(shape_pred == shape_true)),
            "count": len(single)}


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


def main(argv=None):
    import argparse

    from dalle_jax.evaluation.examples import load_examples
    from dalle_jax.models.scorer import ClipScorer
    from dalle_jax.training.restore import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a trained CLIP's workdir")
    parser.add_argument("--split", default=None, help="default: the run's evaluation split")
    parser.add_argument("--limit", type=int, default=0, help="examples (0 = the whole split)")
    parser.add_argument("--batch", type=int, default=64, help="batch size of in-batch recall")
    args = parser.parse_args(argv)
    try:
        scorer = ClipScorer.from_workdir(args.workdir)
        examples = load_examples(load_config(args.workdir), args.split, args.limit)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(1, f"retrieval: {e}\n")
    print(json.dumps(retrieval_report(scorer, examples, args.batch), indent=1))


if __name__ == "__main__":
    main()
