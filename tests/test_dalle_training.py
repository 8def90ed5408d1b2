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

import conftest
from dalle_jax import workdir as workdir_lib
from dalle_jax.pipeline import make_task
from dalle_jax.sampling.generator import Generator
from dalle_jax.sampling.outputs import to_pixels
from dalle_jax.training import metrics as metrics_lib

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
