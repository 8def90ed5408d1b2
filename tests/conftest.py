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
