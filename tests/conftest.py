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

import importlib  # noqa: E402

import pytest  # noqa: E402


def required_in_ci(reason: str) -> None:
    """Skips the test, except under CI=true (.ci/run sets it): CI installs everything the
    tests use, so there a missing tool means something broke, and the test fails."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: CI installs it, so this fails instead of skipping)",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def import_required_in_ci(name: str, reason: str):
    """`pytest.importorskip`, failing under CI=true (see `required_in_ci`)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        required_in_ci(reason)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`pytest -n 2`, with `--dist loadgroup` from setup.cfg) every test of
    the tiny pipeline's workdir runs on one worker: each worker would build its own (minutes)."""
    for item in items:
        if "pipeline_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("pipeline"))


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


@pytest.fixture
def toy_config(mini_config):
    """The mini data set with tests/toy_task.py's tiny task: the loop's mechanics in seconds."""
    config = mini_config()
    config.task.name = "toy"
    config.data.batch_size = 16
    config.train.update(dict(steps=8, log_every=4, eval_every=8, eval_batches=2, images_every=8,
                             checkpoint_every=4, keep_checkpoints=5))
    config.optimizer.update(dict(learning_rate=3e-2, warmup_steps=2, ema_decay=0.9))
    return config


@pytest.fixture(scope="session")
def mini_tokenizer(mini_config, tmp_path_factory):
    from dalle_jax.training import setup

    return setup.load_or_train_tokenizer(mini_config(), str(tmp_path_factory.mktemp("run")))


def tiny_pipeline_config(mini_config):
    """configs/pipeline_tiny.py on the session's mini data set, with test meshes."""
    from dalle_jax import config_lib

    config = config_lib.load("pipeline_tiny")
    for stage in config.stages:
        config[stage].data.data_dir = mini_config().data.data_dir
        config[stage].data.shapes.update(mini_config().data.shapes.to_dict())
    # The CLIPs on one device: compiling their step for 8 fake ones doubles their time, and
    # the global-batch loss under sharding has its own test in test_clip.py.
    config.clip.mesh.num_devices = config.grey_clip.mesh.num_devices = 1
    # The transformer on two (FSDP): the loop shards the frozen dVAE and the state; its
    # sharded = unsharded tests on larger meshes live in test_dalle.py.
    config.dalle.mesh.update(dict(shape=(1, 2, 1), num_devices=2))
    return config


@pytest.fixture(scope="session")
def pipeline_run(mini_config, tmp_path_factory):
    """The workdir of configs/pipeline_tiny.py run end to end: tokenizer, dvae/, clip/,
    grey_clip/, dalle/ and samples/ (shared by the dVAE, CLIP, transformer and sampling tests)."""
    from dalle_jax import pipeline

    workdir = str(tmp_path_factory.mktemp("pipeline") / "run")
    pipeline.run_pipeline(tiny_pipeline_config(mini_config), workdir)
    return workdir


@pytest.fixture(scope="session")
def dvae_run(pipeline_run):
    """A tiny dVAE trained for 80 steps: crude tokens, but a real trained tokenizer."""
    return os.path.join(pipeline_run, "dvae")


@pytest.fixture(scope="session")
def clip_run(pipeline_run):
    """A tiny CLIP trained for 80 steps."""
    return os.path.join(pipeline_run, "clip")


@pytest.fixture(scope="session")
def dalle_run(pipeline_run):
    """A tiny transformer trained for 60 steps on the tiny dVAE's tokens."""
    return os.path.join(pipeline_run, "dalle")


def tiny_dalle_config(mini_config, pipeline_workdir):
    """The tiny transformer stage's config as the pipeline in `pipeline_workdir` runs it."""
    from dalle_jax import pipeline

    config = tiny_pipeline_config(mini_config)
    return pipeline.stage_configs(config, pipeline_workdir)["dalle"]


@pytest.fixture(scope="session")
def dalle_initial_metrics(mini_config, pipeline_run, tmp_path_factory):
    """The tiny transformer's validation metrics at initialisation."""
    from dalle_jax import pipeline
    from dalle_jax.training import loop

    config = tiny_dalle_config(mini_config, pipeline_run)
    trainer = loop.Trainer(config, str(tmp_path_factory.mktemp("dalle_init")),
                           pipeline.make_task(config))
    return trainer.evaluate(trainer.init_state())
