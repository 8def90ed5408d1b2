"""CLIP's hard negative captions: each is false of its image (judged from pixels), none holds
a held-out pair, and the loss that uses them equals a direct computation."""
import collections

import numpy as np
import pytest

from dalle_jax import config_lib
from dalle_jax.data import synthetic_shapes
from dalle_jax.evaluation import judge
from dalle_jax.tasks import clip as clip_task
from dalle_jax.text.contrast import contrast_caption, phrases, word_group_index


@pytest.fixture(scope="module")
def clip_data():
    return config_lib.load("clip_mini").data


def test_clip_mini_contrast_words_are_the_data_sets_vocabulary(clip_data):
    groups = [tuple(g) for g in clip_data.contrast_words]
    assert set(groups[0]) == set(synthetic_shapes.COLOURS)
    assert set(groups[1]) == set(synthetic_shapes.SHAPES)
    assert set(clip_data.contrast_excluded) == {
        f"{colour} {shape}" for colour, shape in synthetic_shapes.HELDOUT_PAIRS}


def test_every_negative_is_false_of_its_image_and_holds_no_heldout_pair(clip_data):
    groups = [tuple(g) for g in clip_data.contrast_words]
    rng = np.random.default_rng(0)
    kinds = set()
    for index in range(150):
        example = synthetic_shapes.generate_example(0, "train", index, 32)
        image, caption = example["image"], example["caption"]
        assert judge.matches(image, caption), caption  # the judge reads the truth
        for _ in range(3):
            negative = contrast_caption(caption, groups, rng, tuple(clip_data.contrast_excluded))
            assert negative is not None and negative != caption
            assert not judge.matches(image, negative), (caption, negative)
            assert not any(f" {p} " in f" {negative} " for p in clip_data.contrast_excluded)
            before, after = caption.split(), negative.split()
            changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
            assert len(before) == len(after) and len(changed) in (1, 2)
            kinds.add(len(changed))
            if len(changed) == 2:  # a swap: the same words, two places exchanged
                i, j = changed
                assert (after[i], after[j]) == (before[j], before[i])
    assert kinds == {1, 2}  # both kinds of edit occur


def test_captions_without_group_words_have_no_negative_and_swaps_must_change_meaning():
    groups = [("red", "blue"), ("circle", "square")]
    rng = np.random.default_rng(1)
    assert contrast_caption("hello world", groups, rng) is None
    seen = {contrast_caption("a red circle and a red square", groups, rng) for _ in range(200)}
    # Replacing one word, never swapping the shapes (the same two objects, reordered).
    assert seen == {"a blue circle and a red square", "a red square and a red square",
                    "a red circle and a blue square", "a red circle and a red circle"}
    assert phrases("a red circle in the top left".split(),
                   word_group_index(groups + [("top", "bottom"), ("left", "right")])) == [
        "red circle", "top left"]
    with pytest.raises(ValueError, match="'red' is in two groups"):
        word_group_index([("red", "blue"), ("red", "green")])


def test_each_editable_word_group_is_edited_equally_often(clip_data):
    # Drawn over all edits alike, "above" would change in 1 of 15 negatives of this caption
    # (10 colour and 4 shape replacements against 1 relation one): CLIP would rarely meet the
    # relation as the difference it must see.
    groups = [tuple(g) for g in clip_data.contrast_words]
    group_of = word_group_index(groups)
    rng = np.random.default_rng(2)
    caption = "a red circle above a blue square"
    edited = collections.Counter()
    for _ in range(3000):
        negative = contrast_caption(caption, groups, rng)
        changed = {group_of[a] for a, b in zip(caption.split(), negative.split()) if a != b}
        assert len(changed) == 1
        edited[changed.pop()] += 1
    assert set(edited) == {0, 1, 2}  # colour, shape, above/below
    for count in edited.values():
        assert abs(count / 3000 - 1 / 3) < 0.03, edited


def test_bad_contrast_words_are_a_config_error():
    config = config_lib.load("clip_mini")
    config.data.contrast_words = (("red",),)
    with pytest.raises(ValueError, match="must hold at least two words"):
        config_lib.validate(config)


