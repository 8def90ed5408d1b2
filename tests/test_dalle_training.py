"""The transformer through the training loop, on tokens from a (tiny) trained dVAE, and
sampling from the trained workdir."""
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import conftest
from dalle_jax import workdir as workdir_lib
from dalle_jax.data import input_pipeline
from dalle_jax.models import dvae as dvae_model
from dalle_jax.pipeline import make_task
from dalle_jax.sampling.generator import Generator
from dalle_jax.sampling.outputs import to_pixels
from dalle_jax.text.tokenizer import Tokenizer
from dalle_jax.training import loop, metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_dalle_config(mini_config, pipeline_run):
    return conftest.tiny_dalle_config(mini_config, pipeline_run)


@pytest.fixture(scope="module")
def trained(mini_config, dalle_run, dalle_initial_metrics):
    """(config, workdir, validation metrics at initialisation) of the short transformer run."""
    return workdir_lib.read_config(dalle_run), dalle_run, dalle_initial_metrics


def test_short_training_lowers_the_validation_loss(trained):
    _, workdir, initial = trained
    final = [r for r in metrics_lib.read_metrics(workdir) if "eval/loss" in r][-1]
    assert final["eval/loss"] < 0.6 * initial["loss"], (initial, final)
    assert final["eval/text_loss"] < 0.9 * initial["text_loss"], (initial, final)
    assert glob.glob(os.path.join(workdir, "images", "*.png"))  # sample grids were logged


def run_sample(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_sample_cli_writes_images_grids_and_a_record(trained, tmp_path):
    config, workdir, _ = trained
    photo = tmp_path / "photo.png"  # wrong size (resized) and half transparent (on white)
    rgba = np.dstack([np.full((50, 40, 3), 120, np.uint8), np.full((50, 40), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(photo)
    out = tmp_path / "out"
    result = run_sample("--workdir", workdir, "--prompt", "a red circle", "--prompt",
                        "a blue square above a green triangle", "--n", "3", "--out", str(out),
                        "--image", str(photo), "--keep_rows", "2", "--temperature", "0.8",
                        "--batch_size", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resized" in result.stderr
    assert len(list(out.glob("0*_*.png"))) == 6 and len(list(out.glob("grid_*.png"))) == 2
    with open(out / "samples.json") as f:
        record = json.load(f)
    assert record["prompts"][1] == "a blue square above a green triangle"
    assert record["settings"]["keep_rows"] == 2 and len(record["images"]) == 6
    # The same images as the Python API draws for the completed photo (seed 0, image index i),
    # read as training reads images: transparency composited on white.
    on_white = np.rint(120 * 128 / 255 + 255 * (1 - 128 / 255)).astype(np.uint8)
    generate = Generator.from_workdir(workdir, batch_size=4)
    want = to_pixels(generate(record["prompts"], 3, 0, image=np.full((50, 40, 3), on_white),
                              keep_rows=2, temperature=0.8))
    for index, image in enumerate(want):
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{index // 3:03d}_"
                                                            f"{index % 3:03d}.png")), image)

    result = run_sample("--workdir", workdir, "--prompt", "a red circle", "--n", "0")
    assert result.returncode != 0 and "--n=0" in result.stderr
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = run_sample("--workdir", workdir, "--prompt", "a red circle", "--image", str(corrupt))
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and last.startswith(f"sample.py: --image {str(corrupt)!r} is "
                                                      "not a readable image"), last


def test_generator_refuses_a_dvae_workdir(trained):
    config, _, _ = trained
    with pytest.raises(ValueError, match="not a transformer"):
        Generator.from_workdir(config.task.dvae_workdir)


def test_dvae_that_does_not_fit_is_a_one_line_error(tiny_dalle_config):
    tiny_dalle_config.model.grid_size = 4
    with pytest.raises(ValueError, match=r"config.model.grid_size=4 does not match the dVAE"):
        make_task(tiny_dalle_config)
    tiny_dalle_config.task.dvae_workdir = ""
    with pytest.raises(ValueError, match="config.task.dvae_workdir='': the transformer needs"):
        make_task(tiny_dalle_config)


def test_missing_dvae_workdir_names_it(tiny_dalle_config, tmp_path):
    tiny_dalle_config.task.dvae_workdir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_task(tiny_dalle_config)


@pytest.fixture
def untrained_dvae(mini_config):
    """A freshly initialised dVAE of the tiny pipeline's shapes: its codes vary from image to
    image (the tiny trained one gives most images the same code), so a wrong lookup shows."""
    config = conftest.tiny_pipeline_config(mini_config).dvae
    return dvae_model.from_config(config, nnx.Rngs(3))


def test_token_cache_holds_the_tokens_the_step_would_encode(tiny_dalle_config, untrained_dvae):
    """The cached table against the reference: the dVAE encoding each training batch's
    images inside the step, as without the cache."""
    config = tiny_dalle_config
    assert config.task.token_cache  # the main job's setting (configs/dalle_mini.py)
    task = make_task(config, dvae=untrained_dvae)
    assert len({row.tobytes() for row in task.token_table}) > 250  # of 300 images
    tokenizer = Tokenizer(config.text.tokenizer)
    frozen = task.frozen_state()
    encode = jax.jit(task.image_tokens)
    lookup = jax.jit(task.training_tokens)
    loader = iter(input_pipeline.make_loader(config, config.data.train_split, tokenizer,
                                             training=True))
    for _ in range(12):  # 12 batches of 32 over 300 records: past the first epoch
        batch = dict(next(loader), frozen=frozen)
        want = np.asarray(encode(batch))
        np.testing.assert_array_equal(np.asarray(lookup(batch)), want)
        np.testing.assert_array_equal(task.token_table[batch["index"]], want)


def test_token_cache_trains_as_encoding_in_the_step(tiny_dalle_config, untrained_dvae,
                                                    tmp_path):
    """Three train steps with the cache and without it: the same losses and parameters."""
    results = []
    for cached in (True, False):
        config = tiny_dalle_config.copy_and_resolve_references()
        config.task.token_cache = cached
        trainer = loop.Trainer(config, str(tmp_path / str(cached)),
                               make_task(config, dvae=untrained_dvae))
        state = trainer.init_state()
        losses = []
        with trainer.batches(config.data.train_split, training=True) as batches:
            for _ in range(3):
                state, step_metrics = trainer.train_step(state, next(batches))
                losses.append(float(step_metrics["loss"]))
        results.append((losses, jax.device_get(state.params)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 *[params for _, params in results])


def test_token_cache_with_changing_views_is_a_one_line_error(tiny_dalle_config):
    tiny_dalle_config.data.augment.max_scale = 1.125
    with pytest.raises(ValueError, match=r"config.task.token_cache=True .* "
                                         r"config.data.augment.max_scale=1.125 changes"):
        make_task(tiny_dalle_config)
    tiny_dalle_config.task.token_cache = False  # the paper's augmentation, encoded in the step
    task = make_task(tiny_dalle_config)
    assert task.token_table is None and "tokens" not in task.frozen_state()
