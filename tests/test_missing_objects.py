"""The missing-object check of `dalle_jax.evaluate`: which variants it scores and what it counts,
against judges whose verdicts are known in advance; its command on the tiny pipeline."""
import os

import numpy as np
import pytest

from dalle_jax.data import synthetic_shapes
from dalle_jax.evaluation import judge
from dalle_jax.evaluation.missing_objects import missing_object_rates, scene_variants
from dalle_jax.models.scorer import ClipCommittee


class PixelCounter:
    """Scores an image by how many pixels differ from its background: more objects, more
    score, so a true scene always beats its variants (sign=1) or always loses (sign=-1)."""

    def __init__(self, sign=1.0):
        self.sign = sign
        self.image_embeddings = self.text_embeddings = None  # a committee's first member's

    def score(self, images, captions):
        assert len(captions) in (1, len(images))
        return np.array([self.sign * np.sum(np.any(im != im[0, 0], axis=-1)) for im in images],
                        np.float32)


class Constant:
    image_embeddings = text_embeddings = None

    def score(self, images, captions):
        return np.zeros(len(images), np.float32)


@pytest.fixture(scope="module")
def examples():
    records = [synthetic_shapes.generate_example(0, "validation", i, 32) for i in range(40)]
    return ([r["image"] for r in records], [r["caption"] for r in records],
            [r["objects"] for r in records])


def test_variants_lack_exactly_the_removed_objects(examples):
    for image, caption, objects in zip(*examples):
        scene = synthetic_shapes.as_object_list(objects)
        variants = scene_variants(image, objects)
        assert [kind for kind, _ in variants] == (
            ["empty"] if len(scene) == 1 else ["one_removed", "one_removed", "empty"])
        assert judge.matches(image, caption)
        for kind, picture in variants:
            assert not judge.matches(picture, caption)
            read = judge.find_objects(picture)
            assert len(read) == (0 if kind == "empty" else len(scene) - 1)


def test_rates_count_every_variant_of_every_scene(examples):
    images, captions, objects = examples
    sizes = [len(synthetic_shapes.as_object_list(o)) for o in objects]
    rates = missing_object_rates(PixelCounter(), np.stack(images), captions, objects)
    assert set(rates) == {"clip"}
    assert rates["clip"]["variants"] == sum(1 if n == 1 else 3 for n in sizes)
    assert rates["clip"]["all"] == rates["clip"]["one_removed"] == rates["clip"]["empty"] == 0.0
    backwards = missing_object_rates(PixelCounter(-1.0), np.stack(images), captions, objects)
    assert backwards["clip"]["all"] == 1.0
    ties = missing_object_rates(Constant(), np.stack(images), captions, objects)
    assert ties["clip"]["all"] == 1.0  # a tie is a miss: the caption names what is missing


def test_a_committee_is_reported_with_each_member(examples):
    images, captions, objects = examples
    committee = ClipCommittee([PixelCounter(), PixelCounter(-1.0)])
    rates = missing_object_rates(committee, np.stack(images), captions, objects)
    assert set(rates) == {"committee", "clip 0", "clip 1"}
    assert rates["clip 0"]["all"] == 0.0 and rates["clip 1"]["all"] == 1.0
    # Opposite standardised scores sum to zero: every variant ties its scene.
    assert rates["committee"]["all"] == 1.0
    outvoted = ClipCommittee([PixelCounter(), PixelCounter(), PixelCounter(-1.0)])
    assert missing_object_rates(outvoted, np.stack(images), captions,
                                objects)["committee"]["all"] == 0.0


def test_a_data_set_without_objects_is_a_one_line_error(examples):
    images, captions, _ = examples
    with pytest.raises(ValueError, match="objects"):
        missing_object_rates(PixelCounter(), np.stack(images), captions, None)


def test_the_command_reports_a_pipelines_clips_and_names_a_bad_workdir(pipeline_run, tmp_path):
    import json
    import subprocess
    import sys

    from dalle_jax import workdir as workdir_lib
    from dalle_jax.data.examples import load_examples
    from dalle_jax.evaluation import missing_objects
    from dalle_jax.models.scorer import scorer_from_workdirs

    command = [sys.executable, "-m", "dalle_jax.evaluation.missing_objects", "--examples=12"]
    out = subprocess.run(command + [f"--workdir={pipeline_run}"], capture_output=True,
                         text=True, check=True)
    report = json.loads(out.stdout)
    # The same rates as the function on the pipeline's two CLIPs and the splits' first scenes.
    clips = [os.path.join(pipeline_run, stage) for stage in ("clip", "grey_clip")]
    scorer = scorer_from_workdirs(clips)
    config = workdir_lib.read_config(clips[0])
    for split in ("validation", "heldout"):
        scenes = load_examples(config, split, 12)
        expected = missing_objects.missing_object_rates(scorer, scenes.images, scenes.captions,
                                                        scenes.objects)
        assert set(report[split]) == set(expected)
        for judge_name, rates in expected.items():
            assert report[split][judge_name] == pytest.approx(rates)
    bad = subprocess.run(command + [f"--workdir={tmp_path}"], capture_output=True, text=True)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith(
        "dalle_jax.evaluation.missing_objects: ")
