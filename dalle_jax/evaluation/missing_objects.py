"""Does CLIP notice a missing object? The true scene against the same scene with objects taken out.

    python -m dalle_jax.evaluation.missing_objects --workdir workdirs/mini [--examples 500]

For every example of a `synthetic_shapes` split, the data set's own pixels
(`synthetic_shapes.without_objects`) give the scene with each named object removed and the empty
scene (for a one-object scene they are the same picture). Each is scored with the example's
caption beside the true image, and a **miss** is a variant scoring at least as high as the true
scene: the caption names an object the variant lacks, so any miss lets a reranker pick an image
with something missing (an empty picture for "a yellow triangle") over one that has it.

Reported per judge: each CLIP on its own, and the committee that reranks
(`models.scorer.ClipCommittee`: its members' scores standardised among all the images scored
here with the same caption, then summed).
"""
from __future__ import annotations

import json

import numpy as np
from absl import flags

from dalle_jax import cli
from dalle_jax import workdir as workdir_lib
from dalle_jax.data import synthetic_shapes
from dalle_jax.data.examples import load_examples
from dalle_jax.models.scorer import ClipCommittee, scorer_from_workdirs

SPLITS = ("validation", "heldout")

KINDS = ("one_removed", "empty")


def scene_variants(image: np.ndarray, objects) -> list[tuple[str, np.ndarray]]:
    """[(kind, image)]: the scene without each of its objects in turn, and the empty scene
    when that is a different picture (two objects)."""
    scene = synthetic_shapes.as_object_list(objects)
    return [("empty" if len(removed) == len(scene) else "one_removed",
             synthetic_shapes.without_objects(image, scene, removed))
            for removed in synthetic_shapes.removals(scene)]


def judges_of(scorer) -> dict[str, object]:
    """{name: scorer}: the committee and each of its members, or the one CLIP."""
    if isinstance(scorer, ClipCommittee):
        return {"committee": scorer, **{f"clip {i}": member
                                       for i, member in enumerate(scorer.members)}}
    return {"clip": scorer}


def missing_object_rates(scorer, images: np.ndarray, captions: list[str],
                         objects: list) -> dict[str, dict[str, float]]:
    """{judge: {kind: share of variants scoring at least as high as their true scene, "all":
    over every variant, "variants": how many}} (see the module doc)."""
    if objects is None:
        raise ValueError("the missing-object check needs a data set with an `objects` "
                         "feature (synthetic_shapes)")
    group_images, group_captions, kinds, owner = [], [], [], []
    for index, (image, caption, scene) in enumerate(zip(images, captions, objects)):
        for kind, picture in [("true", image)] + scene_variants(image, scene):
            group_images.append(picture)
            group_captions.append(caption)
            kinds.append(kind)
            owner.append(index)
    group_images, kinds, owner = np.stack(group_images), np.array(kinds), np.array(owner)
    rates = {}
    for name, judge in judges_of(scorer).items():
        scores = judge.score(group_images, group_captions)
        true_score = scores[kinds == "true"][owner]
        missed = (scores >= true_score) & (kinds != "true")
        rates[name] = {kind: float(np.mean(missed[kinds == kind])) for kind in KINDS
                       if np.any(kinds == kind)}
        variant = kinds != "true"
        rates[name].update(all=float(np.mean(missed[variant])), variants=int(np.sum(variant)))
    return rates


def report_for_workdir(workdir: str, examples: int = 500) -> dict:
    """{split: rates} for the CLIPs that rerank a pipeline workdir's samples (or one CLIP's
    run), on the first `examples` scenes of `validation` and `heldout`."""
    clips = workdir_lib.rerankers(workdir) if workdir_lib.is_pipeline(workdir) else [workdir]
    if not clips:
        raise FileNotFoundError(f"pipeline workdir {workdir!r} has no trained CLIP")
    return rates_by_split(scorer_from_workdirs(clips), workdir_lib.read_config(clips[0]),
                          examples)


def rates_by_split(scorer, config, examples: int) -> dict:
    """{split: `missing_object_rates`} on the first `examples` scenes of `validation` and
    `heldout` of `config`'s data set."""
    report = {}
    for split in SPLITS:
        scenes = load_examples(config, split, examples)
        report[split] = missing_object_rates(scorer, scenes.images, scenes.captions,
                                             scenes.objects)
    return report


def main(argv) -> None:
    del argv
    try:
        report = report_for_workdir(flags.FLAGS.workdir, flags.FLAGS.examples)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(e)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A pipeline workdir (its CLIPs) or a CLIP's run.")
    flags.DEFINE_integer("examples", 500, "Scenes of each split.")
    flags.mark_flags_as_required(["workdir"])
    cli.run(main)
