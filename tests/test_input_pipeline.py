"""The input pipeline: determinism, per-host shards, exact resume, global sharded batches."""
import hashlib
import json

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from dalle_jax.data import augment, input_pipeline, sources
from dalle_jax.sharding import mesh as mesh_lib


def mesh_of(shape):
    return mesh_lib.build_mesh(ConfigDict(dict(axes=("data", "fsdp", "tensor"), shape=shape)))


def digest(image) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def take(loader_or_iterator, n):
    iterator = iter(loader_or_iterator)
    return [jax.device_get(next(iterator)) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def source_digests(config, split):
    """Digests of every record's evaluation view, read straight from TFDS (the reference)."""
    source = sources.data_source(sources.prepared_builder(config.data), split)
    return [digest(augment.center_view(sources.as_rgb(source[i]["image"]), config.data.image_size))
            for i in range(len(source))]


def test_same_seed_same_batches_other_seed_other_batches(mini_config, mini_tokenizer):
    config = mini_config()
    first = take(input_pipeline.make_loader(config, "train", mini_tokenizer, training=True), 3)
    again = take(input_pipeline.make_loader(config, "train", mini_tokenizer, training=True), 3)
    assert_same_batches(first, again)
    config.seed = 1
    other = take(input_pipeline.make_loader(config, "train", mini_tokenizer, training=True), 3)
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_batches_hold_tokenized_captions_of_their_images(mini_config, mini_tokenizer):
    config = mini_config()
    source = sources.data_source(sources.prepared_builder(config.data), "validation")
    by_image = {digest(source[i]["image"]): sources.as_text(source[i]["caption"])
                for i in range(len(source))}
    batch = take(input_pipeline.make_loader(config, "validation", mini_tokenizer, training=False), 1)[0]
    assert batch["image"].shape == (32, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["text"].shape == (32, 32) and batch["text"].dtype == np.int32
    for image, text in zip(batch["image"], batch["text"]):
        assert mini_tokenizer.decode(text) == by_image[digest(image)]


def test_examples_carry_their_position_and_fixed_views_are_the_evaluation_views(
        mini_config, mini_tokenizer):
    """What a token cache relies on: 'index' is the example's position in the split, and with
    the augmentation off, a training view is the record's evaluation view in every epoch."""
    config = mini_config()
    config.data.augment.update(dict(square="center", min_scale=1.0, max_scale=1.0, flip=False))
    reference = source_digests(config, "train")
    views = np.concatenate(list(input_pipeline.evaluation_views(config.data, "train", 64)))
    assert [digest(view) for view in views] == reference  # in order, whole, the last batch short
    epochs = take(input_pipeline.make_loader(config, "train", mini_tokenizer, training=True), 20)
    assert {int(i) for batch in epochs for i in batch["index"]} == set(range(len(reference)))
    for batch in epochs:  # 20 batches of 32 over 300 records: more than two epochs
        assert batch["index"].dtype == np.int32
        assert [digest(image) for image in batch["image"]] == [
            reference[i] for i in batch["index"]]
    evaluation = take(input_pipeline.make_loader(config, "validation", mini_tokenizer,
                                                 training=False), 2)
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in evaluation]), np.arange(64))
    # A step that reads no images (a cached one) gets the same examples without them.
    without = take(input_pipeline.make_loader(config, "train", mini_tokenizer, training=True,
                                              images=False), 20)
    for batch, full in zip(without, epochs):
        assert sorted(batch) == ["index", "mask", "text"]
        for key in batch:
            np.testing.assert_array_equal(batch[key], full[key])


@pytest.mark.parametrize("process_count", [2, 3])
def test_host_shards_are_disjoint_and_cover_the_split(mini_config, mini_tokenizer, process_count):
    config = mini_config()
    config.data.batch_size = 12 * process_count  # 12 examples a host and batch.
    reference = source_digests(config, "validation")
    seen = []
    for index in range(process_count):
        loader = input_pipeline.make_loader(config, "validation", mini_tokenizer, training=False,
                                      process_index=index, process_count=process_count)
        host = [digest(image) for batch in loader for image in batch["image"]]
        assert len(host) == len(reference) // process_count
        seen.append(set(host))
    for i in range(process_count):
        for j in range(i + 1, process_count):
            assert not seen[i] & seen[j]
    covered = set().union(*seen)
    # drop_remainder evens hosts out: fewer than `process_count` records may be left unread.
    assert covered <= set(reference) and len(reference) - len(covered) < process_count