def unit_rows(rng, n, dim):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("per_example", [1, 3])
def test_loss_with_hard_negatives_matches_a_direct_computation(per_example):
    rng = np.random.default_rng(3)
    n, k, scale = 6, per_example, 9.0
    images, texts = unit_rows(rng, n, 8), unit_rows(rng, n, 8)
    negatives = unit_rows(rng, n * k, 8)  # example j's negatives are rows j*k .. j*k + k-1
    usable = rng.random(n * k) < 0.8
    usable[2 * k:3 * k] = False  # example 2 had no negative
    mask = np.array([True] * 5 + [False])  # example 5 is padding
    loss, metrics = clip_task.contrastive_loss(images, texts, scale, mask, negatives, usable)

    real = np.flatnonzero(mask)
    owner = np.arange(n * k) // k
    kept_negatives = np.flatnonzero(mask[owner] & usable)
    i2t, t2i = [], []
    for i in real:
        row = np.concatenate([scale * texts[real] @ images[i],
                              scale * negatives[kept_negatives] @ images[i]])
        i2t.append(np.log(np.sum(np.exp(row))) - scale * texts[i] @ images[i])
        column = scale * images[real] @ texts[i]  # text->image: no negatives
        t2i.append(np.log(np.sum(np.exp(column))) - scale * texts[i] @ images[i])
    assert float(loss) == pytest.approx(0.5 * (np.mean(i2t) + np.mean(t2i)), rel=1e-5)
    wins = [texts[owner[c]] @ images[owner[c]] > negatives[c] @ images[owner[c]]
            for c in kept_negatives]
    assert float(metrics["hard_negative_accuracy"]) == pytest.approx(np.mean(wins))
    plain, _ = clip_task.contrastive_loss(images, texts, scale, mask)
    assert float(loss) > float(plain)  # the negatives are extra terms of each image's softmax


def prepared(data_config, tokenizer, record, seed=0):
    from dalle_jax.data import input_pipeline

    text = config_lib.load("clip_mini").text
    prepare = input_pipeline.PrepareExample(data_config, text, tokenizer, training=True)
    return prepare.random_map((0, record), np.random.default_rng(seed))


def test_examples_carry_k_different_negatives_each_false_of_the_image(clip_data,
                                                                       mini_tokenizer):
    data = clip_data.copy_and_resolve_references()
    data.contrast_count = 3
    for index in range(20):
        record = synthetic_shapes.generate_example(0, "train", index, 32)
        example = prepared(data, mini_tokenizer, record, seed=index)
        assert example["negative_text"].shape == (3, example["text"].shape[0])
        assert example["negative_mask"].tolist() == [True] * 3
        captions = [mini_tokenizer.decode(t) for t in example["negative_text"]]
        assert len(set(captions)) == 3 and record["caption"] not in captions
        for negative in captions:
            assert not judge.matches(record["image"], negative), (record["caption"], negative)


def test_a_caption_with_fewer_edits_than_k_masks_the_empty_slots(clip_data, mini_tokenizer):
    data = clip_data.copy_and_resolve_references()
    data.contrast_words = (("red", "green"),)  # "a red circle" has one edit: "a green circle"
    data.contrast_count = 3
    data.missing_object_negatives = 0  # the record is a bare image and caption
    record = {"image": np.zeros((32, 32, 3), np.uint8), "caption": "a red circle"}
    example = prepared(data, mini_tokenizer, record)
    assert example["negative_mask"].tolist() == [True, False, False]
    assert mini_tokenizer.decode(example["negative_text"][0]) == "a green circle"


def test_contrast_count_below_one_is_a_config_error():
    config = config_lib.load("clip_mini")
    config.data.contrast_count = 0
    with pytest.raises(ValueError, match="contrast_count=0"):
        config_lib.validate(config)


# --- negative images: the scene with named objects taken out ----------------------------

