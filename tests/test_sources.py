"""Data sources: TFDS catalog sets through `tfds.testing.mock_data`, feature keys, errors."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dalle_jax.data import input_pipeline, sources


def coco_config(mini_config):
    config = mini_config()
    config.data.name = "coco_captions"
    config.data.data_dir = ""
    config.data.caption_key = "captions/text"
    config.data.batch_size = 8
    return config


def test_catalog_set_through_mock_data(mini_config, mini_tokenizer):
    config = coco_config(mini_config)
    with tfds.testing.mock_data(num_examples=24):
        source = sources.data_source(sources.prepared_builder(config.data), "train")
        captions = [set(map(sources.as_text, source[i]["captions"]["text"]))
                    for i in range(len(source))]
        shapes = {source[i]["image"].shape for i in range(len(source))}
        loader = input_pipeline.make_loader(config, "train", mini_tokenizer, training=True,
                                      source=source)
        batches = [b for _, b in zip(range(3), loader)]
    assert len(shapes) > 1  # Mock images come in many sizes: the pipeline squares them.
    all_captions = set().union(*captions)
    for batch in batches:
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
        for text in batch["text"]:
            # Mock captions are random letters, so compare through the same tokenizer.
            decoded = mini_tokenizer.decode(text)
            assert any(mini_tokenizer.decode(mini_tokenizer.encode(c, 32)) == decoded
                       for c in all_captions)


def test_one_of_several_captions_is_drawn_per_example():
    rng = np.random.default_rng(0)
    captions = np.array([b"one", b"two", b"three"], dtype=object)
    drawn = {sources.pick_caption(captions, rng) for _ in range(50)}
    assert drawn == {"one", "two", "three"}
    assert sources.pick_caption(captions, None) == "one"
    assert sources.pick_caption(b"only", rng) == "only"


def test_grey_and_rgba_images_become_rgb():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    np.testing.assert_array_equal(sources.as_rgb(grey)[..., 2], grey[..., 0])
    rgba = np.ones((2, 2, 4), np.uint8)
    assert sources.as_rgb(rgba).shape == (2, 2, 3)


def test_missing_feature_key_is_named(mini_config):
    config = coco_config(mini_config)
    config.data.caption_key = "caption"
    with tfds.testing.mock_data(num_examples=2):
        source = sources.data_source(sources.prepared_builder(config.data), "train")
        with pytest.raises(KeyError, match="'caption'.*captions"):
            sources.image_and_caption(source[0], config.data, None)


def test_unknown_data_set_and_split_are_named(mini_config):
    config = mini_config()
    config.data.name = "no_such_dataset_xyz"
    with pytest.raises(ValueError, match="no_such_dataset_xyz"):
        sources.builder_for(config.data)
    builder = sources.prepared_builder(mini_config().data)
    with pytest.raises(ValueError, match="'test'.*train, validation, heldout"):
        sources.data_source(builder, "test")


def test_unprepared_catalog_set_says_how_to_build_it(mini_config, tmp_path, monkeypatch):
    config = coco_config(mini_config)
    config.data.data_dir = str(tmp_path)

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(FileNotFoundError, match="coco_captions.*tfds build coco_captions"):
        sources.prepared_builder(config.data)


def test_caption_folder_through_the_pipeline_with_split_slices(mini_config, mini_tokenizer,
                                                               tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        size = (40 + 7 * i, 36 + 3 * i)
        Image.fromarray(rng.integers(0, 255, size[::-1] + (3,), dtype=np.uint8)).save(
            folder / f"p{i}.png")
        colour, shape = ["red", "green", "blue", "cyan", "yellow"][i % 5], ["circle", "square"][i // 5]
        (folder / f"p{i}.txt").write_text(f"a {colour} {shape}" if i != 3 else "  ")
    config = mini_config()
    config.data.name = "caption_folder"
    config.data.folder = str(folder)
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.batch_size = 4
    config.data.augment.update(dict(square="random", min_scale=1.125, max_scale=1.5, flip=True))
    builder = sources.prepared_builder(config.data)
    assert builder.info.splits["train"].num_examples == 9  # The blank caption is skipped.
    head = sources.data_source(builder, "train[:5]")
    tail = sources.data_source(builder, "train[5:]")
    assert (len(head), len(tail)) == (5, 4)
    batch = next(iter(input_pipeline.make_loader(config, "train[5:]", mini_tokenizer, training=True)))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
    tail_captions = {sources.as_text(tail[i]["caption"]) for i in range(len(tail))}
    decoded = {mini_tokenizer.decode(t) for t in batch["text"]}
    normalised = {mini_tokenizer.decode(mini_tokenizer.encode(c, 32)) for c in tail_captions}
    assert decoded <= normalised and len(decoded) == 4
