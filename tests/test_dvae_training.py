"""The dVAE through the training loop: sharded = unsharded, learning, loading from a workdir."""
import jax
import numpy as np
import pytest

from dalle_jax import config_lib
from dalle_jax import workdir as workdir_lib
from dalle_jax.models import dvae
from dalle_jax.models.codec import ImageCodec
from dalle_jax.pipeline import train_stage
from dalle_jax.training import metrics as metrics_lib


@pytest.fixture
def tiny_dvae_config(mini_config):
    """configs/dvae_mini.py's model and task, shrunk so a few steps take seconds."""
    config = config_lib.load("dvae_mini")
    config.data.update(dict(data_dir=mini_config().data.data_dir, batch_size=16))
    config.data.shapes.update(mini_config().data.shapes.to_dict())
    config.model.update(dict(n_hid=8, vocab_size=64, n_init=16))
    config.task.update(dict(kl_warmup_steps=20, temperature_steps=40))
    config.train.update(dict(steps=4, log_every=2, eval_every=0, images_every=0,
                             checkpoint_every=100))
    config.optimizer.update(dict(warmup_steps=0, ema_decay=0.5))
    return config


def train_losses(workdir):
    return [r["train/loss"] for r in metrics_lib.read_metrics(str(workdir)) if "train/loss" in r]


# Three minutes (two compiled dVAE runs); the loop's sharded = unsharded test on the toy task
# (test_training.py) and the dVAE's sharded forward (test_dvae.py) stay in the default run.
@pytest.mark.slow
def test_eight_devices_train_the_dvae_like_one(tiny_dvae_config, tmp_path):
    tiny_dvae_config.mesh.shape = (2, 4, 1)  # data parallel x FSDP over the conv outputs
    sharded = train_stage(tiny_dvae_config, str(tmp_path / "eight"))
    tiny_dvae_config.mesh.update(dict(shape=(1, 1, 1), num_devices=1))
    single = train_stage(tiny_dvae_config, str(tmp_path / "one"))
    np.testing.assert_allclose(train_losses(tmp_path / "eight"), train_losses(tmp_path / "one"),
                               rtol=1e-4)
    for a, b in zip(jax.tree.leaves(jax.device_get(sharded.params)),
                    jax.tree.leaves(jax.device_get(single.params)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    fsdp_sharded = [x for x in jax.tree.leaves(sharded.params)
                    if "fsdp" in str(x.sharding.spec)]
    assert fsdp_sharded  # FSDP really split some kernels.


def test_short_training_lowers_the_reconstruction_error_and_loads(dvae_run):
    workdir = dvae_run  # 80 steps of a tiny dVAE (tests/conftest.py)
    mse = [r["train/mse"] for r in metrics_lib.read_metrics(workdir) if "train/mse" in r]
    assert mse[-1] < 0.5 * mse[0], mse

    codec = ImageCodec.from_workdir(workdir)
    model = workdir_lib.Run(workdir).load_model(dvae.from_config)
    images = np.random.default_rng(0).integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)
    tokens = codec.encode(images)  # 37 = one full chunk of 32 and a padded one
    assert tokens.shape == (37, 8, 8) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens[:5], np.asarray(model.encode(images[:5])))
    pictures = codec.decode(tokens)
    assert pictures.shape == (37, 32, 32, 3) and 0.0 <= pictures.min() <= pictures.max() <= 1.0
    np.testing.assert_allclose(pictures[:5], np.asarray(model.decode(tokens[:5])), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\)"):
        codec.encode(images[:, :16])
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        codec.decode(np.full((1, 8, 8), 128))


def test_loading_a_workdir_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ImageCodec.from_workdir(str(tmp_path))
