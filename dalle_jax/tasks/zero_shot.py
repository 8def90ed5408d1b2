"""CLIP's zero-shot readings of `synthetic_shapes` images: colour, shape, position, relation.

The colour and the shape of each single-object image is classified among the caption templates
"a {colour} {shape}", each class embedding being the renormalised mean over the other
attribute's values (prompt ensembling, as CLIP's zero-shot evaluation does); its cell among
the four captions "a {colour} {shape} in the {position}" that name its own colour and shape
(so the figure reads places alone, as reranking does when draws differ only in where they put
the object). Relations: each two-object image whose objects share a row or a column is scored
against its true relation caption and the same caption with the relation reversed ("a red
circle above a blue square" / "... below ..."), naming either object first;
`relation_accuracy` is the share of these pairs the true caption wins (chance 0.5). Reranking
needs both readings: a best-of-N pick can be no better at places than its judge.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dalle_jax.data.synthetic_shapes import COLOURS, POSITIONS, SHAPES, as_object_list


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