@pytest.mark.parametrize("k", [3, 6])
def test_loss_with_negative_images_matches_a_direct_computation(k):
    rng = np.random.default_rng(4)
    n, scale = 6, 8.0
    images, texts = unit_rows(rng, n, 8), unit_rows(rng, n, 8)
    negative_images = unit_rows(rng, k, 8)  # the first k examples' scenes, objects removed
    mask = np.array([True] * 5 + [False])  # example 5 is padding
    loss, metrics = clip_task.contrastive_loss(images, texts, scale, mask,
                                               negative_image_embeddings=negative_images)
    real = np.flatnonzero(mask)
    i2t, t2i = [], []
    for i in real:
        row = scale * texts[real] @ images[i]  # image->text: no negative images
        i2t.append(np.log(np.sum(np.exp(row))) - scale * texts[i] @ images[i])
        column = scale * images[real] @ texts[i]
        if i < k:
            column = np.append(column, scale * negative_images[i] @ texts[i])
        t2i.append(np.log(np.sum(np.exp(column))) - scale * texts[i] @ images[i])
    assert float(loss) == pytest.approx(0.5 * (np.mean(i2t) + np.mean(t2i)), rel=1e-5)
    wins = [texts[i] @ images[i] > texts[i] @ negative_images[i] for i in real if i < k]
    assert float(metrics["missing_object_accuracy"]) == pytest.approx(np.mean(wins))


def test_examples_carry_their_view_with_named_objects_taken_out(clip_data, mini_tokenizer):
    data = clip_data.copy_and_resolve_references()
    data.missing_object_negatives = 4
    data.augment.update(min_scale=1.0, max_scale=1.0)  # the view is the stored image
    removed_counts = collections.Counter()
    for index in range(30):
        record = synthetic_shapes.generate_example(0, "train", index, 32)
        example = prepared(data, mini_tokenizer, record, seed=index)
        np.testing.assert_array_equal(example["image"], record["image"])
        scene = synthetic_shapes.as_object_list(record["objects"])
        candidates = [synthetic_shapes.without_objects(record["image"], scene, removed)
                      for removed in synthetic_shapes.removals(scene)]
        same = [np.array_equal(example["negative_image"], c) for c in candidates]
        assert sum(same) == 1, index
        removed_counts[(len(scene), same.index(True))] += 1
        assert not judge.matches(example["negative_image"], record["caption"])
    assert {key for key in removed_counts if key[0] == 2} == {(2, 0), (2, 1), (2, 2)}


def test_negative_images_get_the_same_flip_and_grey_as_the_image(clip_data, mini_tokenizer):
    from dalle_jax.data import augment

    data = clip_data.copy_and_resolve_references()
    data.missing_object_negatives = 4
    data.augment.update(min_scale=1.0, max_scale=1.0, flip=True, greyscale=0.5,
                        colour_words=tuple(synthetic_shapes.COLOURS))
    views = {(mirror, grey): (lambda im, mirror=mirror, grey=grey:
                              (augment.greyscale(im) if grey else im)[:, ::-1 if mirror else 1])
             for mirror in (False, True) for grey in (False, True)}
    seen = set()
    for index in range(40):
        record = synthetic_shapes.generate_example(0, "train", index, 32)
        example = prepared(data, mini_tokenizer, record, seed=index)
        # Which view the image got, read off the image itself.
        (kind,) = [k for k, view in views.items()
                   if np.array_equal(view(record["image"]), example["image"])]
        seen.add(kind)
        scene = synthetic_shapes.as_object_list(record["objects"])
        candidates = [views[kind](synthetic_shapes.without_objects(record["image"], scene, r))
                      for r in synthetic_shapes.removals(scene)]
        assert any(np.array_equal(example["negative_image"], c) for c in candidates), index
    assert len(seen) == 4  # every combination of flip and grey occurred


def test_missing_object_negatives_need_synthetic_shapes_and_fit_the_batch():
    config = config_lib.load("clip_mini")
    config.data.missing_object_negatives = 64
    config_lib.validate(config)
    config.data.missing_object_negatives = 65
    with pytest.raises(ValueError, match="missing_object_negatives=65 must be a number"):
        config_lib.validate(config)
    config.data.missing_object_negatives = 8
    config.data.name = "caption_folder"
    with pytest.raises(ValueError, match="missing_object_negatives needs a data set"):
        config_lib.validate(config)
