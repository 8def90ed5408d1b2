"""The training loop's mechanics, on a tiny task (tests/toy_task.py) so they run in seconds."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dalle_jax import workdir as workdir_lib
from dalle_jax.training import loop, metrics as metrics_lib, optimizer
from toy_task import ToyTask

HERE = os.path.dirname(os.path.abspath(__file__))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_trees_close(a, b, **tolerance):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **tolerance)


def final_state(workdir, config):
    """The whole train state (optimizer moments too) of the run's latest checkpoint."""
    trainer = loop.Trainer(config, str(workdir), ToyTask())
    step = workdir_lib.latest_step(str(workdir))
    return ocp.StandardCheckpointer().restore(
        os.path.join(workdir_lib.checkpoint_dir(str(workdir)), str(step), workdir_lib.STATE),
        trainer.abstract_state)


def test_schedules_reach_their_end_points():
    from ml_collections import ConfigDict

    base = dict(learning_rate=1.0, end_learning_rate=0.1, warmup_steps=10)
    for kind in ("cosine", "linear"):
        schedule = optimizer.learning_rate_schedule(ConfigDict(dict(base, schedule=kind)), 110)
        assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
        assert float(schedule(10)) == pytest.approx(1.0)
        assert float(schedule(110)) == pytest.approx(0.1)
        values = [float(schedule(s)) for s in range(10, 111)]
        assert all(a >= b - 1e-7 for a, b in zip(values, values[1:]))
    constant = optimizer.learning_rate_schedule(ConfigDict(dict(base, schedule="constant")), 110)
    assert float(constant(50)) == float(constant(109)) == 1.0
    with pytest.raises(ValueError, match="schedule='exp'"):
        optimizer.learning_rate_schedule(ConfigDict(dict(base, schedule="exp")), 110)


def test_run_logs_metrics_images_and_checkpoints(toy_config, tmp_path):
    state = loop.train(toy_config, str(tmp_path), task=ToyTask())
    assert int(state.step) == 8
    records = metrics_lib.read_metrics(str(tmp_path))
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [4, 8]
    for key in ("train/learning_rate", "train/grad_norm", "train/step_seconds",
                "train/examples_per_second", "train/flops_per_second"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert train[-1]["train/flops_per_second"] > 0
    assert [r["step"] for r in records if "eval/mse" in r] == [8]
    assert os.path.exists(tmp_path / "images" / "toy_00000008.png")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())[-1] == 8


def test_profile_steps_write_a_trace_and_checkpoint_every_zero_saves_only_the_end(
        toy_config, tmp_path):
    toy_config.profile_steps = 2
    toy_config.train.checkpoint_every = 0
    state = loop.train(toy_config, str(tmp_path), task=ToyTask())
    assert int(state.step) == 8
    traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files
              if f.endswith(".xplane.pb")]
    assert len(traces) == 1
    assert [s for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()] == ["8"]


