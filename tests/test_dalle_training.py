"""The transformer through the training loop, on tokens from a (tiny) trained dVAE, and
sampling from the trained workdir."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dalle_jax import config_lib
from dalle_jax.tasks import get_task
from dalle_jax.sampling.generator import Generator
from dalle_jax.training import loop, metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dvae_workdir(mini_config, tmp_path_factory):
    """A tiny dVAE trained for a few dozen steps: crude tokens, but a real trained tokenizer."""
    config = config_lib.load("dvae_mini")
    config.data.update(dict(data_dir=mini_config().data.data_dir, batch_size=16))
    config.data.shapes.update(mini_config().data.shapes.to_dict())
    config.model.update(dict(n_hid=8, vocab_size=32, n_init=16))
    config.task.update(dict(kl_warmup_steps=10, temperature_steps=30))
    config.optimizer.update(dict(warmup_steps=0, learning_rate=3e-3, ema_decay=0.0))
    config.train.update(dict(steps=40, log_every=20, eval_every=0, images_every=0,
                             checkpoint_every=100))
    workdir = str(tmp_path_factory.mktemp("dvae"))
    loop.train(config, workdir)
    return workdir


@pytest.fixture
def tiny_dalle_config(mini_config, dvae_workdir):
    return _tiny_dalle_config(mini_config, dvae_workdir)


def _tiny_dalle_config(mini_config, dvae_workdir):
    config = config_lib.load("dalle_mini")
    config.data.update(dict(data_dir=mini_config().data.data_dir, batch_size=16))
    config.data.shapes.update(mini_config().data.shapes.to_dict())
    config.text.update(dict(length=20, vocab_size=64))
    config.task.dvae_workdir = dvae_workdir
    config.model.update(dict(image_vocab_size=32, d_model=64, num_heads=4, head_dim=16,
                             mlp_dim=128))
    config.optimizer.update(dict(warmup_steps=5, learning_rate=3e-3))
    config.train.update(dict(steps=60, log_every=20, eval_every=60, eval_batches=3,
                             images_every=60, checkpoint_every=100))
    return config


@pytest.fixture(scope="module")
def trained(mini_config, dvae_workdir, tmp_path_factory):
    """(config, workdir, validation metrics at initialisation) of a short transformer run."""
    config = _tiny_dalle_config(mini_config, dvae_workdir)
    root = tmp_path_factory.mktemp("dalle")
    trainer = loop.Trainer(config, str(root / "init"))
    initial = trainer.evaluate(trainer._init())
    loop.train(config, str(root / "run"))
    return config, str(root / "run"), initial


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
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((50, 40, 3), 200, np.uint8)).save(photo)  # wrong size: resized
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
    assert np.asarray(Image.open(out / "000_000.png")).shape == (32, 32, 3)

    result = run_sample("--workdir", workdir, "--prompt", "a red circle", "--n", "0")
    assert result.returncode != 0 and "--n=0" in result.stderr


def test_generator_refuses_a_dvae_workdir(trained):
    config, _, _ = trained
    with pytest.raises(ValueError, match="not a transformer"):
        Generator.from_workdir(config.task.dvae_workdir)


def test_dvae_that_does_not_fit_is_a_one_line_error(tiny_dalle_config):
    tiny_dalle_config.model.grid_size = 4
    with pytest.raises(ValueError, match=r"config.model.grid_size=4 does not match the dVAE"):
        get_task(tiny_dalle_config)
    tiny_dalle_config.task.dvae_workdir = ""
    with pytest.raises(ValueError, match="config.task.dvae_workdir is empty"):
        get_task(tiny_dalle_config)


def test_missing_dvae_workdir_names_it(tiny_dalle_config, tmp_path):
    tiny_dalle_config.task.dvae_workdir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        get_task(tiny_dalle_config)
