"""CLIP scoring of any images, and best-of-N reranking of samples (API and sample.py)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dalle_jax.models import dalle
from dalle_jax.models.scorer import ClipScorer
from dalle_jax.sampling import rerank
from dalle_jax.sampling.generator import Generator
from dalle_jax.sampling.outputs import to_pixels
from dalle_jax.tasks import get_task
from test_clip import small_config as small_clip_config
from test_dalle import fast_rngs, small_config as small_dalle_config
from test_sampling import FakeTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def scorer():
    config = small_clip_config()
    model = get_task(config).build_model(fast_rngs(1))
    # chunk 3: seven images take three calls of one compiled program, the last one padded.
    return ClipScorer(model, FakeTokenizer(), chunk=3)


def random_images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def direct_scores(scorer, images, captions):
    """The model's own forward on the whole batch at once, no chunking, no caption sharing."""
    ids = np.stack([scorer.tokenizer.encode(c, scorer.text_length) for c in captions])
    image_embeddings = np.asarray(scorer.model.encode_images(images))
    text_embeddings = np.asarray(scorer.model.encode_text(ids))
    return np.sum(image_embeddings * text_embeddings, axis=1)


def test_top_k_indices_match_a_brute_force_sort():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, (6, 9)).astype(np.float32)  # many ties
    for keep in (1, 4, 9):
        got = rerank.top_k_indices(scores, keep)
        for row, s in zip(got, scores):
            expected = sorted(range(len(s)), key=lambda i: (-s[i], i))[:keep]
            assert list(row) == expected
    with pytest.raises(ValueError, match="keep=10"):
        rerank.top_k_indices(scores, 10)


def test_scores_are_the_models_cosine_similarities(scorer):
    images = random_images(7)
    captions = ["a red circle", "a blue square", "a red circle", "a green triangle",
                "a cyan circle", "a red circle", "a blue square"]
    expected = direct_scores(scorer, images, captions)
    np.testing.assert_allclose(scorer.score(images, captions), expected, atol=1e-5)
    # Floats in [0, 1] are the same images.
    np.testing.assert_allclose(scorer.score(images / 255.0, captions), expected, atol=1e-5)
    # One caption scores every image.
    np.testing.assert_allclose(scorer.score(images, "a red circle"),
                               direct_scores(scorer, images, ["a red circle"] * 7), atol=1e-5)
    matrix = scorer.similarity(images, captions[:3])
    assert matrix.shape == (7, 3)
    np.testing.assert_allclose(np.diagonal(matrix), expected[:3], atol=1e-5)
    assert np.all(np.abs(expected) <= 1 + 1e-5)


