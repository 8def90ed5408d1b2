"""The caption tokenizer: a SentencePiece BPE model trained on a data set's captions.

Token ids 0-3 are reserved the same way in every model this project trains, so later stages can
rely on them without reading the model: 0 pad, 1 unknown, 2 begin, 3 end of caption.
Captions are lower-cased by SentencePiece's case-folding normaliser, as the paper lower-cases them.
"""
from __future__ import annotations

import io
from typing import Iterable

import numpy as np
import sentencepiece as spm
from absl import logging

from dalle_jax import files

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def train_tokenizer(captions: Iterable[str], vocab_size: int, path: str) -> "Tokenizer":
    """Trains a BPE model on `captions` and writes it to `path` atomically."""
    if vocab_size < 8:
        raise ValueError(f"tokenizer vocab_size={vocab_size} is too small (need at least 8)")
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=proto,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        # Small caption sets cannot fill a large vocabulary; a smaller one is fine since the
        # model's embedding is sized by `vocab_size`, never by the pieces actually learned.
        hard_vocab_limit=False,
        normalization_rule_name="nmt_nfkc_cf",
        character_coverage=1.0,
        minloglevel=2,
    )
    files.write_bytes(path, proto.getvalue())  # whole or not at all: see files.write_bytes
    return Tokenizer(path)


class Tokenizer:
    """Encodes captions to fixed-length id arrays `[BOS] pieces... [EOS] PAD...` and back."""

    def __init__(self, path: str, proto: bytes | None = None):
        if proto is None and not files.is_file(path):
            raise FileNotFoundError(
                f"tokenizer model {path!r} does not exist: train one with the tokenizer stage "
                "(train.py trains it into the workdir on first use) or point the config at it")
        self.path = path
        self._proto = files.read_bytes(path) if proto is None else proto
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, caption: str, length: int, *, dropout: float = 0.0,
               seed: int | None = None) -> np.ndarray:
        """Ids of `caption` padded (or truncated, keeping the end token) to `length`.

        `dropout` is the BPE-dropout probability (the paper uses 0.1 in training). SentencePiece's
        sampler has one process-wide generator, so a `seed` is set right before encoding to make
        each caption's segmentation a function of the seed alone.
        """
        if length < 2:
            raise ValueError(f"text length {length} cannot hold the begin and end tokens")
        if dropout > 0.0:
            if seed is not None:
                spm.set_random_generator_seed(seed)
            pieces = self._sp.encode(caption, enable_sampling=True, alpha=dropout, nbest_size=-1)
        else:
            pieces = self._sp.encode(caption)
        pieces = pieces[: length - 2]
        ids = np.full((length,), PAD_ID, dtype=np.int32)
        ids[0] = BOS_ID
        ids[1 : 1 + len(pieces)] = pieces
        ids[1 + len(pieces)] = EOS_ID
        return ids

    def count(self, caption: str) -> int:
        """Number of ids `caption` needs, begin and end tokens included."""
        return len(self._sp.encode(caption)) + 2

    def decode(self, ids) -> str:
        """Text of an id sequence; special tokens are dropped."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) > EOS_ID]
        return self._sp.decode(ids)

    def __reduce__(self):
        # Grain workers receive transforms by pickling: ship the model's bytes (not the C++
        # object, and not the path: a worker should not read the file again from a bucket).
        return (Tokenizer, (self.path, self._proto))


def encode_texts(tokenizer, texts, length: int, what: str = "caption") -> np.ndarray:
    """int32 (N, length) ids of `texts` for a model reading `length` tokens: an empty text is a
    ValueError naming it, an over-long one is truncated with a warning (what = "prompt", ...)."""
    rows = []
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{what} {text!r} is empty")
        needed = tokenizer.count(text)
        if needed > length:
            logging.warning("%s %r needs %d tokens, more than the model's %d: truncated",
                            what, text, needed, length)
        rows.append(tokenizer.encode(text, length))
    return np.stack(rows)
