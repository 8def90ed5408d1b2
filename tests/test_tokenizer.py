"""The SentencePiece caption tokenizer."""
import pickle

import numpy as np
import pytest

from dalle_jax.text import tokenizer as tok

CAPTIONS = [
    f"a {c} {s}{p}"
    for c in ("red", "green", "blue", "yellow")
    for s in ("circle", "square", "triangle")
    for p in ("", " in the top left", " above a blue square", " to the right of a red circle")
] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    return tok.train_tokenizer(CAPTIONS, vocab_size=64, path=path)


def test_round_trip_lower_cases_and_pads(tokenizer):
    ids = tokenizer.encode("A Red  Circle in the TOP left", length=16)
    assert ids.shape == (16,) and ids.dtype == np.int32
    assert ids[0] == tok.BOS_ID
    end = int(np.argmax(ids == tok.EOS_ID))
    assert end > 1 and np.all(ids[end + 1:] == tok.PAD_ID) and np.all(ids[1:end] > tok.EOS_ID)
    assert tokenizer.decode(ids) == "a red circle in the top left"
    assert tokenizer.count("a red circle in the top left") == end + 1


def test_every_training_caption_round_trips(tokenizer):
    for caption in set(CAPTIONS):
        assert tokenizer.decode(tokenizer.encode(caption, 32)) == caption


def test_overlong_caption_is_truncated_keeping_the_end_token(tokenizer):
    caption = " ".join(["a red circle above a blue square"] * 10)
    ids = tokenizer.encode(caption, length=12)
    assert ids[0] == tok.BOS_ID and ids[-1] == tok.EOS_ID and tok.PAD_ID not in ids
    assert caption.startswith(tokenizer.decode(ids))


def test_empty_caption_is_begin_end_padding(tokenizer):
    np.testing.assert_array_equal(tokenizer.encode("", 5), [tok.BOS_ID, tok.EOS_ID, 0, 0, 0])


def test_bpe_dropout_is_seeded_and_changes_segmentation(tokenizer):
    caption = "a yellow triangle to the right of a red circle"
    plain = tokenizer.encode(caption, 48)
    dropped = [tokenizer.encode(caption, 48, dropout=0.5, seed=s) for s in range(20)]
    # Same seed, same pieces; every segmentation still spells the caption.
    np.testing.assert_array_equal(dropped[3], tokenizer.encode(caption, 48, dropout=0.5, seed=3))
    assert all(tokenizer.decode(d) == caption for d in dropped)
    # Dropping merges gives longer sequences than the plain BPE segmentation.
    assert max(int((d != 0).sum()) for d in dropped) > int((plain != 0).sum())


def test_missing_model_names_the_file(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        tok.Tokenizer(missing)


def test_pickles_by_path(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    np.testing.assert_array_equal(clone.encode("a red circle", 8), tokenizer.encode("a red circle", 8))


def test_run_trains_once_then_reuses_and_checks_vocabulary(mini_config, tmp_path):
    from dalle_jax.training import setup

    config = mini_config()
    first = setup.load_or_train_tokenizer(config, str(tmp_path))
    stamp = (tmp_path / "tokenizer.model").stat().st_mtime_ns
    again = setup.load_or_train_tokenizer(config, str(tmp_path))
    assert (tmp_path / "tokenizer.model").stat().st_mtime_ns == stamp  # Loaded, not retrained.
    caption = "a cyan triangle below a magenta square"
    np.testing.assert_array_equal(first.encode(caption, 32), again.encode(caption, 32))
    config.text.vocab_size = 16
    with pytest.raises(ValueError, match="config.text.vocab_size=16"):
        setup.load_or_train_tokenizer(config, str(tmp_path))
    config.text.tokenizer = str(tmp_path / "elsewhere.model")
    with pytest.raises(FileNotFoundError, match="elsewhere.model"):
        setup.load_or_train_tokenizer(config, str(tmp_path))