def test_training_hosts_read_their_pieces_of_one_global_stream(mini_config, mini_tokenizer):
    config = mini_config()
    config.data.batch_size = 20
    # The reference: one process reading whole global batches (300 records = 15 batches).
    whole = take(input_pipeline.make_loader(config, "train", mini_tokenizer, training=True), 15)
    hosts = [take(input_pipeline.make_loader(config, "train", mini_tokenizer, training=True,
                                       process_index=index, process_count=2), 15)
             for index in range(2)]
    for step, global_batch in enumerate(whole):
        for key in global_batch:
            np.testing.assert_array_equal(
                np.concatenate([hosts[0][step][key], hosts[1][step][key]]), global_batch[key])
    # Each host reads only its half of every global batch, and an epoch covers the split.
    digests = [[digest(im) for batch in host for im in batch["image"]] for host in hosts]
    assert all(len(d) == 150 for d in digests)
    assert set(digests[0]) | set(digests[1]) == set(source_digests(config, "train"))


def test_worker_processes_do_not_change_the_batches_and_resume(mini_config, mini_tokenizer):
    config = mini_config()
    in_process = take(input_pipeline.make_loader(config, "train", mini_tokenizer, training=True), 4)
    config.data.workers = 2
    iterator = iter(input_pipeline.make_loader(config, "train", mini_tokenizer, training=True))
    with_workers = take(iterator, 2)
    state = json.loads(json.dumps(iterator.get_state()))
    with_workers += take(iterator, 2)
    assert_same_batches(in_process, with_workers)
    iterator.set_state(state)
    assert_same_batches(take(iterator, 2), in_process[2:])


def test_read_threads_do_not_change_the_batches(mini_config, mini_tokenizer):
    config = mini_config()
    eight = take(input_pipeline.make_loader(config, "train", mini_tokenizer, training=True), 3)
    config.data.read_threads = 2
    assert_same_batches(take(input_pipeline.make_loader(config, "train", mini_tokenizer,
                                                  training=True), 3), eight)


def test_builders_of_predefined_and_custom_configs_survive_the_trip_to_a_worker_process(
        mini_config):
    import pickle

    from dalle_jax.data import sources

    for custom in (False, True):  # the default 32 px build (the mini pipeline's), mini_config's
        config = mini_config()
        if not custom:
            config.data.shapes.update(dict(num_train=0, num_validation=0, num_heldout=0))
        builder = sources.builder_for(config.data)
        # Grain pickles the data source, and with it the builder, into each worker.
        rebuilt = pickle.loads(pickle.dumps(builder))
        assert rebuilt.builder_config.name == builder.builder_config.name
        assert rebuilt.data_dir == builder.data_dir
        assert (rebuilt.builder_config.name == "32") != custom


@pytest.mark.parametrize("prefetch", [1, 3])
def test_resume_from_saved_state_gives_exactly_the_next_batch(mini_config, mini_tokenizer, prefetch):
    config = mini_config()
    config.data.prefetch = prefetch
    config.text.bpe_dropout = 0.3
    config.data.augment.flip = True
    mesh = mesh_of((4, 2, 1))
    batches = input_pipeline.global_batches(config, "train", mesh, mini_tokenizer, training=True)
    take(batches, 4)
    state = batches.get_state()
    expected = take(batches, 3)
    batches.close()

    resumed = input_pipeline.global_batches(config, "train", mesh, mini_tokenizer, training=True)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 3), expected)
    resumed.close()


def test_set_state_mid_stream_discards_prefetched_batches(mini_config, mini_tokenizer):
    config = mini_config()
    batches = input_pipeline.global_batches(config, "train", mesh_of((8, 1, 1)), mini_tokenizer,
                                      training=True)
    start = batches.get_state()
    first = take(batches, 2)
    batches.set_state(start)
    assert_same_batches(take(batches, 2), first)
    batches.close()


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_global_batch_lands_on_the_mesh_with_batch_sharding(mini_config, mini_tokenizer, shape):
    config = mini_config()
    mesh = mesh_of(shape)
    batches = input_pipeline.global_batches(config, "validation", mesh, mini_tokenizer, training=False)
    batch = next(batches)
    batches.close()
    host = jax.device_get(batch)
    ways = shape[0] * shape[1]
    for key, array in batch.items():
        assert array.shape[0] == 32
        assert array.sharding.spec == jax.P(("data", "fsdp"), *[None] * (array.ndim - 1))
        assert len(array.addressable_shards) == 8
        for shard in array.addressable_shards:
            assert shard.data.shape[0] == 32 // ways
            rows = shard.index[0]
            np.testing.assert_array_equal(shard.data, host[key][rows])


