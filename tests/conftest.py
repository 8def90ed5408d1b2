"""Every test sees 8 fake CPU devices, so sharding is exercised without accelerators.

The device count has to be fixed before JAX initialises its backend, which is why this
runs at import time of the conftest, before any test module touches jax numerics.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _hide_gpus_from_tensorflow():
    """TF is only used by TFDS for encoding; keep it off any accelerator JAX may want."""
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    except Exception:  # TF absent or already initialised: nothing to hide.
        pass


@pytest.fixture(scope="session")
def mini_config(tmp_path_factory):
    """configs/mini.py on a small synthetic_shapes build shared by the whole session.

    Returns a function giving a fresh, unlocked copy, so tests can change it freely.
    """
    from dalle_jax import config_lib
    from dalle_jax.data import sources

    config = config_lib.load("mini")
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    config.data.shapes.num_train = 300
    config.data.shapes.num_validation = 100
    config.data.shapes.num_heldout = 60
    sources.prepared_builder(config.data)
    return lambda: config.copy_and_resolve_references()


@pytest.fixture(scope="session")
def mini_tokenizer(mini_config, tmp_path_factory):
    from dalle_jax import run

    return run.load_or_train_tokenizer(mini_config(), str(tmp_path_factory.mktemp("run")))


def tiny_clip_config(mini_config):
    """configs/clip_mini.py shrunk to train in seconds on the mini data set."""
    from dalle_jax import config_lib

    config = config_lib.load("clip_mini")
    config.data.update(dict(data_dir=mini_config().data.data_dir, batch_size=32))
    config.data.shapes.update(mini_config().data.shapes.to_dict())
    config.model.update(dict(image_width=32, image_depth=2, image_heads=1, image_mlp_ratio=2,
                             text_width=32, text_depth=1, text_heads=1, text_mlp_ratio=2,
                             embed_dim=32))
    config.optimizer.update(dict(learning_rate=3e-3, warmup_steps=10, ema_decay=0.0))
    config.train.update(dict(steps=80, log_every=40, eval_every=80, eval_batches=0,
                             images_every=80, checkpoint_every=1000))
    # One device: compiling the step for 8 fake ones doubles the run's time, and the
    # global-batch loss under sharding has its own test in test_clip.py.
    config.mesh.num_devices = 1
    return config


@pytest.fixture(scope="session")
def clip_run(mini_config, tmp_path_factory):
    """The workdir of a short tiny-CLIP run (shared by the CLIP, scoring and sampling tests)."""
    from dalle_jax.training import loop

    workdir = str(tmp_path_factory.mktemp("clip") / "run")
    loop.train(tiny_clip_config(mini_config), workdir)
    return workdir


@pytest.fixture(scope="session")
def dvae_run(mini_config, tmp_path_factory):
    """A tiny dVAE trained for 80 steps: crude tokens, but a real trained tokenizer (shared by
    the dVAE, transformer and sampling tests)."""
    from dalle_jax import config_lib
    from dalle_jax.training import loop

    config = config_lib.load("dvae_mini")
    config.data.update(dict(data_dir=mini_config().data.data_dir, batch_size=16))
    config.data.shapes.update(mini_config().data.shapes.to_dict())
    config.model.update(dict(n_hid=16, vocab_size=128, n_init=32))
    config.task.update(dict(kl_warmup_steps=20, temperature_steps=40))
    config.optimizer.update(dict(warmup_steps=0, learning_rate=2e-3, ema_decay=0.9))
    config.train.update(dict(steps=80, log_every=10, eval_every=80, eval_batches=2,
                             images_every=0, checkpoint_every=100))
    workdir = str(tmp_path_factory.mktemp("dvae") / "run")
    loop.train(config, workdir)
    return workdir


def tiny_dalle_config(mini_config, dvae_workdir):
    """configs/dalle_mini.py shrunk, on the tokens of the tiny dVAE in `dvae_workdir`."""
    from dalle_jax import config_lib

    config = config_lib.load("dalle_mini")
    config.data.update(dict(data_dir=mini_config().data.data_dir, batch_size=16))
    config.data.shapes.update(mini_config().data.shapes.to_dict())
    config.text.update(dict(length=20, vocab_size=64))
    config.task.dvae_workdir = dvae_workdir
    config.model.update(dict(image_vocab_size=128, d_model=64, num_heads=4, head_dim=16,
                             mlp_dim=128))
    config.optimizer.update(dict(warmup_steps=5, learning_rate=3e-3))
    config.train.update(dict(steps=60, log_every=20, eval_every=60, eval_batches=3,
                             images_every=60, checkpoint_every=100))
    # Two devices, FSDP: the loop shards the frozen dVAE and the state; the transformer's
    # sharded = unsharded tests on larger meshes live in test_dalle.py.
    config.mesh.update(dict(shape=(1, 2, 1), num_devices=2))
    return config


@pytest.fixture(scope="session")
def _dalle_run(mini_config, dvae_run, tmp_path_factory):
    from dalle_jax.training import loop

    config = tiny_dalle_config(mini_config, dvae_run)
    root = tmp_path_factory.mktemp("dalle")
    trainer = loop.Trainer(config, str(root / "init"))
    initial = trainer.evaluate(trainer._init())
    loop.train(config, str(root / "run"))
    return str(root / "run"), initial


@pytest.fixture(scope="session")
def dalle_run(_dalle_run):
    """The workdir of a short tiny-transformer run on the tiny dVAE's tokens."""
    return _dalle_run[0]


@pytest.fixture(scope="session")
def dalle_initial_metrics(_dalle_run):
    """That run's validation metrics at initialisation."""
    return _dalle_run[1]
