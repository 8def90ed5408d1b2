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
