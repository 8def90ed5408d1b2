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
evaluation does); its cell among the four captions "a {colour} {shape} in the {position}"
that name its own colour and shape (so the figure reads places alone, as reranking does when
draws differ only in where they put the object). Relations: each two-object image whose
objects share a row or a column is scored against its true relation caption and the same
caption with the relation reversed ("a red circle above a blue square" / "... below ..."),
naming either object first; `relation_accuracy` is the share of these pairs the true caption
wins (chance 0.5). Reranking needs both readings: a best-of-N pick can be no better at places
than its judge.
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from dalle_jax.evaluation.judge import as_object_list
from dalle_jax.tasks.clip import RECALL_KS, recall_at_k


def _mean_normalised(x, axis):
    m = x.mean(axis=axis)
    return m / np.linalg.norm(m, axis=-1, keepdims=True)


def class_embeddings(scorer, colours: Sequence[str], shapes: Sequence[str]):
    """(colour classes (C, E), shape classes (S, E)) from "a {colour} {shape}"."""
    captions = [f"a {c} {s}" for c in colours for s in shapes]
    text = scorer.text_embeddings(captions).reshape(len(colours), len(shapes), -1)
    return _mean_normalised(text, 1), _mean_normalised(text, 0)


def relation_pairs(objects) -> list[tuple[str, str]]:
    """(true caption, the relation reversed) for a two-object scene sharing a row or column,
    each object named first once; [] for any other scene."""
    if len(objects) != 2:
        return []
    a, b = sorted(objects, key=lambda o: (o["row"], o["col"]))  # a is above or left of b
    if a["row"] == b["row"]:
        first, second = "to the left of", "to the right of"
    elif a["col"] == b["col"]:
        first, second = "above", "below"
    else:
        return []
    name_a, name_b = (f"a {o['colour']} {o['shape']}" for o in (a, b))
    return [(f"{name_a} {first} {name_b}", f"{name_a} {second} {name_b}"),
            (f"{name_b} {second} {name_a}", f"{name_b} {first} {name_a}")]


def zero_shot_accuracy(scorer, images: np.ndarray, objects: Sequence) -> dict[str, float]:
    """Zero-shot colour, shape and position accuracy on the single-object images among
    `images`, and relation accuracy on the two-object ones (see the module doc).

    `objects[i]` is image i's ground truth as the data set's `objects` feature (or a list of
    {"colour", "shape", "row", "col"} dicts). Returns {"colour_accuracy", "shape_accuracy",
    "position_accuracy", "count" (single-object images judged), "relation_accuracy" (None
    without a related pair), "relation_pairs"}.
    """
    from dalle_jax.data.synthetic_shapes import COLOURS, POSITIONS, SHAPES

    if len(images) != len(objects):
        raise ValueError(f"{len(images)} images but {len(objects)} object lists")
    truth = [as_object_list(o) for o in objects]
    single = [i for i, t in enumerate(truth) if len(t) == 1]
    if not single:
        raise ValueError("no single-object images to classify")
    colours, shapes, cells = list(COLOURS), list(SHAPES), list(POSITIONS)
    colour_classes, shape_classes = class_embeddings(scorer, colours, shapes)
    embedded = scorer.image_embeddings(np.asarray(images)[single])
    first = [truth[i][0] for i in single]
    result = {}
    for name, classes, labels in (
            ("colour", colour_classes, [colours.index(o["colour"]) for o in first]),
            ("shape", shape_classes, [shapes.index(o["shape"]) for o in first])):
        predicted = np.argmax(embedded @ classes.T, axis=1)
        result[f"{name}_accuracy"] = float(np.mean(predicted == np.array(labels)))
    places = [f"a {c} {s} in the {p}" for c in colours for s in shapes
              for p in POSITIONS.values()]
    place_text = scorer.text_embeddings(places).reshape(len(colours), len(shapes), len(cells), -1)
    own = place_text[[colours.index(o["colour"]) for o in first],
                     [shapes.index(o["shape"]) for o in first]]  # (n, 4, E)
    predicted = np.argmax(np.einsum("ne,npe->np", embedded, own), axis=1)
    result["position_accuracy"] = float(np.mean(
        predicted == np.array([cells.index((o["row"], o["col"])) for o in first])))
    result["count"] = len(single)
    result.update(relation_accuracy(scorer, images, truth))
    return result


def relation_accuracy(scorer, images: np.ndarray, truth) -> dict:
    """The share of (true, reversed) relation caption pairs whose true one scores higher (a tie
    counts against the model), over the images `relation_pairs` gives pairs for."""
    rows, pairs = [], []
    for i, objects in enumerate(truth):
        for pair in relation_pairs(objects):
            rows.append(i)
            pairs.append(pair)
    if not pairs:
        return {"relation_accuracy": None, "relation_pairs": 0}
    related = sorted(set(rows))
    embedded = scorer.image_embeddings(np.asarray(images)[related])
    row_of = {i: r for r, i in enumerate(related)}
    texts = scorer.text_embeddings([c for pair in pairs for c in pair]).reshape(len(pairs), 2, -1)
    scores = np.einsum("pe,pce->pc", embedded[[row_of[i] for i in rows]], texts)
    return {"relation_accuracy": float(np.mean(scores[:, 0] > scores[:, 1])),
            "relation_pairs": len(pairs)}


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
