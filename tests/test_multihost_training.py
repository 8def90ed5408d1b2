"""Training as a pod runs it: several processes over one mesh, checked against one process.

Two local processes with 4 CPU devices each (jax.distributed over loopback, gloo collectives)
run `train.py` with the batch and the FSDP axis spanning both; each reads only its half of
every global batch. The reference is one process with 8 devices. A CLIP 16 wide runs
in the default suite; the 8 px dVAE, and the tiny transformer, which also hands the pipeline's
trained dVAE to every process, run with `-m slow`. The CLIP's takes about 40 s on 2 cores, most
of it the compilations of the two processes and of the reference, which trains while they run;
the continuation reuses the reference's compiled programs.
"""
import contextlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_dalle_config
from dalle_jax import workdir as workdir_lib
from dalle_jax.pipeline import train_stage
from test_multiprocess import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG_FILE = '''"""The test's config, as the pytest process wrote it to {json_path}."""
import json

import ml_collections


def get_config():
    with open({json_path!r}) as f:
        return ml_collections.ConfigDict(json.load(f))
'''


def tiny_clip_config(mini_config):
    """configs/clip_mini.py at width 16 with one block per tower and 16-pixel patches: its init
    and step compile in a few seconds (a dVAE's many convolutions take twice as long), and the
    contrastive loss over the global batch needs every process's examples."""
    from dalle_jax import config_lib

    config = config_lib.load("clip_mini")
    config.data.update(dict(data_dir=mini_config().data.data_dir, batch_size=16))
    config.data.shapes.update(mini_config().data.shapes.to_dict())
    config.text.update(dict(length=12, vocab_size=64))
    config.model.update(dict(patch_size=16, image_width=16, image_depth=1, image_heads=1,
                             text_width=16, text_depth=1, text_heads=1, embed_dim=16))
    config.optimizer.ema_decay = 0.0  # fewer arrays: the optimizer's update compiles faster
    return config


def tiny_dvae_config(mini_config):
    """configs/dvae_mini.py at 8 px, 2 groups and 16 codes: compiles and runs in seconds."""
    from dalle_jax import config_lib

    config = config_lib.load("dvae_mini")
    config.data.update(dict(data_dir=mini_config().data.data_dir, image_size=8, batch_size=16))
    config.data.shapes.update(mini_config().data.shapes.to_dict())
    config.model.update(dict(image_size=8, n_hid=16, num_groups=2, blocks_per_group=1,
                             vocab_size=16, n_init=8))
    return config


@pytest.fixture(scope="module", params=["clip", pytest.param("dvae", marks=pytest.mark.slow),
                                        pytest.param("dalle", marks=pytest.mark.slow)])
def config(request, mini_config):
    if request.param == "clip":
        config = tiny_clip_config(mini_config)
    elif request.param == "dvae":
        config = tiny_dvae_config(mini_config)
    else:
        config = tiny_dalle_config(mini_config, request.getfixturevalue("pipeline_run"))
    # Constant rate after the warm-up: a run stopped early (train.steps=4) and one that goes
    # on to step 6 follow the same schedule, so one can continue where the other stopped.
    config.optimizer.update(dict(schedule="constant", warmup_steps=2))
    config.train.update(dict(steps=6, log_every=1, eval_every=0, images_every=0,
                             checkpoint_every=0))
    config.mesh.update(dict(shape=(1, 8, 1), num_devices=0))
    return config


def losses(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def start_two_processes(config, workdir: str, tmp_path) -> list[subprocess.Popen]:
    json_path = str(tmp_path / "config.json")
    with open(json_path, "w") as f:
        f.write(config.to_json_best_effort())
    config_path = tmp_path / "config.py"
    config_path.write_text(CONFIG_FILE.format(json_path=json_path))
    port = free_port()
    # What a pod's worker would get: its own devices only (4 here), the others over the network.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=ROOT)
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), f"--config={config_path}",
         f"--workdir={workdir}", "--config.distributed.enabled=True",
         f"--config.distributed.coordinator_address=127.0.0.1:{port}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
         "--config.distributed.cpu_collectives=gloo"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    return procs


def wait_for(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]


def assert_trees_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-6)


@contextlib.contextmanager
def persistent_compilation_cache(directory: str):
    """JAX's persistent compilation cache in `directory`, every program cached, for this block
    only (the settings and the cache are restored after it)."""
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    saved_dir = jax.config.jax_compilation_cache_dir
    for name in names:
        jax.config.update(name, 0)
    compilation_cache.reset_cache()
    compilation_cache.set_cache_dir(directory)
    try:
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        jax.config.update("jax_compilation_cache_dir", saved_dir)
        compilation_cache.reset_cache()


def test_two_processes_train_like_one_and_their_checkpoint_continues_on_another_mesh(
        config, tmp_path):
    workdir = str(tmp_path / "two_processes")
    two = config.copy_and_resolve_references()
    two.train.steps = 4  # Stops with a checkpoint at step 4.
    processes = start_two_processes(two, workdir, tmp_path)
    # The reference, trained here while the two processes run (both mostly compile, each on
    # one core): every step's loss and the final state of one process with 8 devices, on the
    # mesh the continuation below uses (data 2 × FSDP 2 × tensor 2), so that the continuation
    # finds its compiled programs in JAX's persistent cache instead of compiling them again.
    one = config.copy_and_resolve_references()
    one.mesh.shape = (2, 2, 2)
    with persistent_compilation_cache(str(tmp_path / "compiled")):
        reference_workdir = str(tmp_path / "one_process")
        reference_state = jax.device_get(train_stage(one, reference_workdir))
        reference_losses = losses(reference_workdir)
        wait_for(processes)

        two_losses = losses(workdir)
        assert sorted(two_losses) == [1, 2, 3, 4]
        np.testing.assert_allclose([two_losses[s] for s in range(1, 5)],
                                   [reference_losses[s] for s in range(1, 5)], rtol=1e-5)
        steps = [int(s) for s in os.listdir(workdir_lib.checkpoint_dir(workdir)) if s.isdigit()]
        assert steps == [4]
        data_files = os.listdir(os.path.join(workdir_lib.checkpoint_dir(workdir), "4", "data"))
        assert sorted(f for f in data_files if f.endswith(".json")) == [
            "process_0-of-2.json", "process_1-of-2.json"]

        # One process, another mesh: Orbax reshards the state and the data stream continues
        # at global batch 5.
        continued = train_stage(one, workdir)
    assert int(continued.step) == 6
    continued_losses = losses(workdir)
    np.testing.assert_allclose([continued_losses[s] for s in (5, 6)],
                               [reference_losses[s] for s in (5, 6)], rtol=1e-5)
    assert_trees_close(jax.device_get(continued.params), reference_state.params)
    assert_trees_close(jax.device_get(continued.opt_state), reference_state.opt_state)
