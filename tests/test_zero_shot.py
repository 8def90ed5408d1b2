"""Zero-shot CLIP readings (tasks/zero_shot.py) against a scorer that knows the truth.

The stand-in scorer's "embeddings" make image i's score for a caption the judge's verdict on
image i's ground-truth objects, so a perfect reader must get every reading right, and one blind
to places (captions stripped of positions and relations) must fall to what ties give it.
"""
import re

import numpy as np
import pytest

from dalle_jax.data import synthetic_shapes
from dalle_jax.evaluation import judge
from dalle_jax.tasks import zero_shot

_PLACES = re.compile(r" in the (top|bottom) (left|right)")
_RELATIONS = re.compile(r" (to the left of|to the right of|above|below) ")


class TruthScorer:
    """image_embeddings: one-hot rows naming the image; text_embeddings: per image, 1.0 where
    the caption is true of its objects (`blind`: positions and relations ignored)."""

    def __init__(self, images, objects, blind=False):
        self.keys = [im.tobytes() for im in images]
        self.truth = [synthetic_shapes.as_object_list(o) for o in objects]
        self.blind = blind

    def image_embeddings(self, images):
        rows = [self.keys.index(im.tobytes()) for im in images]
        return np.eye(len(self.keys))[rows]

    def text_embeddings(self, captions):
        if self.blind:
            captions = [_RELATIONS.sub(" and ", _PLACES.sub("", c)) for c in captions]
        return np.array([[judge.judge_objects(t, c)["match"] for t in self.truth]
                         for c in captions], dtype=np.float64)


@pytest.fixture(scope="module")
def scenes():
    examples = [synthetic_shapes.generate_example(0, "validation", i, 32) for i in range(120)]
    return (np.stack([e["image"] for e in examples]),
            [synthetic_shapes.as_object_list(e["objects"]) for e in examples])


def test_relation_pairs_are_a_true_caption_and_its_reversal(scenes):
    images, objects = scenes
    pairs = [(i, p) for i, o in enumerate(objects) for p in zero_shot.relation_pairs(o)]
    assert len(pairs) > 20
    for i, (true, reversed_) in pairs:
        assert judge.matches(images[i], true), true  # read from the pixels
        assert not judge.matches(images[i], reversed_), reversed_
    diagonal = [o for o in objects if len(o) == 2 and o[0]["row"] != o[1]["row"]
                and o[0]["col"] != o[1]["col"]]
    assert diagonal and all(zero_shot.relation_pairs(o) == [] for o in diagonal)


def test_a_reader_of_the_truth_gets_every_zero_shot_reading_right(scenes):
    images, objects = scenes
    result = zero_shot.zero_shot_accuracy(TruthScorer(images, objects), images, objects)
    single = [o for o in objects if len(o) == 1]
    assert result["count"] == len(single)
    assert result["relation_pairs"] == sum(len(zero_shot.relation_pairs(o)) for o in objects)
    for name in ("colour", "shape", "position", "relation"):
        assert result[f"{name}_accuracy"] == 1.0, (name, result)


def test_a_reader_blind_to_places_scores_what_ties_give_it(scenes):
    images, objects = scenes
    result = zero_shot.zero_shot_accuracy(TruthScorer(images, objects, blind=True), images,
                                          objects)
    single = [o[0] for o in objects if len(o) == 1]
    assert result["colour_accuracy"] == result["shape_accuracy"] == 1.0
    # Four tied positions: the first class (top left) is picked for every image.
    assert result["position_accuracy"] == pytest.approx(
        np.mean([(o["row"], o["col"]) == (0, 0) for o in single]))
    assert result["relation_accuracy"] == 0.0  # a tie counts against the model