def test_evaluation_pads_the_last_batch_and_masks_it(mini_config, mini_tokenizer):
    config = mini_config()  # 100 validation records, batches of 32: 3 full + 4 real rows.
    batches = list(input_pipeline.global_batches(config, "validation", mesh_of((8, 1, 1)),
                                           mini_tokenizer, training=False))
    masks = [np.asarray(b["mask"]) for b in batches]
    assert [int(m.sum()) for m in masks] == [32, 32, 32, 4]
    assert not np.asarray(batches[-1]["image"])[4:].any()
    real = [digest(im) for b, m in zip(batches, masks) for im in np.asarray(b["image"])[m]]
    assert sorted(real) == sorted(source_digests(config, "validation"))


def test_augmentation_views_stay_inside_the_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(40, 60, 3), dtype=np.uint8)
    for _ in range(20):
        view = augment.augment(image, 32, rng, square="random", min_scale=1.125, max_scale=1.5,
                               flip=True)
        assert view.shape == (32, 32, 3) and view.dtype == np.uint8
    # A square image at the target size with scales capped by the crop is returned unchanged.
    square = image[:32, :32]
    np.testing.assert_array_equal(
        augment.augment(square, 32, rng, square="center", min_scale=1.0, max_scale=1.125,
                        flip=False), square)
    np.testing.assert_array_equal(augment.square_crop(image, None), image[:, 10:50])


def test_greyscale_is_the_luma_of_the_image_in_every_channel():
    from PIL import Image

    image = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    grey = augment.greyscale(image)
    assert grey.shape == image.shape and grey.dtype == np.uint8
    assert (grey == grey[..., :1]).all()
    # PIL's "L" conversion is the same ITU-R 601 luma, in fixed-point arithmetic.
    reference = np.asarray(Image.fromarray(image).convert("L"), np.int16)
    assert np.abs(grey[..., 0].astype(np.int16) - reference).max() <= 1
    assert augment.without_words("a red circle above a blue square", ("red", "blue")) == (
        "a circle above a square")


COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")


def test_grey_training_views_lose_their_colour_words_and_evaluation_views_stay(
        mini_config, mini_tokenizer):
    config = mini_config()
    config.data.augment.greyscale = 0.5
    config.data.augment.colour_words = COLOURS
    config.data.contrast_words = (COLOURS, ("circle", "square", "triangle"))
    batch = take(input_pipeline.make_loader(config, "train", mini_tokenizer, training=True), 1)[0]
    grey = (batch["image"] == batch["image"][..., :1]).all(axis=(1, 2, 3))
    assert 0 < grey.sum() < len(grey)  # p = 0.5 over 32 views
    for is_grey, text, negatives in zip(grey, batch["text"], batch["negative_text"]):
        named = set(mini_tokenizer.decode(text).split()) & set(COLOURS)
        assert bool(named) != is_grey  # every synthetic_shapes caption names a colour
        for negative in negatives:
            assert bool(set(mini_tokenizer.decode(negative).split()) & set(COLOURS)) != is_grey
    evaluation = take(input_pipeline.make_loader(config, "validation", mini_tokenizer,
                                           training=False), 1)[0]
    assert not (evaluation["image"] == evaluation["image"][..., :1]).all(axis=(1, 2, 3)).any()


def test_an_input_error_reaches_the_training_thread(mini_config, mini_tokenizer):
    config = mini_config()
    config.data.batch_size = 4
    good = {"image": np.zeros((32, 32, 3), np.uint8), "caption": b"a red circle"}

    class Broken:
        def __len__(self):
            return 16

        def __getitem__(self, index):
            if index == 9:
                raise OSError("record 9 is unreadable")
            return good

    loader = input_pipeline.make_loader(config, "train", mini_tokenizer, training=False,
                                  source=Broken())
    batches = input_pipeline.GlobalBatches(loader, mesh_of((4, 1, 2)), config.sharding.rules, 4)
    take(batches, 2)
    for _ in range(2):  # It keeps raising rather than hanging.
        with pytest.raises(OSError, match="record 9"):
            next(batches)
    batches.close()