def test_scoring_from_many_threads_at_once_gives_each_its_own_scores(scorer):
    """The server scores reranked requests on several threads at once."""
    import threading

    jobs = [(random_images(5, seed=seed), f"a {colour} circle")
            for seed, colour in enumerate(["red", "blue", "green", "cyan", "red", "blue"])]
    want = [scorer.score(images, caption) for images, caption in jobs]
    got, start = [None] * len(jobs), threading.Barrier(len(jobs))

    def score(index):
        start.wait()
        for _ in range(3):
            got[index] = scorer.score(*jobs[index])

    threads = [threading.Thread(target=score, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for mine, expected in zip(got, want):
        np.testing.assert_array_equal(mine, expected)


def test_other_sizes_are_resized_like_pil_does(scorer):
    big = random_images(2, size=40, seed=1)
    resized = np.stack([np.asarray(Image.fromarray(im).resize((16, 16), Image.BICUBIC))
                        for im in big])
    np.testing.assert_allclose(scorer.score(big, "a red circle"),
                               direct_scores(scorer, resized, ["a red circle"] * 2), atol=1e-5)


@pytest.mark.parametrize("images, captions, match", [
    (random_images(2), ["a", "b", "c"], "2 images but 3 captions"),
    (random_images(2), ["a red circle", " "], "empty"),
    (np.zeros((2, 16, 16)), ["a"], "RGB"),
    (np.zeros((0, 16, 16, 3), np.uint8), ["a"], "no images"),
])
def test_bad_inputs_are_one_line_errors(scorer, images, captions, match):
    with pytest.raises(ValueError, match=match):
        scorer.score(images, captions)


def test_a_grey_clip_scores_grey_images_against_captions_without_colours(scorer):
    grey = ClipScorer(scorer.model, scorer.tokenizer, chunk=3, grey_without=("red", "blue"))
    images = random_images(4, seed=3)
    captions = ["a red circle", "a blue square above a red circle", "a square", "a red circle"]
    luma = np.round(images.astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.uint8)
    grey_images = np.repeat(luma[..., None], 3, axis=-1)
    plain = ["a circle", "a square above a circle", "a square", "a circle"]
    np.testing.assert_allclose(grey.score(images, captions),
                               direct_scores(scorer, grey_images, plain), atol=1e-5)
    assert not np.allclose(grey.score(images, captions), scorer.score(images, captions))


def test_standardised_by_caption_against_each_group_by_hand():
    from dalle_jax.models.scorer import standardised_by_caption

    rng = np.random.default_rng(0)
    scores = rng.normal(size=9)
    captions = ["a", "b", "a", "c", "b", "a", "b", "a", "b"]
    got = standardised_by_caption(scores, captions)
    for caption in "ab":
        rows = [i for i, c in enumerate(captions) if c == caption]
        group = scores[rows]
        np.testing.assert_allclose(got[rows], (group - group.mean()) / group.std(), atol=1e-6)
    assert got[3] == 0.0  # a lone image stands out from nothing


def test_a_committee_sums_its_members_standardised_scores(scorer):
    from dalle_jax.models.scorer import ClipCommittee

    grey = ClipScorer(scorer.model, scorer.tokenizer, chunk=3, grey_without=("red", "blue"))
    committee = ClipCommittee([scorer, grey])
    images = random_images(8, seed=4)
    captions = ["a red circle"] * 5 + ["a blue square"] * 3
    by_hand = np.zeros(8)
    for member in (scorer, grey):
        raw = direct_scores(member, *((images, captions) if member is scorer else (
            np.repeat(np.round(images.astype(np.float64) @ [0.299, 0.587, 0.114])
                      .astype(np.uint8)[..., None], 3, axis=-1),
            ["a circle"] * 5 + ["a square"] * 3)))
        for rows in (slice(0, 5), slice(5, 8)):
            by_hand[rows] += (raw[rows] - raw[rows].mean()) / raw[rows].std()
    np.testing.assert_allclose(committee.score(images, captions), by_hand, atol=1e-4)
    # One caption for all images: one group.
    np.testing.assert_allclose(committee.score(images[:5], "a red circle"), by_hand[:5],
                               atol=1e-4)
    # Reranking by a committee of one CLIP twice keeps that CLIP's own picks.
    twice = rerank.rerank(["a red circle", "a blue square"], images[:6],
                          ClipCommittee([scorer, scorer]), keep=3)
    alone = rerank.rerank(["a red circle", "a blue square"], images[:6], scorer, keep=3)
    np.testing.assert_array_equal(twice.kept, alone.kept)
    with pytest.raises(ValueError, match="at least two"):
        ClipCommittee([scorer])


def test_rerank_keeps_the_candidates_clip_scores_highest(scorer):
    prompts = ["a red circle", "a blue square"]
    candidates = random_images(10, seed=2) / 255.0  # 5 per prompt, prompt-major
    result = rerank.rerank(prompts, candidates, scorer, keep=2)
    expected = direct_scores(scorer, (candidates * 255).round().astype(np.uint8),
                             [p for p in prompts for _ in range(5)]).reshape(2, 5)
    np.testing.assert_allclose(result.scores, expected, atol=1e-5)
    for p in range(2):
        best = np.argsort(-expected[p])[:2]
        assert list(result.kept[p]) == list(best)
        np.testing.assert_array_equal(result.images[2 * p:2 * p + 2], candidates[5 * p + best])


class PixelCodec:
    """Tokens painted as grey levels: a decoder whose images depend on every token."""

    def __init__(self, grid, vocab):
        self.grid, self.vocab = grid, vocab

    def decode(self, tokens):
        grey = np.asarray(tokens, np.float32) / (self.vocab - 1)
        cells = np.repeat(np.repeat(grey, 16 // self.grid, axis=1), 16 // self.grid, axis=2)
        return np.repeat(cells[..., None], 3, axis=-1)


def test_generator_best_of_reranks_its_own_candidates(scorer):
    cfg = small_dalle_config()
    model = dalle.DALLE(cfg, rngs=fast_rngs())
    generate = Generator(model, PixelCodec(cfg.grid_size, cfg.image_vocab_size),
                         FakeTokenizer(), batch_size=4, scorer=scorer)
    prompts = ["a red circle", "a blue square"]
    result = generate.best_of(prompts, candidates=3, keep=2, seed=5)
    drawn = generate(prompts, 3, seed=5)
    np.testing.assert_array_equal(result.candidates, drawn)
    np.testing.assert_allclose(result.scores.reshape(-1),
                               scorer.score(drawn, ["a red circle"] * 3 + ["a blue square"] * 3))
    assert result.images.shape == (4,) + drawn.shape[1:]
    assert np.all(np.diff(np.take_along_axis(result.scores, result.kept, 1), axis=1) <= 0)
    with pytest.raises(ValueError, match="keep=4"):
        generate.best_of(prompts, candidates=3, keep=4)
    with pytest.raises(ValueError, match="needs a CLIP scorer"):
        Generator(model, None, FakeTokenizer()).best_of(prompts, candidates=2)


def run_sample(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_sample_cli_reranks_and_records_every_score(dalle_run, clip_run, tmp_path):
    out = tmp_path / "out"
    result = run_sample("--workdir", dalle_run, "--clip_workdir", clip_run,
                        "--prompt", "a red circle", "--prompt", "a blue square left of a cyan circle",
                        "--rerank", "4", "--keep", "2", "--batch_size", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "samples.json") as f:
        record = json.load(f)
    assert len(record["candidates"]) == 8 and len(record["images"]) == 4
    scorer = ClipScorer.from_workdir(clip_run)
    for p, prompt in enumerate(record["prompts"]):
        mine = [c for c in record["candidates"] if c["prompt"] == p]
        kept = sorted((c for c in mine if c["kept_rank"] is not None),
                      key=lambda c: c["kept_rank"])
        assert [c["index"] for c in kept] == sorted(
            range(4), key=lambda i: -mine[i]["score"])[:2]
        # The written PNGs are the kept images, and CLIP scores them as recorded (to the
        # rounding of the pixels to 8 bits).
        files = [np.asarray(Image.open(out / f"{p:03d}_{r:03d}.png")) for r in range(2)]
        np.testing.assert_allclose(scorer.score(np.stack(files), prompt),
                                   [c["score"] for c in kept], atol=2e-2)
        assert (out / f"candidates_{p:03d}.png").exists()

    for args, message in [(("--rerank", "4"), "--clip_workdir"),
                          (("--rerank", "4", "--keep", "5", "--clip_workdir", clip_run), "--keep=5"),
                          (("--rerank", "4", "--n", "2", "--clip_workdir", clip_run), "drop --n"),
                          (("--keep", "2"), "only apply with --rerank")]:
        result = run_sample("--workdir", dalle_run, "--prompt", "a red circle", *args)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr[-500:])


def test_sample_cli_on_a_moved_pipeline_workdir_reranks_with_its_clips(pipeline_run, tmp_path):
    """The main job's workdir, copied and moved, named relative to another directory: the
    transformer and both CLIPs are found inside it, and the written images are the ones
    `Generator.best_of` picks from the original workdir."""
    shutil.copytree(pipeline_run, tmp_path / "copy")
    os.rename(tmp_path / "copy", tmp_path / "moved")
    out = tmp_path / "out"
    prompts = ["a red circle above a blue square", "a green triangle"]
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "sample.py"), "--workdir", "moved",
         *(f"--prompt={p}" for p in prompts), "--rerank", "4", "--keep", "2",
         "--batch_size", "4", "--seed", "5", "--out", "out"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = Generator.from_workdir(pipeline_run, batch_size=4).best_of(
        prompts, candidates=4, keep=2, seed=5)
    with open(out / "samples.json") as f:
        record = json.load(f)
    assert record["settings"]["clip_workdir"] == [str(tmp_path / "moved" / "clip"),
                                                  str(tmp_path / "moved" / "grey_clip")]
    np.testing.assert_allclose([c["score"] for c in record["candidates"]],
                               expected.scores.reshape(-1), atol=1e-4)
    written = np.stack([np.asarray(Image.open(out / f"{p:03d}_{r:03d}.png"))
                        for p in range(2) for r in range(2)])
    np.testing.assert_array_equal(written, to_pixels(expected.images))