def test_state_is_created_sharded_by_logical_axes(toy_config, tmp_path):
    toy_config.mesh.shape = (2, 2, 2)
    trainer = loop.Trainer(toy_config, str(tmp_path), ToyTask())
    state = trainer.init_state()
    kernel = state.params["down"]["kernel"]
    assert kernel.sharding.spec == jax.P("fsdp", "tensor")
    # Adam's moments and the EMA follow their parameter; counters are replicated.
    mu = state.opt_state[1][0].mu["down"]["kernel"]
    assert mu.sharding.spec == jax.P("fsdp", "tensor")
    assert state.ema["down"]["kernel"].sharding.spec == jax.P("fsdp", "tensor")
    assert state.step.sharding.spec == jax.P()
    shard_shape = kernel.addressable_shards[0].data.shape
    assert shard_shape == (kernel.shape[0] // 2, kernel.shape[1] // 2)


def test_eight_devices_train_like_one(toy_config, tmp_path):
    toy_config.mesh.shape = (2, 2, 2)
    sharded = loop.train(toy_config, str(tmp_path / "eight"), task=ToyTask())
    toy_config.mesh.update(dict(shape=(1, 1, 1), num_devices=1))
    single = loop.train(toy_config, str(tmp_path / "one"), task=ToyTask())
    assert_trees_close(sharded.params, single.params, rtol=2e-5, atol=1e-6)
    loss = lambda d: [r["train/loss"] for r in metrics_lib.read_metrics(str(d)) if "train/loss" in r]
    np.testing.assert_allclose(loss(tmp_path / "eight"), loss(tmp_path / "one"), rtol=1e-5)


def test_gradient_accumulation_matches_the_whole_batch(toy_config, tmp_path):
    # Without input noise the mean of 4 micro-batch means is the whole batch's mean.
    whole = loop.train(toy_config, str(tmp_path / "whole"), task=ToyTask(noise=0.0))
    toy_config.train.grad_accum = 4
    accumulated = loop.train(toy_config, str(tmp_path / "accum"), task=ToyTask(noise=0.0))
    assert_trees_close(whole.params, accumulated.params, rtol=1e-4, atol=1e-6)


def test_resume_continues_with_the_same_batches(toy_config, tmp_path):
    straight = loop.train(toy_config, str(tmp_path / "straight"), task=ToyTask())
    loop.train(toy_config, str(tmp_path / "resumed"), task=ToyTask(), stop_after=3)
    resumed = loop.train(toy_config, str(tmp_path / "resumed"), task=ToyTask())
    assert int(resumed.step) == 8
    assert_trees_close(straight.params, resumed.params, rtol=0, atol=0)
    assert_trees_close(straight.opt_state, resumed.opt_state, rtol=0, atol=0)


def test_nan_batch_is_skipped_and_counted(toy_config, tmp_path):
    toy_config.optimizer.warmup_steps = 0  # So the first good step moves the parameters.
    trainer = loop.Trainer(toy_config, str(tmp_path), ToyTask())
    state = trainer.init_state()
    with trainer.batches("train", training=True) as batches:
        clean = next(batches)
    as_float = {**clean, "image": clean["image"].astype(np.float32)}
    poisoned = dict(as_float, image=as_float["image"].at[3, 5, 5, 1].set(np.nan))
    trainer.compile_train_step(state, as_float)
    before = jax.device_get(state.params)
    state, metrics = trainer.train_step(state, poisoned)
    assert not np.isfinite(float(metrics["loss"]))
    assert (int(state.nonfinite_total), int(state.nonfinite_in_row), int(state.step)) == (1, 1, 1)
    assert_trees_close(state.params, before, rtol=0, atol=0)
    state, metrics = trainer.train_step(state, as_float)
    assert np.isfinite(float(metrics["loss"]))
    assert (int(state.nonfinite_total), int(state.nonfinite_in_row)) == (1, 0)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(state.params), leaves(before)))


class AlwaysNaN(ToyTask):
    def loss(self, model, batch, rng, step):
        loss, metrics = super().loss(model, batch, rng, step)
        return loss * np.nan, metrics


def test_run_stops_after_too_many_nonfinite_steps_in_a_row(toy_config, tmp_path):
    toy_config.train.max_nonfinite_in_row = 3
    with pytest.raises(loop.NonFiniteError, match=r"^step 3: 3 non-finite"):
        loop.train(toy_config, str(tmp_path), task=AlwaysNaN())


def run_toy_subprocess(config, workdir):
    """train.py-like process training the toy task (the loop is the same for every task)."""
    script = (
        "import sys, json; sys.path.insert(0, sys.argv[1]);"
        "from ml_collections import ConfigDict; from dalle_jax.training import loop;"
        "from toy_task import ToyTask;"
        "config = ConfigDict(json.load(open(sys.argv[2])));"
        "loop.train(config, sys.argv[3], task=ToyTask())")
    config_path = os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + ".json")
    with open(config_path, "w") as f:
        f.write(config.to_json())
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=os.path.dirname(HERE))
    return subprocess.Popen([sys.executable, "-c", script, HERE, config_path, workdir],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(workdir, step, proc, timeout=240):
    target = os.path.join(workdir, "checkpoints", str(step))
    deadline = time.time() + timeout
    while not os.path.isdir(target):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def slow_toy_config(toy_config):
    # Enough steps that the signal surely lands mid-run.
    toy_config.train.update(dict(steps=400, checkpoint_every=2, log_every=50, eval_every=0,
                                 images_every=0))
    return toy_config


def test_sigkill_then_restart_ends_where_an_uninterrupted_run_does(toy_config, tmp_path):
    config = slow_toy_config(toy_config)
    config.train.steps = 60
    workdir = str(tmp_path / "killed")
    proc = run_toy_subprocess(config, workdir)
    wait_for_checkpoint(workdir, 10, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
    assert 10 <= max(steps) < 60  # Killed mid-run.
    resumed = loop.train(config, workdir, task=ToyTask())
    straight = loop.train(config, str(tmp_path / "straight"), task=ToyTask())
    assert int(resumed.step) == 60
    assert_trees_close(straight.params, resumed.params, rtol=0, atol=0)


def test_sigterm_checkpoints_and_exits_cleanly(toy_config, tmp_path):
    config = slow_toy_config(toy_config)
    config.train.checkpoint_every = 1000  # Only the preemption save can write step > 2.
    workdir = str(tmp_path / "preempted")
    proc = run_toy_subprocess(config, workdir)
    wait_for_checkpoint(workdir, 1, proc)  # Orbax's first save; training is under way.
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert 1 < steps[-1] < 400
    state = final_state(workdir, config)
    assert int(state.step) == steps[-1]
